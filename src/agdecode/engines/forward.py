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
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter, patched, register_attention
from ..models import input_device
from ..sources import KVBatch, Row, Source, left_pad


def _split(x: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*w, ...) -> the primal rows (B, 1, ...) and the tangent rows (B, w-1, ...) of each sequence."""
    v = x.unflatten(0, (-1, w))
    return v[:, :1], v[:, 1:]


def _join(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_split`."""
    return torch.cat([p, t], dim=1).flatten(0, 1)


def _norm_rows(h: torch.Tensor, eps: float, lrp: bool, w: int) -> torch.Tensor:
    p, t = _split(h, w)
    r = torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps)
    tangent = t * r
    if not lrp:  # the exact derivative of h * rsqrt(mean(h^2) + eps)
        tangent = tangent - p * r.pow(3) * (p * t).mean(-1, keepdim=True)
    return _join(p * r, tangent)


def _rules(lrp: bool, w: int):
    """The module overrides for one attribution method (AttnLRP or plain gradient), ``w`` rows per sequence."""
    fq, fk, fv, fprod = (4.0, 4.0, 2.0, 2.0) if lrp else (1.0, 1.0, 1.0, 1.0)

    def llama_norm(self, h):
        dtype = h.dtype
        return self.weight * _norm_rows(h.to(torch.float32), self.variance_epsilon, lrp, w).to(dtype)

    def gemma_norm(self, x):
        return _norm_rows(x, self.eps, lrp, w)

    def gated_mlp(self, x):
        (g0, gt), (u0, ut) = _split(self.gate_proj(x), w), _split(self.up_proj(x), w)
        a0 = self.act_fn(g0)
        if lrp:
            at = a0 / (g0 + 1e-10) * gt  # identity rule, as in rules._IdentityRule
        else:
            at = torch.func.jvp(self.act_fn, (g0.expand_as(gt),), (gt,))[1]
        return self.down_proj(_join(a0 * u0, (at * u0 + a0 * ut) / fprod))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        if softcap is not None:
            raise ValueError("attention logit soft-capping is not supported by the forward engine; "
                             "use engine='reverse'")
        n, h, t, d = query.shape
        hkv, s = key.shape[1], key.shape[2]
        g, b, r = h // hkv, n // w, w - 1
        scaling = d ** -0.5 if scaling is None else scaling
        # Grouped-query attention as plain batched matmuls without copies: the G query heads sharing
        # a key head are folded into the query axis, (B, Hkv, G*T, d) against keys (B, Hkv, S, d).
        # Each sequence's tangent rows meet only its own primal keys and values.
        (q0, qt), (k0, kt), (v0, vt) = _split(query.reshape(n, hkv, g * t, d), w), _split(key, w), _split(value, w)
        q0, k0, v0 = q0[:, 0], k0[:, 0], v0[:, 0]                                  # (B, Hkv, ., d)
        # Scales are folded into the (small) queries and outputs, never applied to the (large) scores
        # or the cached keys and values.
        q0s, qts = q0 * scaling, qt * (scaling / fq)
        if t == 1:
            # Decoding is bound by reading the KV cache: each sequence's tangent queries join its
            # primal one, so the primal keys and values are read once for all its rows.
            q = torch.cat([q0s[:, None], qts], dim=1).movedim(1, 2).flatten(2, 3)    # (B, Hkv, (1+R)G, d)
            sq = q @ k0.mT                                                          # (B, Hkv, (1+R)G, S)
            s0, ds = sq[:, :, :g], sq[:, :, g:].unflatten(2, (r, g)).movedim(2, 1)  # ds: (B, R, Hkv, G, S)
        else:
            s0, ds = q0s @ k0.mT, qts @ k0[:, None].mT                              # (B, [R,] Hkv, G*T, S)
        if attention_mask is not None:  # (B*w, 1, T, S): every row of a sequence has its primal's mask
            s0.view(b, hkv, g, t, s).add_(attention_mask[::w, :, None])
        a = torch.softmax(s0, dim=-1, dtype=torch.float32).to(query.dtype)        # (B, Hkv, G*T, S)
        ds = ds.add_((q0 * (scaling / fk))[:, None] @ kt.mT)
        # Softmax Jacobian-vector product: da = a * ds - a * sum(a * ds), in two passes.
        da = a[:, None] * ds
        da = da.addcmul_(a[:, None], da.sum(-1, keepdim=True), value=-1.0)       # (B, R, Hkv, G*T, S)
        if t == 1:
            o = torch.cat([a[:, None], da], dim=1).movedim(1, 2).flatten(2, 3) @ v0  # (B, Hkv, (1+R)G, d)
            o0, ot = o[:, :, :g], o[:, :, g:].unflatten(2, (r, g)).movedim(2, 1)
        else:
            o0, ot = a @ v0, da @ v0[:, None]
        out = _join(o0[:, None], ot + (a[:, None] @ vt) / fv)                     # (B*w, Hkv, G*T, d)
        return out.view(n, h, t, d).transpose(1, 2).contiguous(), None

    return llama_norm, gemma_norm, gated_mlp, attention


def _primal_bias(w: int):
    def forward(self, x):
        out = F.linear(x, self.weight)
        out.unflatten(0, (-1, w))[:, 0] += self.bias  # a constant has no tangent
        return out

    return forward


def dual_mode(model: nn.Module, attribution: str = "lrp", width: int = 2):
    """Context in which ``model`` runs stacked duals: each sequence owns ``width`` consecutive batch
    rows, its primal first and then one tangent per ROI.

    Example:
        >>> with dual_mode(model, width=2), torch.no_grad():
        ...     out = model(inputs_embeds=torch.cat([x, x * mask[..., None]]))
        >>> logits, roi_scores = out.logits[0, -1], out.logits[1, -1]
    """
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("final logit soft-capping is not supported by the forward engine; "
                         "use engine='reverse'")
    adapter = get_adapter(model)
    llama_norm, gemma_norm, gated_mlp, attention = _rules(attribution == "lrp", width)
    name = register_attention(f"agd_dual_{attribution}_{width}", attention, "eager")
    biased = (lambda m: isinstance(m, nn.Linear) and m.bias is not None, "forward", _primal_bias(width))
    norm = gemma_norm if adapter.norm_style == "gemma" else llama_norm
    return patched(model, norm, gated_mlp, name, extra=[biased])


def _seed_heads(engine: "ForwardEngine", layer: int):
    """A pre-hook on layer ``layer``'s ``o_proj`` adding ``w[b, r, h] * (head h's output)`` to tangent
    row r of sequence b, with ``w`` the head weights of the sequences being run.

    By linearity the logits' tangent then gains sum_h w_h J~(z <- a_h) a_h, the heads' relevance.
    """

    def hook(module, args):
        weights = engine._running_heads[:, :, layer]                   # (B, R, H)
        x = args[0].unflatten(0, (-1, engine.width))                   # (B, 1 + R, T, H * d)
        h = weights.shape[-1]
        primal = x[:, :1].unflatten(-1, (h, -1))                       # (B, 1, T, H, d)
        seed = (weights[:, :, None, :, None].to(x.dtype) * primal).flatten(-2)
        return (_join(x[:, :1], x[:, 1:] + seed),)

    return hook


class ForwardEngine(Source):
    """Forward-mode AGD through the KV cache, for a batch of sequences. Use as a context manager.

    Each sequence owns 1 + R cache rows (primal, then one tangent per ROI); its ROI weights come
    with it (:class:`~agdecode.sources.Row`), so sequences with other prompts and ROIs can join.

    Example:
        >>> with ForwardEngine(model, n_rois=1) as eng:
        ...     logits = eng.prefill([Row(ids, token_weights=mask[None])])    # (1, V)
        ...     top = logits.topk(5).indices                                  # (1, 5)
        ...     eng.scores(top, torch.tensor([0]))                            # (1, 1, 5): no extra pass
        ...     logits = eng.step(logits.argmax(-1))
    """

    def __init__(self, model: nn.Module, n_rois: int = 1, attribution: str = "lrp", heads: bool = False,
                 prefill_chunk: int | None = None):
        self.model, self.attribution, self.n_rois, self.heads = model, attribution, n_rois, heads
        self.width = 1 + n_rois
        self.device = input_device(model)
        # Small chunks skip most of the causally masked score blocks (measured on CPU: 128 is
        # fastest); a GPU wants larger matmuls.
        self.kv = KVBatch(model, prefill_chunk or (512 if self.device.type == "cuda" else 128))
        self.last_scores: torch.Tensor | None = None   # (B, R, V): ROI score of every token, current position
        self.head_weights: torch.Tensor | None = None  # (B, R, L, H) of the live sequences
        self._running_heads: torch.Tensor | None = None
        self._open = False

    def __enter__(self) -> "ForwardEngine":
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self.kv.clear()
        self.head_weights = self._running_heads = None
        self._open = False

    @contextlib.contextmanager
    def _dual(self):
        """The model in dual mode for one call. Patching per call (about 3 ms on SmolLM2) leaves the
        model plain between calls, so engines of other widths, or other sources, can share it."""
        if not self._open:
            raise RuntimeError("ForwardEngine must be used inside `with engine:`")
        with contextlib.ExitStack() as stack:
            stack.enter_context(dual_mode(self.model, self.attribution, self.width))
            stack.enter_context(torch.no_grad())
            if self.heads:
                adapter = get_adapter(self.model)
                for i, layer in enumerate(adapter.layers(self.model)):
                    hook = adapter.attention_output(layer).register_forward_pre_hook(_seed_heads(self, i))
                    stack.callback(hook.remove)
            yield

    def _logits(self, out) -> torch.Tensor:
        logits = out.logits[:, -1].unflatten(0, (-1, self.width))       # (B, 1 + R, V)
        self.last_scores = logits[:, 1:]
        return logits[:, 0]

    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        with self._dual():
            return self._prefill(rows)

    def _prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        ids, mask = left_pad([r.input_ids.to(self.device) for r in rows])          # (n, T)
        weights, _ = left_pad([r.token_weights.float().to(self.device) for r in rows])  # (n, R, T)
        x = self.model.get_input_embeddings()(ids)                                  # (n, T, D)
        tangents = x[:, None] * weights[..., None].to(x.dtype)                       # (n, R, T, D)
        stacked = _join(x[:, None], tangents)                                        # (n(1+R), T, D)
        if self.heads:
            new = torch.stack([r.head_weights.to(self.device) for r in rows])       # (n, R, L, H)
            self._running_heads = new
        out = self.kv.prefill(stacked, mask.repeat_interleave(self.width, 0))
        if self.heads:
            self.head_weights = new if self.head_weights is None else torch.cat([self.head_weights, new])
            self._running_heads = self.head_weights
        old = self.last_scores if len(self.kv) > len(rows) * self.width else None
        logits = self._logits(out)
        if old is not None:  # joined a running batch: the others keep their current scores
            self.last_scores = torch.cat([old, self.last_scores])
        return logits

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        with self._dual():
            e = self.model.get_input_embeddings()(token_ids.to(self.device)[:, None])  # (B, 1, D)
            # Generated tokens are outside the ROI: they enter with zero tangent.
            stacked = _join(e[:, None], e.new_zeros(len(e), self.n_rois, *e.shape[1:]))
            return self._logits(self.kv.step(stacked))

    def keep(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        w = self.width
        self.kv.keep((index[:, None] * w + torch.arange(w, device=self.device)).flatten())
        if self.head_weights is not None:
            self.head_weights = self._running_heads = self.head_weights[index]
        if self.last_scores is not None:
            self.last_scores = self.last_scores[index]

    def scores(self, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        s = self.last_scores[index.to(self.device)]                                  # (n, R, V)
        return s.gather(2, candidates.to(self.device)[:, None].expand(-1, s.shape[1], -1))
