"""The shape of an architecture spec: where things are in the model and which rule each module gets.

A spec is data. The rules themselves live with the engines that apply them (autograd rules in
:mod:`agdecode.adapters`, stacked-dual rules in :mod:`agdecode.engines.forward`), chosen by the
``kind`` fields here, with their constants in :mod:`agdecode.rules`.
"""
from __future__ import annotations

import importlib
import operator
import types
from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["Norm", "MLP", "Spec", "NORM_KINDS", "MLP_KINDS"]

# rms: forward computes w * x * rsqrt(mean(x^2) + eps) (Llama); rms-gemma: _norm computes
# x * rsqrt(...) and forward scales by 1 + w; layer: LayerNorm, (x - mean) / std * w + b.
NORM_KINDS = ("rms", "rms-gemma", "layer")
# gated: down(act(gate(x)) * up(x)); fused-gated: one projection whose halves are gate and up;
# plain: down(act(up(x))), no gate (GPT-2).
MLP_KINDS = ("gated", "fused-gated", "plain")


@dataclass(frozen=True)
class Norm:
    """The normalisation modules of an architecture and how they compute.

    ``classes``: class names in the modeling module (or dotted paths such as ``torch.nn.LayerNorm``);
    ``eps``: the attribute holding epsilon; ``weight_in_float32``: the weight multiplies before the
    cast back to the input dtype (OLMo-2) rather than after (Llama).
    """

    classes: tuple[str, ...]
    kind: str = "rms"
    eps: str = "variance_epsilon"
    weight_in_float32: bool = False

    def __post_init__(self):
        assert self.kind in NORM_KINDS, self.kind


@dataclass(frozen=True)
class MLP:
    """The MLP class, its kind and its parts (attribute names on the MLP module).

    ``inputs``: gated: (gate, up) projections; fused-gated: the one projection whose first half is
    the gate; plain: the input projection. ``act``: the activation; ``output``: the projection after it.
    """

    cls: str
    kind: str = "gated"
    inputs: tuple[str, ...] = ("gate_proj", "up_proj")
    act: str = "act_fn"
    output: str = "down_proj"

    def __post_init__(self):
        assert self.kind in MLP_KINDS, self.kind


@dataclass(frozen=True)
class Spec:
    """One architecture family's AttnLRP map and layout.

    Paths are dotted attribute names: ``layers_path``, ``final_norm_path`` and ``learned_positions``
    on the decoder (``model.get_decoder()``), ``attention_output_path`` on a decoder layer (the projection
    whose input holds the heads' outputs, concatenated). ``oracle`` says which test covers it.

    Example:
        >>> from agdecode.architectures import get_spec
        >>> get_spec(model).attention_output(get_spec(model).layers(model)[0])
        Linear(in_features=576, out_features=576, bias=False)
    """

    name: str
    model_types: tuple[str, ...]
    modeling: str                             # module under transformers.models
    norm: Norm
    mlp: MLP
    layers_path: str = "layers"
    final_norm_path: str = "norm"
    attention_output_path: str = "self_attn.o_proj"
    learned_positions: str | None = None      # added inside the model: a constant, no tangent
    logits_divisor: str | None = None         # config attribute the LM head's output is divided by (Granite)
    oracle: str = ""

    def module(self) -> types.ModuleType:
        return importlib.import_module(f"transformers.models.{self.modeling}")

    def _cls(self, name: str) -> type:
        if "." in name:
            mod, _, attr = name.rpartition(".")
            return getattr(importlib.import_module(mod), attr)
        return getattr(self.module(), name)

    def norm_classes(self) -> tuple[type, ...]:
        return tuple(self._cls(c) for c in self.norm.classes)

    def mlp_class(self) -> type:
        return self._cls(self.mlp.cls)

    def eager_attention(self) -> Callable:
        """The architecture's own eager attention function (what the rules wrap for ``"eager"``)."""
        return self.module().eager_attention_forward

    @staticmethod
    def decoder(model: nn.Module) -> nn.Module:
        return model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(operator.attrgetter(self.layers_path)(self.decoder(model)))

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm before the LM head."""
        return operator.attrgetter(self.final_norm_path)(self.decoder(model))

    def attention_output(self, layer: nn.Module) -> nn.Module:
        """The attention output projection of a decoder layer (its input holds the heads' outputs)."""
        return operator.attrgetter(self.attention_output_path)(layer)

    def positions(self, model: nn.Module) -> nn.Module | None:
        """The learned position embedding, if the architecture has one."""
        if self.learned_positions is None:
            return None
        return operator.attrgetter(self.learned_positions)(self.decoder(model))

    def logits_scale(self, model: nn.Module) -> float:
        """What the model multiplies the LM head's output by (1 / ``logits_scaling`` for Granite, else 1);
        an early exit (DoLa) through the final norm and the head must apply it too."""
        if self.logits_divisor is None:
            return 1.0
        return 1.0 / float(getattr(model.config.get_text_config(), self.logits_divisor))

    def head_shape(self, model: nn.Module) -> tuple[int, int]:
        """(number of layers, attention heads per layer)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cfg.num_hidden_layers, cfg.num_attention_heads

    def n_layers(self, model: nn.Module) -> int:
        """The number of decoder layers."""
        return self.head_shape(model)[0]

    def final_softcap(self, model: nn.Module) -> float | None:
        """The cap of ``tanh(logits / cap) * cap`` on the final logits (Gemma 2), or None."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return getattr(cfg, "final_logit_softcapping", None) or None

    def module_rules(self, norm: Callable, mlp: Callable) -> list[tuple[Callable[[nn.Module], bool], str, Callable]]:
        """(which modules, which attribute, override) for the norms and MLPs of this architecture:
        Gemma-style norms get ``_norm`` replaced, all others ``forward``."""
        norms, mlp_cls = self.norm_classes(), self.mlp_class()
        norm_attr = "_norm" if self.norm.kind == "rms-gemma" else "forward"
        return [(lambda m: isinstance(m, norms), norm_attr, norm), (lambda m: isinstance(m, mlp_cls), "forward", mlp)]
