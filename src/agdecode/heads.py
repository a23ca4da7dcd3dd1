"""Attention-head ROIs: head sets (shipped, from a file, or explicit) and their resolution to masks.

A head's relevance is (input of the attention output projection) x (its rule-modified gradient),
summed over the head dimension and over positions. Head sets come from ``agd heads discover``
(:mod:`agdecode.discovery`); the package ships the sets found for the default model.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .checks import is_int
from .architectures import get_spec
from .identity import model_key, same_model  # model_key re-exported
from .errors import ROIError

__all__ = ["head_mask", "model_key", "parse_head_spec", "read_head_file", "shipped_heads", "KINDS"]

KINDS = ("parametric", "in-context")


def shipped_heads(model: nn.Module) -> dict | None:
    """The head-discovery result shipped for this model, or None (also for a model that only shares its folder name).

    Example:
        >>> shipped_heads(model)["top"]["in-context"][:2]
    """
    path = resources.files("agdecode") / "data" / "heads" / f"{model_key(model)}.json"
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found if same_model(found.get("identity"), model) else None


def read_head_file(path: str | Path, kind: str | None = None, model: nn.Module | None = None) -> list[list[int]]:
    """The (layer, head) pairs of a head-set file (``agd heads discover`` output, or ``{"heads": [[L, H], ...]}``).

    Every problem is an :class:`~agdecode.roi.ROIError` that names the file; the layer and head
    ranges are checked against the model later, in :func:`head_mask`. With ``model``, a file written by
    ``agd heads discover`` for another model (its ``identity``) is refused.

    Example:
        >>> read_head_file("heads.json", "in-context")[:2]
        [[9, 3], [12, 0]]
    """
    path = Path(path)
    if not path.is_file():
        raise ROIError(f"Head-set file {str(path)!r} not found.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ROIError(f"Head-set file {path}: not JSON ({e}); expected the output of `agd heads discover` "
                       'or {"heads": [[layer, head], ...]}.') from None
    if not isinstance(data, dict):
        raise ROIError(f"Head-set file {path}: expected a JSON object with 'heads' (or 'top', as written by "
                       f"`agd heads discover`), got a {type(data).__name__}.")
    if model is not None and "identity" in data and not same_model(data["identity"], model):
        found = data["identity"].get("name_or_path") if isinstance(data["identity"], dict) else None
        raise ROIError(f"Head-set file {path} was found for another model ({found!r}); run `agd heads discover` "
                       "for this one.")
    if "heads" in data:
        pairs = data["heads"]
    else:
        k = kind or data.get("kind")
        top = data.get("top")
        if not isinstance(top, dict) or k not in top:
            raise ROIError(f"Head-set file {path} holds no head list ('heads', or 'top' with {k!r}).")
        pairs = top[k]
    return _check_pairs(pairs, str(path))


def _check_pairs(pairs, where: str) -> list[list[int]]:
    if not isinstance(pairs, list) or not pairs:
        raise ROIError(f"{where}: the head list must be a non-empty list of [layer, head] pairs.")
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(is_int(x) for x in pair)):
            raise ROIError(f"{where}: head {str(pair)[:40]} is not a [layer, head] pair of integers.")
    return [list(p) for p in pairs]


def parse_head_spec(spec: str, model: nn.Module | None = None) -> list[list[int]] | None:
    """Check a head spec without the model: explicit ``layer.head`` pairs are parsed, a file is read.

    Returns the pairs, or None for a shipped set name (resolved against the model).

    Example:
        >>> parse_head_spec("3.1,4.5")
        [[3, 1], [4, 5]]
    """
    if spec in KINDS:
        return None
    if spec.split("#")[0].endswith(".json"):
        file, _, kind = spec.partition("#")
        return read_head_file(file, kind or None, model)
    if not re.fullmatch(r"\d{1,6}\.\d{1,6}(,\d{1,6}\.\d{1,6})*", spec):
        raise ROIError(f"Cannot parse head ROI 'heads:{spec[:40]}'; expected {', '.join(KINDS)}, a .json file, "
                       "or layer.head pairs like '3.1,4.5'.")
    return [[int(a) for a in p.split(".")] for p in spec.split(",")]


def head_mask(spec: str, model: nn.Module) -> torch.Tensor:
    """Resolve a head-set spec to a boolean mask ``(layers, heads)``.

    ``spec`` is a shipped set name (``parametric``, ``in-context``), a JSON file written by
    ``agd heads discover`` (optionally ``FILE.json#parametric``), or ``layer.head`` pairs such as
    ``"3.1,4.5"`` (0-based).

    Example:
        >>> head_mask("3.1,4.5", model).nonzero().tolist()
        [[3, 1], [4, 5]]
    """
    n_layers, n_heads = get_spec(model).head_shape(model)
    pairs = parse_head_spec(spec, model)
    if pairs is None:
        found = shipped_heads(model)
        if found is None:
            raise ROIError(f"No shipped '{spec}' head set for model {model_key(model)!r}. Find one with "
                           f"`agd heads discover --kind {spec} --model ... --out heads.json` and pass "
                           "roi='heads:heads.json'.")
        pairs = found["top"][spec]
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in pairs:
        if not 0 <= layer < n_layers:
            raise ROIError(f"Head ({layer}, {head}): layer out of range; the model has {n_layers} layers (0-based).")
        if not 0 <= head < n_heads:
            raise ROIError(f"Head ({layer}, {head}): head out of range; the model has {n_heads} heads per layer.")
        mask[layer, head] = True
    if not mask.any():
        raise ROIError(f"Head ROI 'heads:{spec}' is empty.")
    return mask
