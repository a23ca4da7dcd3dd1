"""Context-aware decoding (CAD; Shi et al., 2023, arXiv 2305.14739), greedy on top.

    scores = (1 + alpha) * logits(y | full prompt) - alpha * logits(y | prompt without the ROI)

For instruction following the ROI is the instruction (the system message), for open-book QA the
documents. This is classifier-free guidance with ``guidance_scale = 1 + alpha`` and the prompt
without the ROI as the negative prompt, which transformers implements as
``UnbatchedClassifierFreeGuidanceLogitsProcessor``; this module runs that processor next to the
plain cached forward of the full prompt rather than a second hand-written loop.

What was checked about the processor (transformers 5.24): it combines *log-softmaxes*,
``(1 + alpha) * log p_full - alpha * log p_free``, not raw logits. Per distribution the two differ
by a constant, so the softmax and the argmax are identical to CAD's raw-logit formula
(``tests/test_baselines.py`` checks against two plain forwards in raw-logit form). With
``alpha = 0`` it returns ``log_softmax(logits)`` without running the negative branch, so greedy is
reproduced exactly. It calls the model outside any ``no_grad`` of its own, so it must run under
``torch.no_grad()`` (as ``model.generate`` does), else it builds an autograd graph every step. Its
first pass over the negative prompt computes logits for every position (no ``logits_to_keep``):
an extra ``T x V`` float tensor once per generation, noticeable only for long documents and
large vocabularies.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from ..engines.reverse import CachedForward
from ..roi import ROI, Prompt, ROIError, parse_expression, render_prompt, resolve_region, resolve_roi

__all__ = ["CADSource", "context_free_prompt"]

def context_free_prompt(tokenizer, prompt: Prompt, roi: "str | ROI", messages: list[dict] | None = None,
                        documents: Sequence[dict] | None = None) -> torch.Tensor:
    """The prompt without the ROI ``(1, T')``: what CAD contrasts the full prompt with.

    Message ROIs (``"system"``, ``"user"``, ``"message:N"``) drop those messages and render the
    chat again, so the model sees a well-formed conversation without them (a template may then
    insert its default system message, as SmolLM2's does: that is what the model sees without
    one). ``"context"``/``"document:N"`` render the chat again without those documents when the
    original ``messages`` and ``documents`` are given (what ``generate(documents=...)`` passes).
    Any other ROI over tokens (``"chars:"``, ``"tokens:"``, expressions, documents without the
    originals) drops the ROI's tokens from the rendered prompt.

    Example:
        >>> p = render_prompt(tok, [{"role": "system", "content": "Answer in French."},
        ...                         {"role": "user", "content": "Hi"}])
        >>> tok.decode(context_free_prompt(tok, p, "system")[0])   # the chat with only the user turn
    """
    expr = parse_expression(roi)
    name = str(roi) if isinstance(roi, ROI) else roi.strip()
    if any(t.roi.kind == "heads" for t in expr):
        raise ROIError(f"CAD with ROI {name!r}: CAD leaves part of the prompt out, and attention heads are not "
                       "part of the prompt; use a token ROI (system, context, chars:...).")
    single = expr[0].roi if len(expr) == 1 else None
    if single is not None and single.kind in ("context", "document") and documents and messages is not None:
        resolve_roi(single, prompt)  # the usual ROIError for a document that is not there
        kept = [] if single.kind == "context" else [d for i, d in enumerate(documents, 1) if i != single.value[0]]
        return render_prompt(tokenizer, messages, documents=kept or None).input_ids
    if single is not None and single.kind in ("role", "message"):
        resolve_roi(single, prompt)  # the usual ROIError when the message is not in the prompt
        n = len(prompt.messages)
        if single.kind == "role":
            drop = {i for i, m in enumerate(prompt.messages) if m["role"] == single.value[0]}
        else:
            drop = {single.value[0] % n}
        kept = [m for i, m in enumerate(prompt.messages) if i not in drop]
        if not kept:
            raise ROIError(f"CAD with ROI {name!r}: leaving the ROI out leaves no message to contrast with.")
        return render_prompt(tokenizer, kept).input_ids
    mask = resolve_region(roi, prompt).tokens > 0
    ids = prompt.input_ids[:, ~mask]
    if ids.shape[1] == 0:
        raise ROIError(f"CAD with ROI {name!r}: the ROI covers the whole prompt, nothing is left to contrast with.")
    return ids


class _CFG(UnbatchedClassifierFreeGuidanceLogitsProcessor):
    """The HF processor, keeping the negative branch's last logits for the trace."""

    last: torch.Tensor | None = None

    def get_unconditional_logits(self, input_ids):
        self.last = super().get_unconditional_logits(input_ids)
        return self.last


class CADSource(CachedForward):
    """Next-token CAD scores: the full prompt's cached forward, contrasted by HF's CFG processor.

    Example:
        >>> src = CADSource(model, context_free_prompt(tok, prompt, "system"), alpha=0.5)
        >>> scores = src.prefill(prompt.input_ids); src.info()
    """

    def __init__(self, model: nn.Module, negative_ids: torch.Tensor, alpha: float = 0.5):
        super().__init__(model)
        self.alpha = float(alpha)
        self.negative_ids = negative_ids.to(self.device)
        self.cfg: _CFG | None = None
        self._full: torch.Tensor | None = None

    @torch.no_grad()
    def _contrast(self, full: torch.Tensor) -> torch.Tensor:
        self._full = full
        return self.cfg(self.ids, full[None])[0]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The processor holds the negative branch's KV cache: a new sequence needs a new one.
        self.cfg = _CFG(1.0 + self.alpha, self.model, unconditional_ids=self.negative_ids)
        return self._contrast(super().prefill(input_ids))

    def step(self, token_id: int) -> torch.Tensor:
        return self._contrast(super().step(token_id))

    def info(self) -> dict:
        """The full prompt's own top token and the one without the ROI (absent when alpha = 0)."""
        out = {"model_top": int(self._full.argmax())}
        if self.cfg.last is not None:
            out["context_free_top"] = int(self.cfg.last[0, -1].argmax())
        return out

    def describe(self) -> dict:
        return {"alpha": self.alpha, "guidance_scale": 1.0 + self.alpha,
                "negative_prompt_ids": self.negative_ids[0].tolist()}
