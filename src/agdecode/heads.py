"""Attention-head ROIs: head sets (shipped, from a file, or explicit) and their resolution to masks.

A head's relevance is (input of the attention output projection) x (its rule-modified gradient),
summed over the head dimension and over positions. Head sets come from ``agd heads discover``
(:mod:`agdecode.discovery`); the package ships the sets found for the default model.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .roi import ROIError

__all__ = ["head_mask", "model_key", "shipped_heads", "KINDS"]

KINDS = ("parametric", "in-context")


def model_key(model: nn.Module) -> str:
    """A short name identifying the model's weights, used to find shipped head sets.

    Example:
        >>> model_key(agdecode.load_model("smollm2")[0])
        'smollm2-135m-instruct-fp32'
    """
    return Path(str(getattr(model.config, "_name_or_path", "") or "")).name or type(model).__name__


def shipped_heads(model: nn.Module) -> dict | None:
    """The head-discovery result shipped for this model, or None."""
    path = resources.files("agdecode") / "data" / "heads" / f"{model_key(model)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pairs_from_file(path: Path, kind: str | None) -> list[list[int]]:
    data = json.loads(path.read_text())
    if "heads" in data:
        return data["heads"]
    kinds = [kind] if kind else [data.get("kind")]
    for k in kinds:
        if k in data.get("top", {}):
            return data["top"][k]
    raise ROIError(f"{path} holds no head list ('heads', or 'top' with {kinds}).")


def head_mask(spec: str, model: nn.Module) -> torch.Tensor:
    """Resolve a head-set spec to a boolean mask ``(layers, heads)``.

    ``spec`` is a shipped set name (``parametric``, ``in-context``), a JSON file written by
    ``agd heads discover`` (optionally ``FILE.json#parametric``), or ``layer.head`` pairs such as
    ``"3.1,4.5"`` (0-based).

    Example:
        >>> head_mask("3.1,4.5", model).nonzero().tolist()
        [[3, 1], [4, 5]]
    """
    n_layers, n_heads = get_adapter(model).head_shape(model)
    if spec in KINDS:
        found = shipped_heads(model)
        if found is None:
            raise ROIError(f"No shipped '{spec}' head set for model {model_key(model)!r}. Find one with "
                           f"`agd heads discover --kind {spec} --model ... --out heads.json` and pass "
                           "roi='heads:heads.json'.")
        pairs = found["top"][spec]
    elif spec.split("#")[0].endswith(".json"):
        file, _, kind = spec.partition("#")
        if not Path(file).is_file():
            raise ROIError(f"Head-set file {file!r} not found.")
        pairs = _pairs_from_file(Path(file), kind or None)
    else:
        try:
            pairs = [[int(a) for a in p.split(".")] for p in spec.split(",")]
        except ValueError:
            raise ROIError(f"Cannot parse head ROI 'heads:{spec}'; expected {', '.join(KINDS)}, a .json file, "
                           "or layer.head pairs like '3.1,4.5'.") from None
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for pair in pairs:
        if len(pair) != 2:
            raise ROIError(f"Head id {pair!r} must be a (layer, head) pair.")
        layer, head = pair
        if not 0 <= layer < n_layers:
            raise ROIError(f"Head ({layer}, {head}): layer out of range; the model has {n_layers} layers (0-based).")
        if not 0 <= head < n_heads:
            raise ROIError(f"Head ({layer}, {head}): head out of range; the model has {n_heads} heads per layer.")
        mask[layer, head] = True
    if not mask.any():
        raise ROIError(f"Head ROI 'heads:{spec}' is empty.")
    return mask
