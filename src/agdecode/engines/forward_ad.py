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
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import forward_cached, input_device
from ..sources import Row, Source
from .common import rules_for
from ..errors import AgdError


class _Sequence:
    """One sequence's dual-number decoding state: R copies of it, one per ROI tangent."""

    def __init__(self, model: nn.Module, token_weights: torch.Tensor, prefill_chunk: int):
        self.model, self.token_weights, self.prefill_chunk = model, token_weights.float(), prefill_chunk
        self.device = input_device(model)
        self.cache = None
        self.scores: torch.Tensor | None = None  # (R, V) ROI score of every token, current position

    def _run(self, **inputs) -> torch.Tensor:
        out, self.cache = forward_cached(self.model, self.cache, logits_to_keep=1, **inputs)
        logits, tangent = fwAD.unpack_dual(out.logits)
        self.scores = tangent[:, -1] if tangent is not None else torch.zeros_like(logits[:, -1])
        return logits[0, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        n_roi = self.token_weights.shape[0]
        ids = input_ids.to(self.device)[None]
        x = self.model.get_input_embeddings()(ids).expand(n_roi, -1, -1)       # (R, T, D)
        tangent = x * self.token_weights.to(self.device, x.dtype)[..., None]
        # Chunked prefill bounds the attention matrices (and their tangents) to chunk x T.
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            logits = self._run(inputs_embeds=fwAD.make_dual(x[:, start:end].contiguous(),
                                                             tangent[:, start:end].contiguous()))
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        ids = torch.full((self.token_weights.shape[0], 1), token_id, device=self.device)
        return self._run(input_ids=ids)  # generated tokens are outside the ROI: zero tangent


class ForwardADEngine(Source):
    """Dual-number decoding through the KV cache, one sequence at a time (a cross-check, not the fast path).

    Example:
        >>> with ForwardADEngine(model, n_rois=1) as eng:
        ...     logits = eng.prefill([Row(ids, token_weights=mask[None])])
        ...     eng.scores(logits.topk(5).indices, torch.tensor([0]))    # (1, 1, 5), no extra pass
        ...     logits = eng.step(logits.argmax(-1))
    """

    def __init__(self, model: nn.Module, n_rois: int = 1, attribution: str = "lrp", heads: bool = False,
                 prefill_chunk: int = 512):
        if heads:
            raise AgdError("engine 'forward-ad' attributes to tokens only; use 'forward' or 'reverse' for heads")
        self.model, self.attribution, self.prefill_chunk = model, attribution, prefill_chunk
        self.seqs: list[_Sequence] = []
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
        self.seqs = []  # the duals die with the level
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        if self._stack is None:
            raise RuntimeError("ForwardADEngine must be used inside `with engine:`")
        new = [_Sequence(self.model, r.token_weights, self.prefill_chunk) for r in rows]
        self.seqs += new
        return torch.stack([s.prefill(r.input_ids) for s, r in zip(new, rows)])

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([s.step(int(t)) for s, t in zip(self.seqs, token_ids)])

    def keep(self, index: torch.Tensor) -> None:
        self.seqs = [self.seqs[i] for i in index.tolist()]

    def scores(self, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.seqs[i].scores[:, c.to(self.seqs[i].scores.device)]
                            for i, c in zip(index.tolist(), candidates)])
