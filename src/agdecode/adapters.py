"""Which module of each architecture gets which AttnLRP rule, and a context manager applying them.

One small entry per architecture (in the manner of LXT's per-model patch maps). Nothing global is
patched: module instances get a ``forward`` (or ``_norm``) override and the model switches to a
registered attention function; leaving :func:`attnlrp` puts back exactly what each instance held
before (or nothing) and the attention implementation, so the model is bit-identical to before.
Modules dispatched by accelerate keep their device hooks: the rule replaces the hooked
``_old_forward``, so the hook still moves inputs and loads offloaded weights around it.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import AgdError
from .rules import identity_rule, stop_gradient, uniform_rule

__all__ = ["Adapter", "ADAPTERS", "get_adapter", "decoder_layers", "final_norm", "attnlrp", "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(AgdError):
    """The model's architecture has no AttnLRP adapter."""


@dataclass(frozen=True)
class Adapter:
    """The AttnLRP map of one architecture family.

    ``norm_style`` says how the RMSNorm is written: ``"llama"`` (``forward`` computes
    ``w * x * rsqrt(var)``) or ``"gemma"`` (``_norm`` computes ``x * rsqrt(var)``, ``forward``
    scales by ``1 + w``).
    """

    name: str
    modeling_module: str
    norm_class: str
    mlp_class: str
    norm_style: str

    def module(self) -> types.ModuleType:
        return importlib.import_module(f"transformers.models.{self.modeling_module}")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order (each has ``self_attn.o_proj``)."""
        return decoder_layers(model)

    def attention_output(self, layer: nn.Module) -> nn.Module:
        """The attention output projection of a decoder layer (its input holds the heads' outputs)."""
        return layer.self_attn.o_proj

    def head_shape(self, model: nn.Module) -> tuple[int, int]:
        """(number of layers, attention heads per layer)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cfg.num_hidden_layers, cfg.num_attention_heads


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", "llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP", "llama"),
    "qwen2": Adapter("qwen2", "qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP", "llama"),
    "qwen3": Adapter("qwen3", "qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP", "llama"),
    "gemma3_text": Adapter("gemma3", "gemma3.modeling_gemma3", "Gemma3RMSNorm", "Gemma3MLP", "gemma"),
    "gemma3": Adapter("gemma3", "gemma3.modeling_gemma3", "Gemma3RMSNorm", "Gemma3MLP", "gemma"),
}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of any Hugging Face decoder-only model, in order."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(inner.layers)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the LM head (DoLa's early exits go through it)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.norm


def get_adapter(model: nn.Module) -> Adapter:
    """Return the AttnLRP adapter for ``model`` or refuse it with the list of supported ones.

    Example:
        >>> get_adapter(model).name
        'llama'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted({a.name for a in ADAPTERS.values()}))
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported for attribution; supported: {supported} "
            f"(config.model_type one of {', '.join(ADAPTERS)})."
        )
    return ADAPTERS[model_type]


# --- the rules applied to each module kind ------------------------------------------------------

def _llama_rmsnorm(self, h: torch.Tensor) -> torch.Tensor:
    dtype = h.dtype
    h = h.to(torch.float32)
    h = h * stop_gradient(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    return self.weight * h.to(dtype)


def _gemma_norm(self, x: torch.Tensor) -> torch.Tensor:
    return x * stop_gradient(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _gated_mlp(self, x: torch.Tensor) -> torch.Tensor:
    gate = identity_rule(self.act_fn, self.gate_proj(x))
    return self.down_proj(uniform_rule(gate * self.up_proj(x), 2))


def _lrp_attention(base):
    """Wrap an attention function: uniform rule on q.k (q, k get 1/4 each) and on attn.v (v: 1/2)."""

    def attention(module, query, key, value, *args, **kwargs):
        kwargs["dropout"] = 0.0
        return base(module, uniform_rule(query, 4), uniform_rule(key, 4), uniform_rule(value, 2),
                    *args, **kwargs)

    return attention


def register_attention(name: str, fn: Callable, mask_base: str) -> str:
    """Register attention function ``fn`` under ``name`` (once), with the mask of ``mask_base``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, fn)
        # Without a mask function under the same name transformers builds no mask at all.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


def base_attention(adapter: Adapter, base: str) -> Callable:
    """The architecture's own eager attention, or a registered implementation such as sdpa."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return adapter.module().eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]


def _configs(model: nn.Module) -> list:
    """Every config whose attention implementation ``set_attn_implementation`` may change."""
    found, todo = {}, [model.config]
    todo += [m.config for m in model.modules() if m is not model and hasattr(m, "set_attn_implementation")]
    while todo:
        cfg = todo.pop()
        if id(cfg) not in found:
            found[id(cfg)] = cfg
            todo += [sub for key in getattr(cfg, "sub_configs", {}) if (sub := getattr(cfg, key, None)) is not None]
    return list(found.values())


@contextlib.contextmanager
def set_attention(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention implementation; restore every (sub-)config exactly.

    Example:
        >>> with set_attention(model, "eager"):
        ...     out = model(ids)
    """
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in _configs(model)]
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        # Written back directly: calling set_attn_implementation(old) would not restore
        # sub-configs that held different values, and re-runs its checks.
        for cfg, value in saved:
            cfg._attn_implementation_internal = value


_MISSING = object()


def _override(mod: nn.Module, attr: str, fn: Callable) -> tuple[nn.Module, str, object]:
    """Bind ``fn`` as ``mod.<attr>`` on the instance; return what to put back.

    accelerate keeps its device hook in the instance ``forward`` (a wrapper calling
    ``mod._old_forward``): the rule then goes into ``_old_forward``, inside the hook.
    """
    if attr == "forward" and "_hf_hook" in vars(mod) and "_old_forward" in vars(mod):
        attr = "_old_forward"
    saved = vars(mod).get(attr, _MISSING)
    # Straight into the instance dict: nn.Module.__setattr__ could route a name elsewhere.
    vars(mod)[attr] = types.MethodType(fn, mod)
    return mod, attr, saved


def _restore(mod: nn.Module, attr: str, saved: object) -> None:
    if saved is _MISSING:
        vars(mod).pop(attr, None)
    else:
        vars(mod)[attr] = saved


@contextlib.contextmanager
def patched(model: nn.Module, norm: Callable, mlp: Callable, attention: str,
            extra: Sequence[tuple[Callable[[nn.Module], bool], str, Callable]] = ()) -> Iterator[nn.Module]:
    """Override every norm and gated MLP of ``model`` (and modules matching ``extra``) and switch to a
    registered attention implementation; undo everything on exit, even on error.

    ``norm`` replaces ``forward`` (Llama-style norms) or ``_norm`` (Gemma-style) per the adapter.
    Whatever the instances held under those names before (accelerate's hook wrappers, anyone's
    override) is put back as it was, and hooks registered with ``register_forward_hook`` and kin
    keep running, since they live outside these attributes.

    Example:
        >>> with patched(model, norm_rule, mlp_rule, "sdpa"):
        ...     out = model(ids)
    """
    adapter = get_adapter(model)
    module = adapter.module()
    norm_cls, mlp_cls = getattr(module, adapter.norm_class), getattr(module, adapter.mlp_class)
    norm_attr = "_norm" if adapter.norm_style == "gemma" else "forward"
    rules = [(lambda m: isinstance(m, norm_cls), norm_attr, norm), (lambda m: isinstance(m, mlp_cls), "forward", mlp),
             *extra]
    overridden: list[tuple[nn.Module, str, object]] = []
    try:
        for mod in model.modules():
            for matches, attr, fn in rules:
                if matches(mod):
                    overridden.append(_override(mod, attr, fn))
                    break
        with set_attention(model, attention):
            yield model
    finally:
        for mod, attr, saved in reversed(overridden):
            _restore(mod, attr, saved)


def attnlrp(model: nn.Module, attention: str | None = None):
    """Apply the AttnLRP rules to ``model`` for the duration of a ``with`` block.

    The forward pass (logits) is unchanged; only gradients and tangents follow the rules. On exit
    the model is restored exactly. ``attention`` picks the wrapped base implementation
    (``"eager"`` or ``"sdpa"``; default: eager if the model uses eager, else sdpa).

    Example:
        >>> with attnlrp(model):
        ...     x = model.get_input_embeddings()(ids).requires_grad_()
        ...     model(inputs_embeds=x).logits[0, -1, target].backward()
        >>> relevance = (x * x.grad).sum(-1)
    """
    adapter = get_adapter(model)
    if attention is None:
        attention = "eager" if model.config._attn_implementation == "eager" else "sdpa"
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    name = register_attention(f"agd_attnlrp_{adapter.name}_{attention}",
                              _lrp_attention(base_attention(adapter, attention)), attention)
    norm = _gemma_norm if adapter.norm_style == "gemma" else _llama_rmsnorm
    return patched(model, norm, _gated_mlp, name)
