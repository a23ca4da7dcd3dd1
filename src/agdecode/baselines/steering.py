"""Activation steering for instruction following (Stolfo et al., 2025, arXiv 2410.12877).

Fitting: for each user prompt, the residual stream at layer L at the last prompt token is taken with
and without the instruction; the steering vector is the mean difference. Generating: ``w * v`` is
added to the residual stream at layer L at every position (prompt and generated tokens).

Layer L is the residual stream *entering* decoder layer L (``output_hidden_states[L]``; 0 = the
embedding output). Defaults: L = the middle layer (``num_hidden_layers // 2``), w = 1.0, which
moves an average prompt without the instruction onto an average prompt with it. Stolfo et al. pick
the layer (and, for some instructions, the weight) on held-out prompts per model: sweep both for
a serious comparison.

A fitted vector is saved as ``NAME.safetensors`` (tensor ``vector``; its metadata header carries
the JSON below) plus ``NAME.json`` for people: the instruction, layer, number of prompts and the
model's identity (architecture, hidden size, layers, vocabulary and an embedding fingerprint), so a
vector is never applied to another model by mistake.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..adapters import decoder_layers
from ..architectures import layout
from ..identity import steering_identity as model_identity  # re-exported: the one identity module
from ..models import input_device
from ..sources import CachedForward
from ..prompt import render_prompt
from . import BaselineError
from ..errors import AgdError, SteeringVectorMismatch

__all__ = ["SteeringVector", "SteeringVectorMismatch", "fit_steering_vector", "as_steering_vector",
           "SteeringSource", "model_identity", "PLACEMENTS"]

PLACEMENTS = ("system", "user")
_FINGERPRINT_RTOL = 0.05  # survives dtype changes and GGUF dequantisation, not a different model


@dataclass
class SteeringVector:
    """A steering vector ``(H,)`` for the residual stream entering decoder layer ``layer``.

    ``layer`` is None for a bare tensor (the generation then uses ``steer_layer`` or the middle
    layer); ``meta`` holds the model identity and how the vector was fitted.

    Example:
        >>> sv = fit_steering_vector(model, tok, ["Tell me about cats."], "Always answer in French.")
        >>> sv.save("french.safetensors"); SteeringVector.load("french.safetensors").layer
    """

    vector: torch.Tensor
    layer: int | None = None
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and the same metadata, readable, next to it as .json."""
        path = Path(path).with_suffix(".safetensors")
        meta = {**self.meta, "layer": self.layer}
        save_file({"vector": self.vector.detach().float().cpu().contiguous()}, str(path),
                  metadata={"agdecode": json.dumps(meta)})
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Steering vector {str(path)!r} not found (create one with `agd steer fit`).")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("agdecode", "{}"))
            vector = load_file(str(path))["vector"]
        except Exception as e:  # not a safetensors file, or not one of ours
            raise BaselineError(f"{str(path)!r} is not a steering vector saved by agdecode ({e}).") from e
        return cls(vector, meta.pop("layer", None), meta)

    def check(self, model: nn.Module) -> None:
        """Raise :class:`SteeringVectorMismatch` unless this vector fits ``model``."""
        mine = model_identity(model)
        if self.vector.shape != (mine["hidden_size"],):
            raise SteeringVectorMismatch(f"The steering vector has shape {tuple(self.vector.shape)}, but this model's "
                                         f"hidden size is {mine['hidden_size']}: it was fitted on another model.")
        fitted = {k: self.meta[k] for k in ("model_type", "num_layers", "vocab_size") if k in self.meta}
        differs = {k: (v, mine[k]) for k, v in fitted.items() if v != mine[k]}
        fp = self.meta.get("fingerprint")
        if fp is not None and not torch.allclose(torch.tensor(fp), torch.tensor(mine["fingerprint"]),
                                                 rtol=_FINGERPRINT_RTOL, atol=0):
            differs["embedding fingerprint"] = ("", "")
        if differs:
            what = ", ".join(f"{k} {a} vs {b}" if a != "" else k for k, (a, b) in differs.items())
            raise SteeringVectorMismatch(f"The steering vector was fitted on another model "
                                         f"({self.meta.get('model', '?')!r}; differs in {what}); "
                                         f"fit one for this model with `agd steer fit`.")


def _check_layer(model: nn.Module, layer: int) -> int:
    n = layout(model).n_layers(model)
    if not 0 <= layer < n:
        raise BaselineError(f"steering layer {layer} is out of range: this model has {n} decoder layers "
                            f"(0..{n - 1}; layer L is the residual stream entering decoder layer L)")
    return layer


def _with_instruction(prompt: str, instruction: str, placement: str) -> list[dict]:
    if placement == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    return [{"role": "user", "content": f"{prompt}\n{instruction}"}]  # appended to the query, as Stolfo et al.


@torch.no_grad()
def fit_steering_vector(model: nn.Module, tokenizer, prompts: Sequence[str], instruction: str,
                        layer: int | None = None, placement: str = "system") -> SteeringVector:
    """Mean difference of the last-token residual at ``layer`` with vs without ``instruction``.

    ``placement`` is where the instruction goes: ``"system"`` (a system message; the default, as
    AGD's ROI) or ``"user"`` (appended to the user message, as in Stolfo et al.).

    Example:
        >>> sv = fit_steering_vector(model, tok, ["Tell me about cats.", "What is rain?"],
        ...                          "Always answer in French.", layer=15)
        >>> agdecode.generate(model, tok, [{"role": "user", "content": "What is snow?"}],
        ...                   method="steer", steer_vector=sv)
    """
    if placement not in PLACEMENTS:
        raise AgdError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise AgdError("prompts must be a non-empty list of non-empty strings")
    if not isinstance(instruction, str) or not instruction.strip():
        raise AgdError("instruction must be a non-empty string")
    layer = _check_layer(model, layout(model).n_layers(model) // 2 if layer is None else layer)
    device = input_device(model)

    def residual(messages: list[dict]) -> torch.Tensor:
        ids = render_prompt(tokenizer, messages).input_ids.to(device)
        return model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[layer][0, -1].float()

    diffs = [residual(_with_instruction(p, instruction, placement)) - residual([{"role": "user", "content": p}])
             for p in prompts]
    meta = {**model_identity(model), "instruction": instruction, "placement": placement, "n_prompts": len(prompts)}
    return SteeringVector(torch.stack(diffs).mean(0).cpu(), layer, meta)


def as_steering_vector(spec: "str | Path | SteeringVector | torch.Tensor") -> SteeringVector:
    """Accept a saved file, a :class:`SteeringVector` or a bare ``(H,)`` tensor."""
    if isinstance(spec, SteeringVector):
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 1:
            raise BaselineError(f"A steering vector tensor must be 1-D (hidden size), got shape {tuple(spec.shape)}")
        return SteeringVector(spec.detach())
    if isinstance(spec, (str, Path)):
        return SteeringVector.load(spec)
    raise BaselineError(f"steer_vector must be a path, a SteeringVector or a tensor, got {type(spec).__name__}")


class SteeringSource(CachedForward):
    """Next-token logits with ``weight * vector`` added to the residual stream entering ``layer``.

    The hook is attached only during each forward, so the model is never left modified.

    Example:
        >>> with SteeringSource(model, SteeringVector.load("french.safetensors"), weight=4.0) as src:
        ...     logits = src.prefill([Row(ids)])
    """

    def __init__(self, model: nn.Module, vector: SteeringVector, layer: int | None = None, weight: float = 1.0):
        super().__init__(model)
        vector.check(model)
        n = layout(model).n_layers(model)
        self.layer = _check_layer(model, layer if layer is not None else
                                  vector.layer if vector.layer is not None else n // 2)
        self.vector, self.weight = vector, float(weight)
        self.block = decoder_layers(model)[self.layer]
        dtype = next(model.parameters()).dtype
        self.push = (self.weight * vector.vector.float()).to(self.device, dtype)
        self._resid_norm: list[float] = []

    @contextlib.contextmanager
    def _steered(self):
        """The hook for one call only: between calls the model is plain (other sources may share it)."""
        handle = self.block.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def prefill(self, rows):
        with self._steered():
            return super().prefill(rows)

    def step(self, token_ids):
        with self._steered():
            return super().step(token_ids)

    def _hook(self, module, args, kwargs):
        if args:
            h, args = args[0], args[1:]
        else:
            h = kwargs.pop("hidden_states")
        self._last_norms = h[:, -1].float().norm(dim=-1).tolist()
        return ((h + self.push,) + tuple(args), kwargs)

    def _logits(self, out, start: int) -> torch.Tensor:
        self._resid_norm = self._resid_norm[:start] + self._last_norms if start else self._last_norms
        return super()._logits(out, start)

    def keep(self, index: torch.Tensor) -> None:
        super().keep(index)
        self._resid_norm = [self._resid_norm[i] for i in index.tolist()]

    def info(self, i: int) -> dict:
        """Norm of the residual (before steering) at the last position, to compare with ``push_norm``."""
        return {"resid_norm": self._resid_norm[i]}

    def describe(self) -> dict:
        return {"layer": self.layer, "weight": self.weight, "push_norm": float(self.push.float().norm()),
                "fitted_layer": self.vector.layer,
                **{k: self.vector.meta[k] for k in ("model", "instruction", "placement", "n_prompts")
                   if k in self.vector.meta}}

