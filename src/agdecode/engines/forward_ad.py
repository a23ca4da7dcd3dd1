"""Forward mode with ``torch.autograd.forward_ad``: the rules' own ``jvp`` methods, as a cross-check.

Exact, but slow on CPU: PyTorch's forward-mode formula for ``linear`` copies the weight on every
call, so a decode step costs several plain steps. :mod:`agdecode.engines.forward` computes the same
numbers with primal and tangents stacked in one batch and is the default.

The ROI score of candidate c is S(c) = <x * m_ROI, J~^T e_c> = <J~ (x * m_ROI), e_c>, where J~ is
the rule-modified (hence linear) Jacobian of the logits w.r.t. the input embeddings x. So a single
Jacobian-vector product with the tangent ``x * m_ROI`` yields, as the logits' tangent, S(c) for all
c at once, at a cost independent of k. The tangents of keys and values live in the KV cache beside
their primals, so each generated token costs one incremental dual step; generated tokens are
outside the ROI and enter with zero tangent. Several ROIs run as a batch of tangents (the batch
dimension holds one copy of the sequence per ROI).

Forward-mode AD needs attention written in differentiable primitives: the rules wrap ``sdpa`` and
the math kernel is forced (the fused CPU/CUDA kernels have no forward-mode derivative).
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import forward_cached
from . import rules_for


class ForwardADEngine:
    """Dual-number decoding through the KV cache. Use as a context manager around one generation.

    Example:
        >>> with ForwardADEngine(model, roi_mask[None], "lrp") as eng:
        ...     logits = eng.prefill(ids)
        ...     eng.roi_scores(logits.topk(5).indices)    # (1, 5), no extra pass
        ...     logits = eng.step(int(logits.argmax()))
    """

    def __init__(self, model: nn.Module, token_weights: torch.Tensor, attribution: str = "lrp",
                 head_weights: torch.Tensor | None = None, prefill_chunk: int = 512):
        if head_weights is not None:
            raise ValueError("engine 'forward-ad' attributes to tokens only; use 'forward' or 'reverse' for heads")
        self.model, self.attribution = model, attribution
        self.token_weights = token_weights.float()
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.cache = None
        self.scores: torch.Tensor | None = None  # (n_roi, V) ROI score of every token, current position
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "ForwardADEngine":
        stack = contextlib.ExitStack()
        stack.enter_context(rules_for(self.model, self.attribution, attention="sdpa"))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.no_grad())
        stack.enter_context(fwAD.dual_level())
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self.cache = None  # the duals die with the level
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _run(self, **inputs) -> torch.Tensor:
        if self._stack is None:
            raise RuntimeError("ForwardADEngine must be used inside `with engine:`")
        out, self.cache = forward_cached(self.model, self.cache, logits_to_keep=1, **inputs)
        logits, tangent = fwAD.unpack_dual(out.logits)
        self.scores = tangent[:, -1] if tangent is not None else torch.zeros_like(logits[:, -1])
        return logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        n_roi, t = self.token_weights.shape
        ids = input_ids.to(self.device)
        x = self.model.get_input_embeddings()(ids).expand(n_roi, -1, -1)       # (R, T, D)
        tangent = x * self.token_weights.to(self.device, x.dtype)[..., None]
        self.cache = None
        # Chunked prefill bounds the attention matrices (and their tangents) to chunk x T.
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            logits = self._run(inputs_embeds=fwAD.make_dual(x[:, start:end].contiguous(),
                                                             tangent[:, start:end].contiguous()))
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        ids = torch.full((self.token_weights.shape[0], 1), token_id, device=self.device)
        return self._run(input_ids=ids)  # generated tokens are outside the ROI: zero tangent

    def roi_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        return self.scores[:, candidates.to(self.scores.device)]
