"""Reverse-mode engine: the paper's AGD, and the oracle the forward-mode engines are checked against.

Logits come from a plain KV-cached forward (as in ``model.generate``). When scores are asked for,
the whole sequence is re-run with gradients under the attribution rules and the candidates' logits
are back-propagated in one batched call (``is_grads_batched``), giving each candidate's relevance
at every input token, ``(inputs_embeds * grad).sum(-1)``, and, for head ROIs, at every attention
head, ``(o_proj input * grad)`` summed over the head dimension and positions.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..adapters import get_adapter
from ..models import forward_cached
from . import frozen, rules_for


def attribute(model: nn.Module, input_ids: torch.Tensor, candidates: torch.Tensor, attribution: str = "lrp",
              heads: bool = False, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Relevance of each candidate's logit at the last position: per token ``(n, T)`` and, with
    ``heads=True``, per attention head ``(n, layers, heads)`` (``positive=True`` keeps only the
    positive part of each element before summing, as in head discovery).

    Example:
        >>> tok_rel, head_rel = attribute(model, ids, torch.tensor([42, 7]), heads=True)
    """
    n = len(candidates)
    acts: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        if heads:
            for layer in get_adapter(model).layers(model):
                h = layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: acts.append(args[0]))
                stack.callback(h.remove)
        stack.enter_context(frozen(model))
        stack.enter_context(rules_for(model, attribution))
        stack.enter_context(torch.enable_grad())
        x = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        z = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1][candidates.to(x.device)]
        if n == 1:
            grads = [g[None] for g in torch.autograd.grad(z, [x, *acts])]
        else:
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            grads = torch.autograd.grad(z, [x, *acts], grad_outputs=eye, is_grads_batched=True)
    token_rel = (x.detach()[None] * grads[0]).float().sum(-1)[:, 0]  # (n, T)
    if not heads:
        return token_rel, None
    n_heads = get_adapter(model).head_shape(model)[1]
    per_layer = []
    for a, g in zip(acts, grads[1:]):
        r = (a.detach()[None] * g).float().view(n, a.shape[1], n_heads, -1)  # (n, T, H, d)
        if positive:
            r = r.clamp(min=0)
        per_layer.append(r.sum((1, 3)))
    return token_rel, torch.stack(per_layer, dim=1)  # (n, L, H)


class CachedForward:
    """Plain KV-cached next-token logits, exactly as ``model.generate`` computes them (greedy uses it).

    Example:
        >>> with CachedForward(model) as lm:
        ...     logits = lm.prefill(ids); logits = lm.step(int(logits.argmax()))
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.ids: torch.Tensor | None = None
        self.cache = None

    # Engines are context managers (the forward engine holds module overrides); this one needs none.
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.cache = None

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, self.cache = forward_cached(self.model, self.cache, input_ids=ids.to(self.device), logits_to_keep=1)
        return out.logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.ids, self.cache = input_ids.to(self.device), None
        return self._forward(self.ids)

    def step(self, token_id: int) -> torch.Tensor:
        new = torch.tensor([[token_id]], device=self.device)
        self.ids = torch.cat([self.ids, new], dim=1)
        return self._forward(new)


class ReverseEngine(CachedForward):
    """Per-step recompute + batched backward. Also keeps the last per-token relevance maps.

    Example:
        >>> eng = ReverseEngine(model, roi_mask[None], "lrp")
        >>> logits = eng.prefill(ids)
        >>> eng.roi_scores(logits.topk(2).indices)   # (1, 2)
        >>> eng.last_relevance.shape                 # (2, T)
    """

    def __init__(self, model: nn.Module, token_weights: torch.Tensor, attribution: str = "lrp",
                 head_weights: torch.Tensor | None = None):
        super().__init__(model)
        self.attribution = attribution
        self.token_weights = token_weights.float()          # (R, T_prompt)
        self.head_weights = head_weights                # (R, L, H) or None
        self.last_relevance: torch.Tensor | None = None

    def roi_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        tok_rel, head_rel = attribute(self.model, self.ids, candidates, self.attribution,
                                      heads=self.head_weights is not None)
        self.last_relevance = tok_rel
        t = self.token_weights.shape[1]
        scores = self.token_weights.to(tok_rel.device) @ tok_rel[:, :t].T  # (R, n)
        if head_rel is not None:
            scores = scores + torch.einsum("rlh,nlh->rn", self.head_weights.to(head_rel), head_rel)
        return scores
