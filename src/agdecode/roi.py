"""Regions of interest (ROI): which prompt tokens a candidate's relevance is summed over.

A prompt is rendered once (chat template -> text -> tokens with character offsets); every ROI is
resolved against that rendering to a boolean mask over prompt positions. Message content is found
in the rendered text, so chat-template tokens (``<|im_start|>system\\n`` ...) are never part of a
message ROI.

ROI specs (strings or :class:`ROI` objects):

=====================  =========================================================
``"system"``           content tokens of the system message(s) (the default)
``"user"``, ...        content tokens of every message with that role
``"message:2"``        content tokens of message 2 (0-based; negative counts from the end)
``"chars:10-42"``      tokens overlapping characters [10, 42) of the rendered prompt
``"tokens:3,5-9"``     explicit token positions (ranges inclusive)
``"context"``          every document passed with ``documents=`` (title and text)
``"document:2"``       document 2 (1-based, as rendered: ``Document [2](Title: ...)``)
``"heads:parametric"`` attention heads: a shipped set (``parametric``, ``in-context``)
``"heads:FILE.json"``  ... a set written by ``agd heads discover``
``"heads:3.1,4.5"``    ... explicit ``layer.head`` pairs (0-based)
=====================  =========================================================

ROIs combine: ``"context - user"`` scores S(context) - S(user) (signed sum of the two);
``"system + document:1"`` adds them; ``"system | user"`` is the set union (a token in both counts once).
Several ROIs given as a list are scored separately (the first one decides).

Documents are rendered into the last user message, before its content, in the format of
Liu et al. (2023, "Lost in the Middle")::

    Document [1](Title: {title}) {text}

    Document [2](Title: {title}) {text}

    {user content}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Prompt", "ROI", "ROIError", "Region", "render_documents", "render_prompt", "resolve_region", "resolve_roi"]

ROLES = ("system", "user", "assistant", "tool")


class ROIError(ValueError):
    """A region of interest that cannot be resolved against the prompt."""


@dataclass
class Prompt:
    """A rendered prompt: its text, token ids, per-token character offsets and message spans."""

    text: str
    input_ids: torch.Tensor  # (1, T)
    offsets: list[tuple[int, int]]
    messages: list[dict] | None = None
    message_spans: list[tuple[int, int]] = field(default_factory=list)  # char span of each message's content
    document_spans: list[tuple[int, int]] = field(default_factory=list)  # char span of each document (title + text)

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    def tokens_in_chars(self, start: int, end: int) -> torch.Tensor:
        """Boolean mask of the tokens overlapping characters [start, end)."""
        return torch.tensor([s < end and e > start for s, e in self.offsets], dtype=torch.bool)


def render_documents(documents: Sequence[dict], content: str) -> tuple[str, list[tuple[int, int]]]:
    """Put ``documents`` before ``content``; return the text and each document's (title + text) span.

    Example:
        >>> render_documents([{"title": "Paris", "text": "Capital of France."}], "Where is Paris?")[0]
        'Document [1](Title: Paris) Capital of France.\n\nWhere is Paris?'
    """
    parts, spans, pos = [], [], 0
    for i, d in enumerate(documents, 1):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise ROIError(f"document {i} must be a dict with a string 'text' (and optionally 'title'), got {d!r}.")
        head = f"Document [{i}](Title: "
        body = f"{d.get('title', '')}) {d['text']}".strip()
        spans.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body + "\n\n")
        pos += len(parts[-1])
    return "".join(parts) + content, spans


def render_prompt(tokenizer, messages: list[dict] | str, add_generation_prompt: bool = True,
                  documents: Sequence[dict] | None = None, chat_template_kwargs: dict | None = None) -> Prompt:
    """Render chat ``messages`` (or a raw string) with the tokenizer's chat template and tokenise it.

    ``documents`` (``[{"title", "text"}, ...]``) are rendered into the last user message.
    ``chat_template_kwargs`` are the template's own options (e.g. Qwen3's ``{"enable_thinking": False}``).

    Example:
        >>> p = render_prompt(tok, [{"role": "system", "content": "Be brief."},
        ...                         {"role": "user", "content": "Hi"}])
        >>> p.text[slice(*p.message_spans[0])]
        'Be brief.'
    """
    doc_spans: list[tuple[int, int]] = []
    if isinstance(messages, str):
        text, spans, msgs = messages, [], None
        if documents:
            text, doc_spans = render_documents(documents, text)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        msgs = _check_messages(messages)
        if documents:
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if not users:
                raise ROIError("documents need a user message to go into; the messages have none.")
            doc_text, _ = render_documents(documents, msgs[users[-1]]["content"])
            msgs = [dict(m, content=doc_text) if i == users[-1] else m for i, m in enumerate(msgs)]
        if not getattr(tokenizer, "chat_template", None):
            raise ROIError(
                "This tokenizer has no chat template, so chat messages cannot be rendered; pass the "
                "prompt as a plain string and the ROI as 'chars:A-B' or 'tokens:...'.")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(chat_template_kwargs or {}))
        spans = _find_message_spans(text, msgs)
        if documents:
            # The user message's span covers documents + question: split it into the two.
            start, end = spans[users[-1]]
            question = messages[users[-1]]["content"].strip()
            spans[users[-1]] = (end - len(question), end)
            doc_spans = [(start + a, start + b) for a, b in render_documents(documents, "")[1]]
        # The template already wrote any BOS token into the text.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not enc["input_ids"]:
        raise ROIError("The prompt is empty.")
    return Prompt(text, torch.tensor([enc["input_ids"]]), [tuple(o) for o in enc["offset_mapping"]], msgs, spans,
                  doc_spans)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ROIError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts or a string.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ROIError(f"message {i} must be a dict with a 'role' and a string 'content', got {m!r}.")
    return list(messages)


def _find_message_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()  # templates commonly trim content
        start = text.find(content, cursor)
        if start < 0:
            raise ROIError(f"Message {i} ({m['role']}) was not found verbatim in the rendered chat prompt; "
                           "the chat template rewrites it. Use a 'chars:' or 'tokens:' ROI instead.")
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


@dataclass(frozen=True)
class ROI:
    """A region of interest over prompt tokens; build with the class methods or parse a string.

    Example:
        >>> ROI.role("system"); ROI.message(1); ROI.chars(0, 40); ROI.tokens([3, 4, 5])
        >>> ROI.parse("message:-1")
    """

    kind: str  # "role" | "message" | "chars" | "tokens"
    value: tuple

    @classmethod
    def role(cls, role: str) -> "ROI":
        return cls("role", (role,))

    @classmethod
    def message(cls, index: int) -> "ROI":
        return cls("message", (int(index),))

    @classmethod
    def chars(cls, start: int, end: int) -> "ROI":
        return cls("chars", (int(start), int(end)))

    @classmethod
    def tokens(cls, positions) -> "ROI":
        return cls("tokens", tuple(int(p) for p in positions))

    @classmethod
    def parse(cls, spec: "str | ROI") -> "ROI":
        if isinstance(spec, ROI):
            return spec
        if not isinstance(spec, str):
            raise ROIError(f"A ROI must be a string or ROI, got {type(spec).__name__}.")
        s = spec.strip()
        if s in ROLES:
            return cls.role(s)
        kind, _, arg = s.partition(":")
        try:
            if kind == "role" and arg:
                return cls.role(arg)
            if kind == "message":
                return cls.message(int(arg))
            if kind == "chars":
                m = re.fullmatch(r"(\d+)-(\d+)", arg)
                if m:
                    return cls.chars(int(m[1]), int(m[2]))
            if kind == "tokens":
                positions = []
                for part in arg.split(","):
                    a, _, b = part.partition("-")
                    positions += range(int(a), int(b or a) + 1)
                return cls.tokens(positions)
        except ValueError:
            pass
        raise ROIError(f"Cannot parse ROI {spec!r}; expected one of {', '.join(ROLES)}, 'message:N', "
                       "'chars:A-B' or 'tokens:I,J-K'.")

    def __str__(self) -> str:
        if self.kind == "role":
            return self.value[0]
        if self.kind == "chars":
            return f"chars:{self.value[0]}-{self.value[1]}"
        return f"{self.kind}:{','.join(map(str, self.value))}"


def resolve_roi(spec: "str | ROI", prompt: Prompt) -> torch.Tensor:
    """Resolve a ROI against a rendered prompt to a boolean mask over its tokens (shape ``(T,)``).

    Raises :class:`ROIError` when the ROI is not in the prompt or selects no token.

    Example:
        >>> mask = resolve_roi("system", render_prompt(tok, messages))
    """
    roi = ROI.parse(spec)
    n = len(prompt)
    if roi.kind in ("role", "message"):
        if prompt.messages is None:
            raise ROIError(f"ROI {str(roi)!r} needs chat messages, but the prompt is a plain string.")
        if roi.kind == "role":
            idx = [i for i, m in enumerate(prompt.messages) if m["role"] == roi.value[0]]
            if not idx:
                roles = sorted({m["role"] for m in prompt.messages})
                raise ROIError(f"ROI {str(roi)!r}: the messages have no {roi.value[0]!r} message "
                               f"(roles present: {', '.join(roles)}).")
        else:
            i = roi.value[0]
            if not -len(prompt.messages) <= i < len(prompt.messages):
                raise ROIError(f"ROI {str(roi)!r}: there are only {len(prompt.messages)} messages.")
            idx = [i % len(prompt.messages)]
        mask = torch.zeros(n, dtype=torch.bool)
        for i in idx:
            mask |= prompt.tokens_in_chars(*prompt.message_spans[i])
    elif roi.kind == "chars":
        start, end = roi.value
        if not 0 <= start < end <= len(prompt.text):
            raise ROIError(f"ROI {str(roi)!r} is not in the prompt: the rendered prompt has "
                           f"{len(prompt.text)} characters and the span must satisfy 0 <= A < B.")
        mask = prompt.tokens_in_chars(start, end)
    else:
        bad = [p for p in roi.value if not -n <= p < n]
        if bad:
            raise ROIError(f"ROI token positions {bad} are outside the prompt ({n} tokens).")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(roi.value)] = True
    if not mask.any():
        raise ROIError(f"ROI {str(roi)!r} selects no prompt token (is the message empty?).")
    return mask


# --- resolved regions: weights over tokens and heads, and ROI expressions ----------------------

@dataclass
class Region:
    """A resolved ROI: signed weights over prompt tokens ``(T,)`` and over attention heads ``(L, H)``.

    A plain ROI has weight 1 on its elements; ``"a - b"`` gives -1 on ``b``. The score of a
    candidate is ``tokens . token_relevance + sum(heads * head_relevance)``.
    """

    name: str
    tokens: torch.Tensor
    heads: torch.Tensor | None = None


_OPERATOR = re.compile(r"\s+([+\-|])\s+")


def resolve_region(spec: "str | ROI", prompt: Prompt, model=None) -> Region:
    """Resolve a ROI or ROI expression (``"context - user"``, ``"system | heads:in-context"``).

    Example:
        >>> r = resolve_region("context - user", render_prompt(tok, msgs, documents=docs))
        >>> r.tokens   # +1 on document tokens, -1 on the question
    """
    name = str(spec) if isinstance(spec, ROI) else spec.strip()
    parts = _OPERATOR.split(name) if isinstance(spec, str) else [name]
    ops, terms = ["+"] + parts[1::2], parts[0::2]
    if terms[0][:1] in ("+", "-") and len(terms[0]) > 1:  # a leading sign: "+context - user"
        ops[0], terms[0] = terms[0][0], terms[0][1:].strip()
    tokens = torch.zeros(len(prompt))
    heads = None
    for op, term in zip(ops, terms):
        t, h = _resolve_term(spec if isinstance(spec, ROI) else term, prompt, model)
        if h is not None and heads is None:
            heads = torch.zeros_like(h)
        if op == "|":
            tokens = torch.maximum(tokens, t)
            heads = torch.maximum(heads, h) if h is not None else heads
        else:
            sign = -1.0 if op == "-" else 1.0
            tokens = tokens + sign * t
            if h is not None:
                heads = heads + sign * h
    if not tokens.any() and (heads is None or not heads.any()):
        raise ROIError(f"ROI {name!r} selects nothing (its parts cancel out or are empty).")
    return Region(name, tokens, heads)


def _resolve_term(term: "str | ROI", prompt: Prompt, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(term, str) and term.startswith("heads:"):
        from .heads import head_mask

        if model is None:
            raise ROIError(f"ROI {term!r} needs the model (to know its layers and heads).")
        return torch.zeros(len(prompt)), head_mask(term[len("heads:"):], model).float()
    if isinstance(term, str) and (term == "context" or term.startswith("document:")):
        if not prompt.document_spans:
            raise ROIError(f"ROI {term!r} needs documents: pass documents=[{{'title': ..., 'text': ...}}, ...].")
        if term == "context":
            idx = range(len(prompt.document_spans))
        else:
            try:
                i = int(term.split(":", 1)[1])
            except ValueError:
                raise ROIError(f"Cannot parse ROI {term!r}; expected 'document:N' (1-based).") from None
            if not 1 <= i <= len(prompt.document_spans):
                raise ROIError(f"ROI {term!r}: there are {len(prompt.document_spans)} documents (1-based).")
            idx = [i - 1]
        mask = torch.zeros(len(prompt), dtype=torch.bool)
        for i in idx:
            mask |= prompt.tokens_in_chars(*prompt.document_spans[i])
        return mask.float(), None
    return resolve_roi(term, prompt).float(), None
