"""Forward-mode engine (the default): exact ROI scores for every vocabulary token, one pass per token.

The ROI score of candidate c is S(c) = <x * m_ROI, J~^T e_c> = <J~ (x * m_ROI), e_c>, where J~ is
the rule-modified Jacobian of the logits w.r.t. the input embeddings x; under AttnLRP it is linear.
So one Jacobian-vector product with tangent ``x * m_ROI`` yields, as the logits' tangent, S(c) for
every token c at once, at a cost independent of k.

Instead of ``torch.autograd.forward_ad`` (exact too, see :mod:`.forward_ad`, but it runs primal and
tangent as separate ops and copies weights), the tangents ride in the batch: row 0 is the primal
sequence, rows 1..R the tangents of R ROIs. Every linear map (projections, residuals, rotary
embeddings) then serves all rows with one read of the weights, and only the non-linear operations
are rewritten below with their forward-mode rule. The tangent rows stop before the LM head: the
score of candidate c is the final tangent hidden state times c's column of the head, computed for
the k candidates only (:meth:`ForwardEngine.scores`); every token's is one product away
(``last_scores``). The rules:

- RMSNorm: tangent scaled by the primal's 1/rms (AttnLRP stops the gradient through the variance);
- LayerNorm: tangent centred, scaled by the primal's 1/std (the standard deviation is a constant);
- gated MLP (separate or fused gate/up): identity rule on the activation (tangent * f(g)/g),
  uniform rule (1/2) on gate x up; MLP without a gate: identity rule on the activation;
- attention: the softmax's exact derivative, uniform rule on q.k (1/4 each) and attn.v (1/2);
- biases (nn.Linear, Conv1D) and learned position embeddings: on the primal row only (a constant
  has no tangent).

Which module gets which override comes from the architecture's spec (:mod:`agdecode.architectures`);
the rule constants from :mod:`agdecode.rules`.

Tangent keys and values sit in the KV cache beside the primal ones, so each decode step is one
incremental pass; generated tokens are outside the ROI and enter with zero tangent. With
``attribution="ixg"`` the same machinery carries plain gradients (no rules): Input x Gradient.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import patched, register_attention
from ..architectures import get_spec, layout
from ..architectures.spec import MLP, Norm
from ..models import input_device
from ..rules import GATE_SHARE, IDENTITY_EPS, KEY_SHARE, QUERY_SHARE, VALUE_SHARE
from ..sources import KVBatch, Row, Source, drain, left_pad, prefill_groups
from ..errors import AgdError


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


def _norm_rules(lrp: bool, w: int, norm: Norm):
    """The override of this architecture's norm kind (see :mod:`agdecode.architectures.spec`)."""
    eps = norm.eps

    def rms(self, h):
        dtype = h.dtype
        y = _norm_rows(h.to(torch.float32), getattr(self, eps), lrp, w)
        return (self.weight * y).to(dtype) if norm.weight_in_float32 else self.weight * y.to(dtype)

    def rms_gemma(self, x):
        return _norm_rows(x, getattr(self, eps), lrp, w)

    def layer(self, x):
        p, t = _split(x, w)
        # The primal exactly as nn.LayerNorm computes it; the tangent with the primal's statistics.
        y0 = F.layer_norm(p, self.normalized_shape, self.weight, self.bias, getattr(self, eps))
        pf, tf = p.float(), t.float()
        inv = torch.rsqrt(pf.var(-1, unbiased=False, keepdim=True) + getattr(self, eps))
        tc = tf - tf.mean(-1, keepdim=True)  # the centering is linear: it keeps its tangent
        tangent = tc * inv                   # AttnLRP: the standard deviation is a constant
        if not lrp:  # the exact derivative through the standard deviation too
            xhat = (pf - pf.mean(-1, keepdim=True)) * inv
            tangent = tangent - xhat * inv * (xhat * tc).mean(-1, keepdim=True)
        tangent = tangent.to(x.dtype)
        return _join(y0, tangent if self.weight is None else tangent * self.weight)

    return {"rms": rms, "rms-gemma": rms_gemma, "layer": layer}[norm.kind]


def _activation_rows(act, g0: torch.Tensor, gt: torch.Tensor, lrp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An element-wise activation on primal rows ``g0`` and tangent rows ``gt``."""
    a0 = act(g0)
    if lrp:
        return a0, a0 / (g0 + IDENTITY_EPS) * gt  # identity rule, as in rules._IdentityRule
    # Element-wise, so one jvp with a tangent of ones gives f'(g0), shared by every tangent row (a jvp
    # at g0.expand_as(gt) would fail for several ROIs: forward AD refuses overlapping memory).
    return a0, torch.func.jvp(act, (g0,), (torch.ones_like(g0),))[1] * gt


def _mlp_rules(lrp: bool, w: int, mlp: MLP):
    """The override of this architecture's MLP kind."""
    fprod = GATE_SHARE if lrp else 1.0

    def gated(self, x):
        (g0, gt), (u0, ut) = (_split(getattr(self, name)(x), w) for name in mlp.inputs)
        a0, at = _activation_rows(getattr(self, mlp.act), g0, gt, lrp)
        return getattr(self, mlp.output)(_join(a0 * u0, (at * u0 + a0 * ut) / fprod))

    def fused_gated(self, x):
        p, t = _split(getattr(self, mlp.inputs[0])(x), w)
        (g0, u0), (gt, ut) = p.chunk(2, dim=-1), t.chunk(2, dim=-1)
        a0, at = _activation_rows(getattr(self, mlp.act), g0, gt, lrp)
        return getattr(self, mlp.output)(_join(u0 * a0, (at * u0 + a0 * ut) / fprod))

    def plain(self, x):
        h0, ht = _split(getattr(self, mlp.inputs[0])(x), w)
        return getattr(self, mlp.output)(_join(*_activation_rows(getattr(self, mlp.act), h0, ht, lrp)))

    return {"gated": gated, "fused-gated": fused_gated, "plain": plain}[mlp.kind]


# On a CPU, the score-sized tensors of one block of key heads of a sequence stay near this many
# bytes (about one core's L2 cache). A large fresh tensor is mapped from the OS and page-faulted in
# on every call (measured on SmolLM2: a 38 MB score matmul took 3x its arithmetic that way), while
# small blocks reuse the allocator's memory and stay in cache between the matmuls and the softmax
# that read them; batch 16, 512-token prompts: the attention took half the time. A GPU wants the
# largest kernels it can get: no blocks there.
CPU_ATTENTION_BLOCK_BYTES = 2**20


def _dual_attention(q0, qt, qk, k0, kt, v0, vt, mask, g: int, fv: float):
    """Attention of one block of sequences and key heads over several new tokens: the primal output
    and its tangents.

    ``q0`` (b, h, G*T, d) and ``qt`` (b, R, h, G*T, d) are the queries as they meet the primal keys
    (scaled, the tangent also by 1/query share), ``qk`` (b, h, G*T, d) the primal query as it meets
    the tangent keys; ``k0``/``v0`` (b, h, S, d), ``kt``/``vt`` (b, R, h, S, d); ``mask`` (b, 1, T, S)
    additive or None. Returns ``o0`` (b, h, G*T, d) and ``ot`` (b, R, h, G*T, d).
    """
    b, h, gt, _ = q0.shape
    s, t = k0.shape[2], gt // g
    s0 = q0 @ k0.mT                                                           # (b, h, G*T, S)
    if mask is not None:  # the same mask for the G query heads of a key head
        s0.view(b, h, g, t, s).add_(mask[:, :, None])
    a = torch.softmax(s0, dim=-1, dtype=torch.float32).to(q0.dtype)           # (b, h, G*T, S)
    ds = (qt @ k0[:, None].mT).add_(qk[:, None] @ kt.mT)                     # (b, R, h, G*T, S)
    # Softmax Jacobian-vector product da = a * ds - a * sum(a * ds), in place; the sum in fp32. (Applying
    # the correction to the output, (a * ds) @ v0 - sum(a * ds) * (a @ v0), saves this pass but in bf16
    # subtracts two rounded outputs that mostly cancel.)
    ads = ds.mul_(a[:, None])                                                 # (b, R, h, G*T, S)
    da = ads.addcmul_(a[:, None], ads.sum(-1, keepdim=True, dtype=torch.float32).to(a.dtype), value=-1.0)
    o0 = a @ v0                                                               # (b, h, G*T, d)
    ot = da @ v0[:, None]
    return o0, ot + (a[:, None] @ vt) / fv


def _dual_decode_attention(q, key, value, mask, w: int, scaling: float, fq: float, fk: float, fv: float):
    """Attention of one new token per row, for the whole batch at once: decoding is bound by reading
    the KV cache, so each cached key and value (primal and tangent) is read once, by one matmul.

    ``q`` (n, Hkv, G, d) with n = B*w rows (each sequence's primal, then its R tangents); ``key``/``value``
    (n, Hkv, S, d), the cache as it lies (the rows fold into the matmul's batch without a copy);
    ``mask`` (n, 1, 1, S) additive or None. Returns the output (n, Hkv, G, d).

    Row 0 of a sequence's keys meets its primal and tangent queries, rows 1..R (the tangent keys)
    the primal query: one (w*G)-row query block per cache row, the unused part of it zero.
    """
    n, hkv, g, d = q.shape
    b, r, s = n // w, w - 1, key.shape[2]
    qv = q.view(b, w, hkv, g, d)
    blocks = q.new_zeros(b, w, hkv, w * g, d)
    blocks[:, 0, :, :g] = qv[:, 0] * scaling
    blocks[:, 0, :, g:] = qv[:, 1:].movedim(1, 2).flatten(2, 3) * (scaling / fq)  # (b, Hkv, R*G, d)
    blocks[:, 1:, :, :g] = (qv[:, 0] * (scaling / fk))[:, None]
    # keys @ queries^T, then transposed: the cached keys are the matmul's plain left operand. As the
    # transposed right operand (queries @ keys^T), bf16 matmuls over the cache's strided rows take a
    # slow path (a one-off micro-benchmark, batch 16: 3.9 ms a layer against 2.0; fp32 the same either way).
    sc = (key.view(b, w, hkv, s, d) @ blocks.mT).mT.contiguous()               # (b, w, Hkv, w*G, S)
    s0 = sc[:, 0, :, :g]                                                         # (b, Hkv, G, S)
    if mask is not None:
        s0 += mask[::w]                                                          # (b, 1, 1, S)
    a = torch.softmax(s0, dim=-1, dtype=torch.float32)                           # (b, Hkv, G, S)
    # The tangent scores ds_j = qt_j . k0 + qk . kt_j, and the softmax's Jacobian-vector product
    # da_j = a * (ds_j - sum(a * ds_j)), in fp32: in bf16, subtracting the correction from the
    # (rounded) output instead cancels most of its digits.
    ds = sc[:, 0, :, g:].unflatten(2, (r, g))                                    # (b, Hkv, R, G, S)
    ads = (ds + sc[:, 1:, :, :g].movedim(1, 2)).float().mul_(a[:, :, None])
    ds.copy_(ads.sub_(ads.sum(-1, keepdim=True) * a[:, :, None]))
    # The same blocks now weigh the values: row 0 [a; da_1..R] against v0, rows j a / fv against vt_j.
    a = a.to(q.dtype)
    sc[:, 0, :, :g] = a
    sc[:, 1:, :, :g] = (a / fv)[:, None]
    sc[:, 1:, :, g:] = 0
    o = sc @ value.view(b, w, hkv, s, d)                                         # (b, w, Hkv, w*G, d)
    out = torch.empty_like(qv)                                                   # (b, w, Hkv, G, d)
    out[:, 0] = o[:, 0, :, :g]
    out[:, 1:] = o[:, 0, :, g:].unflatten(2, (r, g)).movedim(2, 1) + o[:, 1:, :, :g]
    return out.view(n, hkv, g, d)


def _attention_blocks(device: torch.device, b: int, hkv: int, head_bytes: int) -> tuple[int, int]:
    """How many sequences and key heads one block of the attention takes, out of ``b`` and ``hkv``;
    ``head_bytes``: the score-sized tensors of one (sequence, key head) pair."""
    if device.type != "cpu":  # a GPU wants the largest kernels it can get
        return b, hkv
    # One sequence per block, so its primal keys are a plain (Hkv, S, d) slice of the cache that the
    # matmuls read in place: keys of several sequences stride over their tangent rows, and a batched
    # matmul copies them first (measured when decoding still ran here: two thirds of a batch-16 decode
    # step's attention). Within it, as many key heads as fit the budget.
    return 1, min(hkv, max(1, int(CPU_ATTENTION_BLOCK_BYTES // head_bytes)))


def _attention_rule(lrp: bool, w: int):
    """Attention on stacked rows: the primal's softmax, its exact derivative for the tangents, and the
    uniform rule on q.k and attn.v."""
    fq, fk, fv = (QUERY_SHARE, KEY_SHARE, VALUE_SHARE) if lrp else (1.0, 1.0, 1.0)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        if softcap is not None:
            raise AgdError("attention logit soft-capping is not supported by the forward engine; "
                             "use engine='reverse'")
        n, h, t, d = query.shape
        hkv, s = key.shape[1], key.shape[2]
        g, b = h // hkv, n // w
        scaling = d ** -0.5 if scaling is None else scaling
        if t == 1:  # decoding: the whole batch at once, over the cache as it lies
            out = _dual_decode_attention(query.reshape(n, hkv, g, d), key, value, attention_mask, w, scaling, fq, fk, fv)
            return out.view(n, h, 1, d).transpose(1, 2), None
        # Grouped-query attention as plain batched matmuls without copies: the G query heads sharing
        # a key head are folded into the query axis, (B, Hkv, G*T, d) against keys (B, Hkv, S, d).
        # Each sequence's tangent rows meet only its own primal keys and values.
        (q0, qt), (k0, kt), (v0, vt) = _split(query.reshape(n, hkv, g * t, d), w), _split(key, w), _split(value, w)
        q0, k0, v0 = q0[:, 0], k0[:, 0], v0[:, 0]                                  # (B, Hkv, ., d)
        mask = None if attention_mask is None else attention_mask[::w]             # (B, 1, T, S): the primal's
        nb, nh = _attention_blocks(query.device, b, hkv, (2 + 2 * (w - 1)) * g * t * s * query.element_size())
        out = query.new_empty(b, w, hkv, g * t, d)
        for i in range(0, b, nb):
            for j in range(0, hkv, nh):
                sq, hd = slice(i, i + nb), slice(j, j + nh)
                # Scales go on the (small) queries, never on the (large) scores or cached keys.
                out[sq, 0, hd], out[sq, 1:, hd] = _dual_attention(
                    q0[sq, hd] * scaling, qt[sq, :, hd] * (scaling / fq), q0[sq, hd] * (scaling / fk),
                    k0[sq, hd], kt[sq, :, hd], v0[sq, hd], vt[sq, :, hd],
                    None if mask is None else mask[sq], g, fv)
        return out.view(n, h, t, d).transpose(1, 2).contiguous(), None

    return attention


def _primal_bias(w: int):
    """nn.Linear with a bias: the bias goes to the primal rows only (a constant has no tangent)."""

    def forward(self, x):
        out = F.linear(x, self.weight)
        out.unflatten(0, (-1, w))[:, 0] += self.bias
        return out

    return forward


def _primal_bias_conv1d(w: int):
    """transformers' Conv1D (GPT-2: a linear map with its weight stored transposed, ``(in, out)``)."""

    def forward(self, x):
        out = x @ self.weight
        out.unflatten(0, (-1, w))[:, 0] += self.bias
        return out

    return forward


def _primal_head(w: int, keep):
    """The LM head on the primal rows only. The tangent rows' hidden states ``(B, R, T, D)`` go to
    ``keep``: a score is the tangent of one logit, so :meth:`ForwardEngine.scores` computes it for the
    candidates alone (k columns of the head instead of the whole vocabulary; SmolLM2: the head is a
    fifth of a row's matmuls). The model's output logits then hold the primal rows ``(B, T, V)``."""

    def forward(self, x):
        p, t = _split(x, w)
        keep(t, self)
        return F.linear(p[:, 0], self.weight, self.bias)

    return forward


def _primal_positions(w: int):
    """Learned position embeddings, added inside the model: on the primal rows only."""

    def forward(self, position_ids):
        out = type(self).forward(self, position_ids)
        if out.shape[0] % w:
            raise RuntimeError("the forward engine needs position ids for every row (KVBatch passes them)")
        out.unflatten(0, (-1, w))[:, 1:] = 0
        return out

    return forward


def dual_mode(model: nn.Module, attribution: str = "lrp", width: int = 2, keep_tangents=None):
    """Context in which ``model`` runs stacked duals: each sequence owns ``width`` consecutive batch
    rows, its primal first and then one tangent per ROI.

    With ``keep_tangents`` (a callable), the LM head runs on the primal rows only and hands the
    tangent rows' final hidden states ``(B, R, T, D)`` and itself to it (see :func:`_primal_head`);
    the output logits are then the primal's ``(B, T, V)``.

    Example:
        >>> with dual_mode(model, width=2), torch.no_grad():
        ...     out = model(inputs_embeds=torch.cat([x, x * mask[..., None]]))
        >>> logits, roi_scores = out.logits[0, -1], out.logits[1, -1]
    """
    if layout(model).final_softcap(model):
        raise AgdError("final logit soft-capping is not supported by the forward engine; "
                         "use engine='reverse'")
    spec = get_spec(model)
    lrp = attribution == "lrp"
    name = register_attention(f"agd_dual_{attribution}_{width}", _attention_rule(lrp, width), "eager")
    rules = spec.module_rules(_norm_rules(lrp, width, spec.norm), _mlp_rules(lrp, width, spec.mlp))
    rules.append((lambda m: isinstance(m, nn.Linear) and m.bias is not None, "forward", _primal_bias(width)))
    rules.append((lambda m: isinstance(m, Conv1D) and m.bias is not None, "forward", _primal_bias_conv1d(width)))
    positions = spec.positions(model)
    if positions is not None:
        rules.insert(0, (lambda m: m is positions, "forward", _primal_positions(width)))
    if keep_tangents is not None:
        head = model.get_output_embeddings()
        rules.insert(0, (lambda m: m is head, "forward", _primal_head(width, keep_tangents)))
    return patched(model, rules, name)


def _seed_heads(engine: "ForwardEngine", layer: int):
    """A pre-hook on layer ``layer``'s attention output projection (``o_proj``, ``c_proj``) adding ``w[b, r, h] * (head h's output)`` to tangent
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
        self.head = model.get_output_embeddings()
        self.logits_scale = get_spec(model).logits_scale(model)  # Granite divides its logits
        # An offloaded head (accelerate) has its weight only while it runs: there the tangent logits of
        # the whole vocabulary are kept, as (B, R, V), instead of the hidden tangents (B, R, D).
        self._full_vocab = getattr(self.head, "_hf_hook", None) is not None or self.head.weight.device.type == "meta"
        self.tangents: torch.Tensor | None = None      # (B, R, D) final hidden tangents (or (B, R, V)), current position
        self.head_weights: torch.Tensor | None = None  # (B, R, L, H) of the live sequences
        self._running_heads: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None         # what the LM head handed over in the last pass
        self.prefix_cache = None                       # a PrefixCache, when prompts' prefixes are reused
        self._open = False

    def __enter__(self) -> "ForwardEngine":
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self.kv.clear()
        self.tangents = self.head_weights = self._running_heads = self._kept = None
        self._open = False

    def _keep(self, t: torch.Tensor, head: nn.Module) -> None:
        t = t[:, :, -1]                                                  # (B, R, D): the last position's
        # On the engine's device: with a device_map the head may sit on another GPU.
        self._kept = (F.linear(t, head.weight) * self.logits_scale if self._full_vocab else t).to(self.device)

    @contextlib.contextmanager
    def _dual(self):
        """The model in dual mode for one call. Patching per call (about 3 ms on SmolLM2) leaves the
        model plain between calls, so engines of other widths, or other sources, can share it."""
        if not self._open:
            raise RuntimeError("ForwardEngine must be used inside `with engine:`")
        with contextlib.ExitStack() as stack:
            stack.enter_context(dual_mode(self.model, self.attribution, self.width, self._keep))
            stack.enter_context(torch.no_grad())
            if self.heads:
                adapter = get_spec(self.model)
                for i, layer in enumerate(adapter.layers(self.model)):
                    hook = adapter.attention_output(layer).register_forward_pre_hook(_seed_heads(self, i))
                    stack.callback(hook.remove)
            yield

    @property
    def last_scores(self) -> torch.Tensor | None:
        """``(B, R, V)``: the ROI score of every vocabulary token at the current position (computed on
        demand; decoding needs only the candidates', :meth:`scores`)."""
        if self.tangents is None or self._full_vocab:
            return self.tangents
        return F.linear(self.tangents, self.head.weight.detach()) * self.logits_scale

    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        with self._dual():  # once around the whole prefill: its chunks run back to back
            return drain(self._prefill(rows, self._seeding))

    def prefill_iter(self, rows: Sequence[Row]) -> Iterator[None]:
        """The prefill chunk by chunk (:meth:`Source.prefill_iter`): the model is patched around each
        chunk only, so the live sequences can decode between two chunks of a long prompt."""
        return self._prefill(rows, self._chunk)

    @contextlib.contextmanager
    def _seeding(self, heads: torch.Tensor | None):
        # The head ROIs seeded in a prefill chunk are the joining sequences', not the live batch's.
        live, self._running_heads = self._running_heads, heads
        try:
            yield
        finally:
            self._running_heads = live

    @contextlib.contextmanager
    def _chunk(self, heads: torch.Tensor | None):
        with self._dual(), self._seeding(heads):
            yield

    def use_prefix_cache(self, cache) -> None:
        self.prefix_cache = cache

    def _space(self) -> tuple:
        """What a reused prefix must share besides its tokens and ROI weights (see agdecode.prefix_cache)."""
        emb = self.model.get_input_embeddings().weight
        # The weights' in-place versions: a fine-tuning step between two prefills makes old entries stale.
        versions = sum(p._version for p in self.model.parameters())
        return ("forward", self.width, self.attribution, self.heads, str(emb.dtype), id(self.model),
                getattr(self.model.config, "_name_or_path", ""), self.kv.prefill_chunk,
                self.model.config._attn_implementation, versions)

    def _groups(self, rows: Sequence[Row], space: tuple | None) -> Iterator[tuple[slice, tuple | None]]:
        """Prefill groups, each with the prefix it reuses (None: none). Consumed one by one by the prefill,
        which keeps each group's prompts before the next is looked up: a batch of conversations with one
        system prompt computes it once."""
        groups = prefill_groups(self.device, len(rows))
        if self.prefix_cache is None:
            yield from ((g, None) for g in groups)
            return

        def lookup(r: Row) -> tuple | None:
            return self.prefix_cache.lookup(space, r.input_ids, r.token_weights, r.head_weights, self.kv.prefill_chunk)

        if all(g.stop - g.start == 1 for g in groups):  # one prompt per pass (a CPU)
            yield from ((g, lookup(rows[g.start])) for g in groups)
        else:  # a GPU's one padded group: prompts with a cached prefix leave it and run alone
            found, start = [lookup(r) for r in rows], 0
            for i, hit in enumerate(found + [None]):  # runs of misses between hits keep one group each
                if hit is not None or i == len(rows):
                    yield from ((slice(start + g.start, start + g.stop), None)
                                for g in prefill_groups(self.device, i - start))
                    if i < len(rows):
                        yield slice(i, i + 1), hit
                    start = i + 1

    def _store(self, rows: Sequence[Row], part, space: tuple) -> None:
        """Keep each prompt's keys and values (its own columns of the left-padded group) in the prefix cache."""
        cache, mask = part
        w = self.width
        for j, r in enumerate(rows):
            pad = mask.shape[1] - len(r.input_ids)
            rows_j = slice(j * w, (j + 1) * w)
            layers = [(lay.keys[rows_j, :, pad:], lay.values[rows_j, :, pad:]) for lay in cache.layers]
            self.prefix_cache.store(space, r.input_ids, r.token_weights, r.head_weights, layers,
                                    self.kv.prefill_chunk)

    def _prefill(self, rows: Sequence[Row], chunk_context) -> Iterator[None]:
        """The prefill as a generator (pausing between chunks and groups); returns the logits ``(n, V)``.
        ``chunk_context(heads)`` is entered around each chunk's forward."""
        parts, logits, tangents, heads = [], [], [], []
        space = self._space() if self.prefix_cache is not None else None  # once: it sums every weight's version
        for i, (group, prefix) in enumerate(self._groups(rows, space)):
            if i:
                yield
            ids, mask = left_pad([r.input_ids.to(self.device) for r in rows[group]])          # (n, T)
            weights, _ = left_pad([r.token_weights.float().to(self.device) for r in rows[group]])  # (n, R, T)
            with torch.no_grad():
                x = self.model.get_input_embeddings()(ids)                                     # (n, T, D)
            seeds = x[:, None] * weights[..., None].to(x.dtype)                                 # (n, R, T, D)
            group_heads = None
            if self.heads:
                group_heads = torch.stack([r.head_weights.to(self.device) for r in rows[group]])  # (n, R, L, H)
                heads.append(group_heads)
            out, part = yield from self.kv.run_iter(_join(x[:, None], seeds), mask.repeat_interleave(self.width, 0),
                                                    prefix, lambda: chunk_context(group_heads))
            tangents.append(self._kept)  # read at once: the run ended with this group's last chunk
            logits.append(out.logits[:, -1])                                                   # (n, V)
            if self.prefix_cache is not None:
                self._store(rows[group], part, space)
            parts.append(part)
        # The sequences join now (the live batch may have changed while they were prefilled): after it.
        joining = len(self.kv) > 0
        self.kv.merge(parts)
        self.tangents = torch.cat(([self.tangents] if joining else []) + tangents)
        if self.heads:
            self.head_weights = torch.cat(([self.head_weights] if joining else []) + heads)
            self._running_heads = self.head_weights
        return torch.cat(logits)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        with self._dual():
            e = self.model.get_input_embeddings()(token_ids.to(self.device)[:, None])  # (B, 1, D)
            # Generated tokens are outside the ROI: they enter with zero tangent.
            stacked = _join(e[:, None], e.new_zeros(len(e), self.n_rois, *e.shape[1:]))
            logits = self.kv.step(stacked).logits[:, -1]                               # (B, V)
            self.tangents = self._kept
            return logits

    def keep(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        w = self.width
        self.kv.keep((index[:, None] * w + torch.arange(w, device=self.device)).flatten())
        if self.head_weights is not None:
            self.head_weights = self._running_heads = self.head_weights[index]
        if self.tangents is not None:
            self.tangents = self.tangents[index]

    def scores(self, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t, candidates = self.tangents[index.to(self.device)], candidates.to(self.device)   # (n, R, D)
        if self._full_vocab:
            return t.gather(2, candidates[:, None].expand(-1, t.shape[1], -1))
        w = self.head.weight.detach()[candidates.to(self.head.weight.device)].to(self.device)  # (n, k, D)
        # The tangent of logit c is <t, W_c> (a bias is a constant: no tangent), in fp32.
        return (t.float() @ w.float().mT) * self.logits_scale                          # (n, R, k)
