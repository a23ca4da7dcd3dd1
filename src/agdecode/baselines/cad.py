"""Context-aware decoding (CAD; Shi et al., 2023, arXiv 2305.14739), greedy on top.

    scores = (1 + alpha) * logits(y | full prompt) - alpha * logits(y | prompt without the ROI)

For instruction following the ROI is the instruction (the system message), for open-book QA the
documents. This is classifier-free guidance with ``guidance_scale = 1 + alpha`` and the prompt
without the ROI as the negative prompt (transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
computes the same for one sequence). Here the negative prompt rides in the same batch as the full
one: each sequence owns two cache rows, so a batch of conversations runs CAD in one forward per
token. The combination is of *log-softmaxes*, ``(1 + alpha) * log p_full - alpha * log p_free``, as
in HF's processor; per distribution it differs from CAD's raw-logit formula by a constant, so the
softmax and the argmax are identical (``tests/test_baselines.py`` checks against two plain
forwards in raw-logit form). With ``alpha = 0`` it is ``log_softmax(logits)``: greedy exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..prompt import Prompt, render_prompt
from ..roi import ROI, ROIError, parse_expression, resolve_region, resolve_roi
from ..sources import CachedForward

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


class CADSource(CachedForward):
    """Next-token CAD scores for a batch: each sequence owns two cache rows, the full prompt and the
    prompt without its ROI (``Row.negative_ids``); both receive every generated token.

    Example:
        >>> with CADSource(model, alpha=0.5) as src:
        ...     scores = src.prefill([Row(prompt.input_ids[0], negative_ids=context_free_prompt(tok, prompt, "system")[0])])
        ...     src.info(0)
    """

    width = 2

    def __init__(self, model: nn.Module, alpha: float = 0.5):
        super().__init__(model)
        self.alpha = float(alpha)
        self._tops: torch.Tensor | None = None  # (B, 2): the full and the ROI-free prompt's top tokens

    def _rows(self, rows) -> list[torch.Tensor]:
        return [t for r in rows for t in (r.input_ids, r.negative_ids)]

    def _logits(self, out, start: int) -> torch.Tensor:
        full, free = out.logits[:, -1].float().unflatten(0, (-1, 2)).unbind(1)   # (B, V) each
        tops = torch.stack([full.argmax(-1), free.argmax(-1)], dim=1)
        self._tops = torch.cat([self._tops[:start], tops]) if start else tops
        # What HF's classifier-free guidance processor computes with guidance_scale = 1 + alpha.
        return (1 + self.alpha) * torch.log_softmax(full, -1) - self.alpha * torch.log_softmax(free, -1)

    def keep(self, index: torch.Tensor) -> None:
        super().keep(index)
        self._tops = self._tops[index.to(self._tops.device)]

    def info(self, i: int) -> dict:
        """The full prompt's own top token and the one without the ROI."""
        return {"model_top": int(self._tops[i, 0]), "context_free_top": int(self._tops[i, 1])}

    def describe(self) -> dict:
        return {"alpha": self.alpha, "guidance_scale": 1.0 + self.alpha}
