"""Rendering a chat prompt once, with what every ROI is resolved against: the text, its tokens with
character offsets, and where each message's content and each document lie.

Each message's content is located structurally (after its role header, see ``_find_message_spans``),
so chat-template tokens (``<|im_start|>system\\n`` ...) are never part of a message's span, even when
the content is "system". Documents are rendered into the last user message, before its content, in
the format of Liu et al. (2023, "Lost in the Middle")::

    Document [1](Title: {title}) {text}

    Document [2](Title: {title}) {text}

    {user content}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ROIError

__all__ = ["Prompt", "render_prompt", "render_documents", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")


def _short(x, n: int = 60) -> str:
    """``repr`` cut to ``n`` characters: error messages stay one short line whatever the input."""
    r = repr(x)
    return r if len(r) <= n else r[:n - 5] + "...'"


@dataclass
class Prompt:
    """A rendered prompt: its text, token ids, per-token character offsets and message spans."""

    text: str
    input_ids: torch.Tensor  # (1, T)
    offsets: list[tuple[int, int]]
    messages: list[dict] | None = None
    message_spans: list[tuple[int, int] | None] = field(default_factory=list)  # char span of each message's content
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
    if not isinstance(documents, (list, tuple)):
        raise ROIError(f"documents must be a list of {{'title': ..., 'text': ...}} dicts, got {type(documents).__name__}.")
    parts, spans, pos = [], [], 0
    for i, d in enumerate(documents, 1):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise ROIError(f"document {i} must be a dict with a string 'text' (and optionally 'title'), got {_short(d)}.")
        head = f"Document [{i}](Title: "
        body = f"{d.get('title', '')}) {d['text']}".strip()
        spans.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body + "\n\n")
        pos += len(parts[-1])
    return "".join(parts) + content, spans


# apply_chat_template's own arguments: set by render_prompt, never by the caller's template variables.
_RESERVED_TEMPLATE_KWARGS = frozenset({"add_generation_prompt", "tokenize", "conversation", "return_dict",
                                       "return_tensors", "continue_final_message", "tools", "documents",
                                       "chat_template", "padding", "truncation", "max_length"})


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
    if documents is not None and not isinstance(documents, (list, tuple)):
        raise ROIError(f"documents must be a list of {{'title': ..., 'text': ...}} dicts, got {type(documents).__name__}.")
    if isinstance(messages, str):
        _check_text(messages, "the prompt")
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
        reserved = sorted(set(chat_template_kwargs or {}) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ROIError(f"chat_template_kwargs may not set {', '.join(reserved)}: agdecode renders the prompt "
                           "itself (text, ending with the assistant's turn); pass the template's own variables "
                           "(e.g. enable_thinking)")
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
        except Exception as e:  # the template's own raise_exception(), a sandbox violation, a type error in it
            raise ROIError(f"the tokenizer's chat template failed on these messages: {type(e).__name__}: "
                           f"{str(e)[:200]}") from None
        spans = _find_message_spans(tokenizer, text, msgs, add_generation_prompt, chat_template_kwargs)
        if documents:
            # The user message's span covers documents + question: split it into the two.
            if spans[users[-1]] is None:
                raise ROIError("The chat template rewrites the user message, so the documents cannot be located "
                               "in the prompt; put them into the message yourself and use a 'chars:' ROI.")
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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ROIError(f"message {i} must be a dict with a string 'role' and a string 'content', got {_short(m)}.")
        _check_text(m["content"], f"message {i}'s content")
    return list(messages)


def _check_text(text: str, what: str) -> None:
    """Text a tokenizer can encode: a lone surrogate (e.g. a JSON "\\ud800") is not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ROIError(f"{what} is not valid Unicode text (character {e.start}: a lone surrogate "
                       f"{text[e.start]!r}); send UTF-8 text.") from None


def _find_message_spans(tokenizer, text: str, messages: list[dict], add_generation_prompt: bool,
                        chat_template_kwargs: dict | None = None) -> list[tuple[int, int] | None]:
    """Each message's content span, located structurally: the chat is rendered once more with a unique
    marker as every message's content, which splits the template into its pieces (role headers,
    separators); the real text must be those pieces with the contents in between, so a content that
    also occurs in the template ("system", "end" in ``<|im_end|>``) is never matched there."""
    marker = "\ue000agd-message-{}\ue001"
    while any(marker.format(i) in m["content"] for i, m in enumerate(messages)):
        marker = "\ue000" + marker
    skeleton = tokenizer.apply_chat_template(
        [dict(m, content=marker.format(i)) for i, m in enumerate(messages)], tokenize=False,
        add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
    pieces, rest = [], skeleton
    for i in range(len(messages)):
        before, found, rest = rest.partition(marker.format(i))
        if not found:
            return [None] * len(messages)
        pieces.append(before)
    pieces.append(rest)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if not text.startswith(pieces[i], pos):
            break
        pos += len(pieces[i])
        raw, content = m["content"], m["content"].strip()  # templates commonly trim content
        nxt = pieces[i + 1]
        if text.startswith(raw, pos) and text.startswith(nxt, pos + len(raw)):
            lead = len(raw) - len(raw.lstrip())
            spans.append((pos + lead, pos + lead + len(content)))
            pos += len(raw)
        elif text.startswith(content, pos) and text.startswith(nxt, pos + len(content)):
            spans.append((pos, pos + len(content)))
            pos += len(content)
        else:
            break
    return spans + [None] * (len(messages) - len(spans))  # None: the template rewrote it (see resolve_roi)
