"""Reverse-mode engine: the paper's AGD, and the oracle the forward-mode engines are checked against.

Logits come from a plain KV-cached forward (as in ``model.generate``). When scores are asked for,
the whole sequence is re-run with gradients under the attribution rules and the candidates' logits
are back-propagated in one batched call (``is_grads_batched``), giving each candidate's relevance
at every input token, ``(inputs_embeds * grad).sum(-1)``, and, for head ROIs, at every attention
head, ``(attention output projection's input * grad)`` summed over the head dimension and positions
(the projection is ``o_proj`` or ``c_proj``, as the architecture's spec says).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import overridden
from ..architectures import get_spec
from ..models import input_device
from ..sources import CachedForward, Row, left_pad
from .common import frozen, rules_for


@contextlib.contextmanager
def _with_gradients(model: nn.Module, attribution: str, heads: bool) -> Iterator[list[torch.Tensor]]:
    """The rules applied, gradients on, parameters frozen; yields the list the heads' outputs (the
    inputs of each layer's attention output projection) are collected into when ``heads``."""
    acts: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        if heads:
            adapter = get_spec(model)
            for layer in adapter.layers(model):
                h = adapter.attention_output(layer).register_forward_pre_hook(lambda mod, args: acts.append(args[0]))
                stack.callback(h.remove)
        stack.enter_context(frozen(model))
        stack.enter_context(rules_for(model, attribution))
        stack.enter_context(torch.enable_grad())
        yield acts


def _head_relevance(model: nn.Module, acts, grads, positive: bool) -> torch.Tensor:
    """Per head: (head output x its gradient), summed over positions and the head dimension ``(..., L, H)``."""
    n_heads = get_spec(model).head_shape(model)[1]
    per_layer = []
    for a, g in zip(acts, grads):
        r = (a.detach() * g).float().unflatten(-1, (n_heads, -1))                   # (..., T, H, d)
        per_layer.append((r.clamp(min=0) if positive else r).sum((-3, -1)))
    return torch.stack(per_layer, dim=-2)


def _columns(candidates: torch.Tensor):
    """An LM head forward computing only the ``candidates``' columns ``(..., k)``: the model's scaling
    and soft-capping then apply to those alone, and the backward never forms a vocabulary-sized
    gradient (in bf16 a batched backward through the full head copied its weight per candidate: 1 GiB
    each at Llama-3's vocabulary)."""

    def forward(self, x):
        c = candidates.to(self.weight.device)
        return F.linear(x, self.weight[c], None if self.bias is None else self.bias[c])

    return forward


def attribute(model: nn.Module, input_ids: torch.Tensor, candidates: torch.Tensor, attribution: str = "lrp",
              heads: bool = False, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Relevance of each candidate's logit at the last position: per token ``(n, T)`` and, with
    ``heads=True``, per attention head ``(n, layers, heads)`` (``positive=True`` keeps only the
    positive part of each element before summing, as in head discovery).

    Example:
        >>> tok_rel, head_rel = attribute(model, ids, torch.tensor([42, 7]), heads=True)
    """
    n = len(candidates)
    head = model.get_output_embeddings()
    with _with_gradients(model, attribution, heads) as acts, overridden(head, _columns(candidates)):
        x = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        z = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]         # (k,)
        if n == 1:
            grads = [g[None] for g in torch.autograd.grad(z, [x, *acts])]
        else:  # one backward for all candidates: the identity's rows as a batch of output gradients
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            grads = torch.autograd.grad(z, [x, *acts], grad_outputs=eye, is_grads_batched=True)
    token_rel = (x.detach()[None] * grads[0]).float().sum(-1)[:, 0]                   # (n, T)
    if not heads:
        return token_rel, None
    return token_rel, _head_relevance(model, [a[None] for a in acts], grads[1:], positive)[:, 0]  # (n, L, H)


def attribute_batch(model: nn.Module, seqs: Sequence[torch.Tensor], targets: torch.Tensor, attribution: str = "lrp",
                    positive: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Relevance of one target logit per sequence at its last position, for a batch of sequences
    of any lengths: per token (a list of ``(T_i,)``) and per attention head ``(B, layers, heads)``.

    The sequences are left-padded into one forward; as rows never interact, one backward of the
    sum of the targets gives each row its own gradient (padding gets none).

    Example:
        >>> tok_rel, head_rel = attribute_batch(model, [ids1, ids2], torch.tensor([42, 7]), positive=True)
    """
    device = input_device(model)
    ids, mask = left_pad([s.to(device) for s in seqs])
    with _with_gradients(model, attribution, heads=True) as acts:
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        mask = mask.to(device)
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       use_cache=False, logits_to_keep=1).logits[:, -1]                   # (B, V)
        z = logits.gather(1, targets.to(device)[:, None]).sum()
        grads = torch.autograd.grad(z, [x, *acts])
    token_rel = (x.detach() * grads[0]).float().sum(-1)                                  # (B, T)
    return [t[len(t) - len(s):] for t, s in zip(token_rel, seqs)], _head_relevance(model, acts, grads[1:], positive)


class ReverseEngine(CachedForward):
    """Plain cached logits; scores by a recompute with gradients and a batched backward per sequence.

    Keeps the per-token relevance maps of the last scoring (:meth:`relevance`) for reports.

    Example:
        >>> with ReverseEngine(model, n_rois=1) as eng:
        ...     logits = eng.prefill([Row(ids, token_weights=mask[None])])
        ...     eng.scores(logits.topk(2).indices, torch.tensor([0]))   # (1, 1, 2)
        ...     eng.relevance(0, 1)                                      # candidate 1's map over the tokens
    """

    def __init__(self, model: nn.Module, n_rois: int = 1, attribution: str = "lrp", heads: bool = False):
        super().__init__(model)
        self.attribution, self.n_rois, self.heads = attribution, n_rois, heads
        self.token_weights: list[torch.Tensor] = []         # per live sequence: (R, T_prompt)
        self.head_weights: list[torch.Tensor | None] = []   # per live sequence: (R, L, H) or None
        self._relevance: dict[int, torch.Tensor] = {}       # live sequence -> (k, T) of the last scoring

    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        self.token_weights += [r.token_weights.float() for r in rows]
        self.head_weights += [r.head_weights if self.heads else None for r in rows]
        return super().prefill(rows)

    def keep(self, index: torch.Tensor) -> None:
        order = index.tolist()
        self.token_weights = [self.token_weights[i] for i in order]
        self.head_weights = [self.head_weights[i] for i in order]
        self._relevance = {new: self._relevance[old] for new, old in enumerate(order) if old in self._relevance}
        super().keep(index)

    def scores(self, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = []
        # An oracle, not the fast path: one recompute and backward per sequence.
        for i, cands in zip(index.tolist(), candidates):
            tok_rel, head_rel = attribute(self.model, self.ids[i][None], cands, self.attribution,
                                          heads=self.head_weights[i] is not None)
            self._relevance[i] = tok_rel
            w = self.token_weights[i]
            s = w.to(tok_rel.device) @ tok_rel[:, :w.shape[1]].T                    # (R, k)
            if head_rel is not None:
                s = s + torch.einsum("rlh,nlh->rn", self.head_weights[i].to(head_rel), head_rel)
            out.append(s)
        return torch.stack(out)                                                      # (n, R, k)

    def relevance(self, i: int, j: int = 0) -> list[float] | None:
        rel = self._relevance.get(i)
        return None if rel is None else rel[j].tolist()
