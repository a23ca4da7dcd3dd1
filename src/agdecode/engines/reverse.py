"""Reverse-mode engine: the paper's AGD, and the oracle the forward-mode engine is checked against.

Logits come from a plain KV-cached forward (as in ``model.generate``). When scores are asked for,
the whole sequence is re-run with gradients under the attribution rules and the candidates' logits
are back-propagated in one batched call (``is_grads_batched``), giving each candidate's relevance
at every input token: ``(inputs_embeds * grad).sum(-1)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import forward_cached
from . import frozen, rules_for


class CachedForward:
    """Plain KV-cached next-token logits, exactly as ``model.generate`` computes them (greedy uses it).

    Example:
        >>> lm = CachedForward(model)
        >>> logits = lm.prefill(ids); logits = lm.step(int(logits.argmax()))
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.ids: torch.Tensor | None = None
        self.cache = None

    # Engines are context managers (the forward engine holds a dual level open); this one needs none.
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

    def __init__(self, model: nn.Module, roi_masks: torch.Tensor, attribution: str = "lrp"):
        super().__init__(model)
        self.attribution = attribution
        self.roi_masks = roi_masks.to(torch.bool)
        self.last_relevance: torch.Tensor | None = None

    def relevance(self, candidates: torch.Tensor) -> torch.Tensor:
        """Per-token relevance ``(n_candidates, T)`` of each candidate's logit at the last position."""
        model, n = self.model, len(candidates)
        with frozen(model), rules_for(model, self.attribution), torch.enable_grad():
            x = model.get_input_embeddings()(self.ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]
            z = logits[candidates.to(self.device)]
            if n == 1:
                (grad,) = torch.autograd.grad(z, x)
                grad = grad[None]
            else:
                eye = torch.eye(n, dtype=z.dtype, device=z.device)
                (grad,) = torch.autograd.grad(z, x, grad_outputs=eye, is_grads_batched=True)
        rel = (x.detach()[None] * grad).float().sum(-1)[:, 0]  # (n, T)
        self.last_relevance = rel
        return rel

    def roi_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        rel = self.relevance(candidates)
        t = self.roi_masks.shape[1]
        return self.roi_masks.to(rel.device, rel.dtype) @ rel[:, :t].T  # (n_roi, n)
