"""The AttnLRP rules applied to a model (autograd), and the context managers that apply any rules.

Which module of each architecture gets which rule is data (:mod:`agdecode.architectures`, one spec
per family). Nothing global is patched: module instances get a ``forward`` (or ``_norm``) override
and the model switches to a registered attention function; leaving :func:`attnlrp` puts back exactly
what each instance held before (or nothing) and the attention implementation, so the model is
bit-identical to before. Modules dispatched by accelerate keep their device hooks: the rule replaces
the hooked ``_old_forward``, so the hook still moves inputs and loads offloaded weights around it.
Packed quantised weights (bitsandbytes and kin) are refused, never read as if they were plain.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import Spec, UnsupportedArchitectureError, get_spec, layout
from .architectures.spec import MLP, Norm
from .errors import AgdError, QuantizedWeightsError
from .rules import (GATE_SHARE, KEY_SHARE, QUERY_SHARE, VALUE_SHARE, identity_rule, stop_gradient,
                    uniform_rule)

__all__ = ["decoder_layers", "final_norm", "attnlrp", "patched", "overridden",
           "UnsupportedArchitectureError", "QuantizedWeightsError"]

def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order (from the architecture's spec; an unmapped architecture with the
    common layout works too).

    Example:
        >>> block = decoder_layers(model)[10]
    """
    return layout(model).layers(model)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the LM head (DoLa's early exits go through it).

    Example:
        >>> h = final_norm(model)(hidden_states[5])
    """
    return layout(model).final_norm(model)


# --- the autograd rules applied to each module kind ---------------------------------------------

def _rms_rule(norm: Norm) -> Callable:
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * stop_gradient(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + getattr(self, norm.eps)))
        return (self.weight * h).to(dtype) if norm.weight_in_float32 else self.weight * h.to(dtype)

    return forward


def _gemma_rule(norm: Norm) -> Callable:
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * stop_gradient(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(self, norm.eps)))

    return _norm


def _layer_norm_rule(norm: Norm) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LXT's LayerNorm rule: the standard deviation is a constant (stop-gradient); the centering
        # x - mean(x) is linear and keeps its gradient. (Detaching the mean too is off the reference
        # GPT-2 relevances by up to 16 % of their scale; this matches them exactly.)
        h = x.float()
        centred = h - h.mean(-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + getattr(self, norm.eps))
        y = (centred / stop_gradient(std)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        # The value exactly as nn.LayerNorm computes it (the formula above differs in the last bits),
        # the gradient and tangent of the rule: exact + (y - y) is exact, bit for bit.
        exact = F.layer_norm(x.detach(), self.normalized_shape, self.weight, self.bias, getattr(self, norm.eps))
        return exact.detach() + (y - stop_gradient(y))

    return forward


def _gated_rule(mlp: MLP) -> Callable:
    gate, up = mlp.inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = identity_rule(getattr(self, mlp.act), getattr(self, gate)(x))
        return getattr(self, mlp.output)(uniform_rule(a * getattr(self, up)(x), GATE_SHARE))

    return forward


def _fused_gated_rule(mlp: MLP) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = getattr(self, mlp.inputs[0])(x).chunk(2, dim=-1)
        return getattr(self, mlp.output)(uniform_rule(u * identity_rule(getattr(self, mlp.act), g), GATE_SHARE))

    return forward


def _plain_rule(mlp: MLP) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, mlp.output)(identity_rule(getattr(self, mlp.act), getattr(self, mlp.inputs[0])(x)))

    return forward


NORM_RULES = {"rms": _rms_rule, "rms-gemma": _gemma_rule, "layer": _layer_norm_rule}
MLP_RULES = {"gated": _gated_rule, "fused-gated": _fused_gated_rule, "plain": _plain_rule}


def _lrp_attention(base):
    """Wrap an attention function: uniform rule on q.k (q, k get 1/4 each) and on attn.v (v: 1/2)."""

    def attention(module, query, key, value, *args, **kwargs):
        kwargs["dropout"] = 0.0
        return base(module, uniform_rule(query, QUERY_SHARE), uniform_rule(key, KEY_SHARE),
                    uniform_rule(value, VALUE_SHARE), *args, **kwargs)

    return attention


def register_attention(name: str, fn: Callable, mask_base: str) -> str:
    """Register attention function ``fn`` under ``name`` (once), with the mask of ``mask_base``."""
    # start-up: transformers' modeling_utils and masking_utils cost 1-2 s; paid when a model is patched, not on import
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # start-up, as above
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # start-up, as above

    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, fn)
        # Without a mask function under the same name transformers builds no mask at all.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


def base_attention(spec: Spec, base: str) -> Callable:
    """The architecture's own eager attention, or a registered implementation such as sdpa."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # start-up: ~1.8 s, not paid on import

    return spec.eager_attention() if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]


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
def overridden(mod: nn.Module, fn: Callable, attr: str = "forward") -> Iterator[nn.Module]:
    """``fn`` bound as ``mod.<attr>`` for the ``with`` block (inside accelerate's hook, as in
    :func:`patched`); what was there before is put back on exit.

    Example:
        >>> with overridden(model.lm_head, lambda self, x: F.linear(x, self.weight[:10])):
        ...     logits = model(ids).logits          # the first 10 columns only
    """
    saved = _override(mod, attr, fn)
    try:
        yield mod
    finally:
        _restore(*saved)


def _packed(mod: nn.Module) -> str | None:
    """Why ``mod``'s own weight is not a plain floating tensor (a packed quantised layer), else None."""
    w = getattr(mod, "weight", None)
    if type(mod).__module__.split(".")[0] in ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum"):
        return f"a {type(mod).__module__.split('.')[0]} {type(mod).__name__}"
    # torch.ao's quantised layers (quantize_dynamic) keep packed params and expose weight() as a method.
    if type(mod).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")) or callable(w):
        return f"a torch.ao {type(mod).__name__}"
    if hasattr(mod, "quant_state") or hasattr(w, "quant_state"):
        return f"a {type(mod).__name__} with a quant_state"
    if isinstance(w, torch.Tensor) and not torch.is_floating_point(w):
        return f"a {w.dtype} weight in a {type(mod).__name__}"
    return None


def check_plain_weights(model: nn.Module, modules: Sequence[tuple[str, nn.Module]] = ()) -> None:
    """Refuse a quantised model, or ``(name, module)`` pairs whose weight is packed, with one line.

    The rules' overrides read ``.weight`` (norm scales, the forward engine's bias-free linear maps);
    a packed weight read as a plain tensor would give wrong numbers silently.

    Example:
        >>> check_plain_weights(model)   # raises QuantizedWeightsError for a bitsandbytes model
    """
    hint = ("load the model with plain weights instead (dequantised, e.g. "
            "load_model(path, dtype=torch.bfloat16) with no quantization_config)")
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None or quant is not None:
        method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict) else None)
        raise QuantizedWeightsError(f"The model is quantised ({method or 'quantization_config'}); attribution "
                                    f"cannot read packed weights: {hint}.")
    for name, mod in modules:
        why = _packed(mod)
        if why is not None:
            raise QuantizedWeightsError(f"Module {name!r} holds packed quantised weights ({why}); attribution "
                                        f"cannot read them: {hint}.")


Rule = tuple[Callable[[nn.Module], bool], str, Callable]


@contextlib.contextmanager
def patched(model: nn.Module, rules: Sequence[Rule], attention: str) -> Iterator[nn.Module]:
    """Give every module matching a rule ``(matches, attribute, fn)`` the override ``fn`` under that
    attribute (first matching rule wins) and switch to a registered attention implementation; undo
    everything on exit, even on error.

    Whatever the instances held under those names before (accelerate's hook wrappers, anyone's
    override) is put back as it was, and hooks registered with ``register_forward_hook`` and kin
    keep running, since they live outside these attributes. Modules with packed quantised weights
    are refused before anything is changed.

    Example:
        >>> spec = get_spec(model)
        >>> with patched(model, spec.module_rules(norm_rule, mlp_rule), "sdpa"):
        ...     out = model(ids)
    """
    chosen = []
    for name, mod in model.named_modules():
        for matches, attr, fn in rules:
            if matches(mod):
                chosen.append((name, mod, attr, fn))
                break
    check_plain_weights(model, [(name, mod) for name, mod, _, _ in chosen])
    overridden: list[tuple[nn.Module, str, object]] = []
    try:
        for _, mod, attr, fn in chosen:
            overridden.append(_override(mod, attr, fn))
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
    spec = get_spec(model)
    if attention is None:
        attention = "eager" if model.config._attn_implementation == "eager" else "sdpa"
    if attention not in ("eager", "sdpa"):
        raise AgdError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    name = register_attention(f"agd_attnlrp_{spec.name}_{attention}",
                              _lrp_attention(base_attention(spec, attention)), attention)
    rules = spec.module_rules(NORM_RULES[spec.norm.kind](spec.norm), MLP_RULES[spec.mlp.kind](spec.mlp))
    return patched(model, rules, name)
