"""Forward-mode engine (the default): exact ROI scores for every vocabulary token, one pass per token.

The ROI score of candidate c is S(c) = <x * m_ROI, J~^T e_c> = <J~ (x * m_ROI), e_c>, where J~ is
the rule-modified Jacobian of the logits w.r.t. the input embeddings x; under AttnLRP it is linear.
So one Jacobian-vector product with tangent ``x * m_ROI`` yields, as the logits' tangent, S(c) for
every token c at once, at a cost independent of k.

Instead of ``torch.autograd.forward_ad`` (exact too, see :mod:`.forward_ad`, but it runs primal and
tangent as separate ops and copies weights), the tangents ride in the batch: row 0 is the primal
sequence, rows 1..R the tangents of R ROIs. Every linear map (projections, residuals, rotary
embeddings, the LM head) then serves all rows with one read of the weights, and only the
non-linear operations are rewritten below with their forward-mode rule:

- RMSNorm: tangent scaled by the primal's 1/rms (AttnLRP stops the gradient through the variance);
- gated MLP: identity rule on the activation (tangent * f(g)/g), uniform rule (1/2) on gate x up;
- attention: the softmax's exact derivative, uniform rule on q.k (1/4 each) and attn.v (1/2);
- biases: added to the primal row only (a constant has no tangent).

Tangent keys and values sit in the KV cache beside the primal ones, so each decode step is one
incremental pass; generated tokens are outside the ROI and enter with zero tangent. With
``attribution="ixg"`` the same machinery carries plain gradients (no rules): Input x Gradient.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter, patched, register_attention
from ..models import forward_cached


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked batch into the primal row and the tangent rows."""
    return x[:1], x[1:]


def _to_queries(x: torch.Tensor) -> torch.Tensor:
    """(R, Hkv, Q, .) -> (1, Hkv, R*Q, .): tangent rows as extra queries of the primal row."""
    return x.movedim(0, 1).flatten(1, 2)[None] if x.shape[0] > 1 else x


def _from_queries(x: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse of :func:`_to_queries`."""
    return x[0].unflatten(1, (r, -1)).movedim(1, 0) if r > 1 else x


def _norm_rows(h: torch.Tensor, eps: float, lrp: bool) -> torch.Tensor:
    p, t = _rows(h)
    r = torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps)
    tangent = t * r
    if not lrp:  # the exact derivative of h * rsqrt(mean(h^2) + eps)
        tangent = tangent - p * r.pow(3) * (p * t).mean(-1, keepdim=True)
    return torch.cat([p * r, tangent])


def _rules(lrp: bool):
    """The module overrides for one attribution method (AttnLRP or plain gradient)."""
    fq, fk, fv, fprod = (4.0, 4.0, 2.0, 2.0) if lrp else (1.0, 1.0, 1.0, 1.0)

    def llama_norm(self, h):
        dtype = h.dtype
        return self.weight * _norm_rows(h.to(torch.float32), self.variance_epsilon, lrp).to(dtype)

    def gemma_norm(self, x):
        return _norm_rows(x, self.eps, lrp)

    def gated_mlp(self, x):
        (g0, gt), (u0, ut) = _rows(self.gate_proj(x)), _rows(self.up_proj(x))
        a0 = self.act_fn(g0)
        if lrp:
            at = a0 / (g0 + 1e-10) * gt  # identity rule, as in rules._IdentityRule
        else:
            at = torch.func.jvp(self.act_fn, (g0.expand_as(gt),), (gt,))[1]
        return self.down_proj(torch.cat([a0 * u0, (at * u0 + a0 * ut) / fprod]))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        if softcap is not None:
            raise ValueError("attention logit soft-capping is not supported by the forward engine; "
                             "use engine='reverse'")
        b, h, t, d = query.shape
        hkv, r = key.shape[1], b - 1
        g = h // hkv
        scaling = d ** -0.5 if scaling is None else scaling
        # Grouped-query attention as plain batched matmuls without copies: the G query heads sharing
        # a key head are folded into the query axis, (B, Hkv, G*T, d) against keys (B, Hkv, S, d).
        (q0, qt), (k0, kt), (v0, vt) = _rows(query.reshape(b, hkv, g * t, d)), _rows(key), _rows(value)
        # Scales are folded into the (small) queries and outputs, never applied to the (large) scores
        # or the cached keys and values.
        q0s, qts = q0 * scaling, qt * (scaling / fq)
        if t == 1:
            # Decoding is bound by reading the KV cache: the tangent queries join the primal one, so
            # the primal keys and values are read once for all rows.
            sq = torch.cat([q0s, _to_queries(qts)], dim=2) @ k0.mT                 # (1, Hkv, (1+R)G, S)
            s0, ds = sq[:, :, :g], _from_queries(sq[:, :, g:], r)
        else:
            s0, ds = q0s @ k0.mT, qts @ k0.mT                                      # (1|R, Hkv, G*T, S)
        if attention_mask is not None:
            s0.view(1, hkv, g, t, -1).add_(attention_mask[:1, :, None])
        a = torch.softmax(s0, dim=-1, dtype=torch.float32).to(query.dtype)
        ds = ds.add_((q0 * (scaling / fk)) @ kt.mT)
        # Softmax Jacobian-vector product: da = a * ds - a * sum(a * ds), in two passes.
        da = a * ds
        da = da.addcmul_(a, da.sum(-1, keepdim=True), value=-1.0)
        if t == 1:
            o = torch.cat([a, _to_queries(da)], dim=2) @ v0
            o0, ot = o[:, :, :g], _from_queries(o[:, :, g:], r)
        else:
            o0, ot = a @ v0, da @ v0
        out = torch.cat([o0, ot + (a @ vt) / fv])                                  # (B, Hkv, G*T, d)
        return out.view(b, h, t, d).transpose(1, 2).contiguous(), None

    return llama_norm, gemma_norm, gated_mlp, attention


def _primal_bias(self, x):
    out = F.linear(x, self.weight)
    out[:1] += self.bias
    return out


def dual_mode(model: nn.Module, attribution: str = "lrp"):
    """Context in which ``model`` runs stacked duals: batch row 0 primal, rows 1.. tangents.

    Example:
        >>> with dual_mode(model), torch.no_grad():
        ...     out = model(inputs_embeds=torch.cat([x, x * mask[..., None]]))
        >>> logits, roi_scores = out.logits[0, -1], out.logits[1, -1]
    """
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("final logit soft-capping is not supported by the forward engine; "
                                  "use engine='reverse'")
    adapter = get_adapter(model)
    llama_norm, gemma_norm, gated_mlp, attention = _rules(attribution == "lrp")
    name = register_attention(f"agd_dual_{attribution}", attention, "eager")
    biased = (lambda m: isinstance(m, nn.Linear) and m.bias is not None, "forward", _primal_bias)
    norm = gemma_norm if adapter.norm_style == "gemma" else llama_norm
    return patched(model, norm, gated_mlp, name, extra=[biased])


def _seed_heads(weights: torch.Tensor):
    """A pre-hook on ``o_proj`` adding ``weights[r, h] * (head h's output)`` to tangent row r.

    By linearity the logits' tangent then gains sum_h w_h J~(z <- a_h) a_h, the heads' relevance.
    """

    def hook(module, args):
        x = args[0]                                        # (1 + R, T, H * d)
        r, h = weights.shape
        primal = x[:1].unflatten(-1, (h, -1))              # (1, T, H, d)
        seed = (weights[:, None, :, None].to(x.dtype) * primal).flatten(-2)
        return (torch.cat([x[:1], x[1:] + seed]),)

    return hook


class ForwardEngine:
    """Forward-mode AGD through the KV cache. Use as a context manager around one generation.

    Example:
        >>> with ForwardEngine(model, roi_mask[None], "lrp") as eng:
        ...     logits = eng.prefill(ids)
        ...     eng.roi_scores(logits.topk(5).indices)    # (1, 5): no extra pass
        ...     logits = eng.step(int(logits.argmax()))
    """

    def __init__(self, model: nn.Module, token_weights: torch.Tensor, attribution: str = "lrp",
                 head_weights: torch.Tensor | None = None, prefill_chunk: int | None = None):
        self.model, self.attribution = model, attribution
        self.token_weights = token_weights.float()  # (R, T_prompt)
        self.head_weights = head_weights        # (R, L, H) or None
        self.device = next(model.parameters()).device
        # Small chunks skip most of the causally masked score blocks (measured on CPU: 128 is
        # fastest); a GPU wants larger matmuls.
        self.prefill_chunk = prefill_chunk or (512 if self.device.type == "cuda" else 128)
        self.cache = None
        self.scores: torch.Tensor | None = None  # (n_roi, V): ROI score of every token at the current position
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "ForwardEngine":
        stack = contextlib.ExitStack()
        stack.enter_context(dual_mode(self.model, self.attribution))
        stack.enter_context(torch.no_grad())
        if self.head_weights is not None:
            adapter = get_adapter(self.model)
            for layer, w in zip(adapter.layers(self.model), self.head_weights.unbind(1)):
                if w.any():
                    hook = layer.self_attn.o_proj.register_forward_pre_hook(_seed_heads(w.to(self.device)))
                    stack.callback(hook.remove)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self.cache = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        if self._stack is None:
            raise RuntimeError("ForwardEngine must be used inside `with engine:`")
        out, self.cache = forward_cached(self.model, self.cache, inputs_embeds=embeds, logits_to_keep=1)
        self.scores = out.logits[1:, -1]
        return out.logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.get_input_embeddings()(input_ids.to(self.device))            # (1, T, D)
        tangents = x * self.token_weights.to(self.device, x.dtype)[..., None]       # (R, T, D)
        stacked = torch.cat([x, tangents])
        self.cache = None
        # Chunked prefill bounds the attention matrices (and their tangents) to chunk x T.
        for start in range(0, stacked.shape[1], self.prefill_chunk):
            logits = self._run(stacked[:, start:start + self.prefill_chunk])
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        e = self.model.get_input_embeddings()(torch.tensor([[token_id]], device=self.device))
        return self._run(torch.cat([e, e.new_zeros(len(self.token_weights), *e.shape[1:])]))

    def roi_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        return self.scores[:, candidates.to(self.scores.device)]
