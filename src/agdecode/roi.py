"""Regions of interest (ROI): which prompt tokens a candidate's relevance is summed over.

A prompt is rendered once (chat template -> text -> tokens with character offsets); every ROI is
resolved against that rendering to a boolean mask over prompt positions. Each message's content is
located structurally (after its role header, see ``_find_message_spans``), so chat-template tokens
(``<|im_start|>system\\n`` ...) are never part of a message ROI, even when the content is "system".
:func:`parse_expression` is the one parser of the grammar below (CAD and ``agd eval`` use it too).

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

from .errors import ROIError
from .heads import head_mask, parse_head_spec

__all__ = ["Prompt", "ROI", "ROIError", "Region", "Term", "parse_expression", "parse_rois", "render_documents",
           "render_prompt", "resolve_region", "resolve_roi"]

ROLES = ("system", "user", "assistant", "tool")


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


_ROI_HELP = ("expected one of system, user, assistant, tool, 'role:NAME', 'message:N', 'chars:A-B', "
             "'tokens:I,J-K', 'context', 'document:N', 'heads:...', or an expression joining them with "
             "' + ', ' - ', ' | ' (spaces around the operator)")


@dataclass(frozen=True)
class ROI:
    """One region of interest (a term of a ROI expression); build with the class methods or parse a string.

    ``kind`` is ``role``, ``message``, ``chars``, ``tokens`` (value: inclusive ``(start, end)``
    ranges), ``context``, ``document`` (1-based) or ``heads`` (value: the head-set spec).

    Example:
        >>> ROI.role("system"); ROI.message(1); ROI.chars(0, 40); ROI.tokens([3, 4, 5])
        >>> ROI.parse("tokens:0,5-9").value
        ((0, 0), (5, 9))
    """

    kind: str
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
        return cls("tokens", tuple((int(p), int(p)) for p in positions))

    @classmethod
    def parse(cls, spec: "str | ROI") -> "ROI":
        """Parse one ROI term (not an expression; see :func:`parse_expression`)."""
        if isinstance(spec, ROI):
            return spec
        if not isinstance(spec, str):
            raise ROIError(f"A ROI must be a string or ROI, got {type(spec).__name__} {_short(spec)}.")
        s = spec.strip()
        if s in ROLES:
            return cls.role(s)
        if s == "context":
            return cls("context", ())
        if s == "mask":  # token weights the caller passes directly (agdecode.hf's roi_mask=)
            return cls("mask", ())
        kind, _, arg = s.partition(":")
        if kind == "role" and arg.strip():
            return cls.role(arg.strip())
        if kind == "message" and re.fullmatch(r"-?\d{1,9}", arg):
            return cls.message(int(arg))
        if kind == "document" and re.fullmatch(r"\d{1,9}", arg):
            if int(arg) < 1:
                raise ROIError(f"ROI {_short(s)}: documents are numbered from 1.")
            return cls("document", (int(arg),))
        if kind == "chars":
            m = re.fullmatch(r"(\d{1,12})-(\d{1,12})", arg)
            if m:
                if int(m[1]) >= int(m[2]):
                    raise ROIError(f"ROI {_short(s)}: the character span A-B needs A < B.")
                return cls.chars(int(m[1]), int(m[2]))
        if kind == "tokens" and re.fullmatch(r"\d{1,12}(-\d{1,12})?(,\d{1,12}(-\d{1,12})?)*", arg):
            ranges = []
            for part in arg.split(","):
                a, _, b = part.partition("-")
                if int(b or a) < int(a):
                    raise ROIError(f"ROI {_short(s)}: the token range {part} is reversed.")
                ranges.append((int(a), int(b or a)))
            return cls("tokens", tuple(ranges))
        if kind == "heads" and arg.strip():
            if not arg.split("#")[0].endswith(".json"):  # a file is read when resolved (or by the CLI, up front)
                parse_head_spec(arg.strip())
            return cls("heads", (arg.strip(),))
        raise ROIError(f"Cannot parse ROI {_short(spec)}; {_ROI_HELP}.")

    def __str__(self) -> str:
        if self.kind in ("role", "context", "mask"):
            return self.value[0] if self.value else self.kind
        if self.kind == "chars":
            return f"chars:{self.value[0]}-{self.value[1]}"
        if self.kind == "tokens":
            return "tokens:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.value)
        return f"{self.kind}:{','.join(map(str, self.value))}"


def _short(x, n: int = 60) -> str:
    """``repr`` cut to ``n`` characters: error messages stay one short line whatever the input."""
    r = repr(x)
    return r if len(r) <= n else r[:n - 5] + "...'"


@dataclass(frozen=True)
class Term:
    """One term of a ROI expression: its operator (``+``, ``-`` or ``|``) and its ROI."""

    op: str
    roi: ROI


_OPERATOR = re.compile(r"\s+([+\-|])\s+")


def parse_expression(spec: "str | ROI") -> list[Term]:
    """Parse a ROI or ROI expression into its terms; the one parser of the ROI grammar.

    Example:
        >>> parse_expression("context - user")
        [Term(op='+', roi=ROI(kind='context', value=())), Term(op='-', roi=ROI(kind='role', value=('user',)))]
    """
    if isinstance(spec, ROI):
        return [Term("+", spec)]
    if not isinstance(spec, str):
        raise ROIError(f"A ROI must be a string or ROI, got {type(spec).__name__} {_short(spec)}.")
    parts = _OPERATOR.split(spec.strip())
    ops, terms = ["+"] + parts[1::2], parts[0::2]
    if terms[0][:1] in ("+", "-") and len(terms[0]) > 1:  # a leading sign: "+context - user"
        ops[0], terms[0] = terms[0][0], terms[0][1:].strip()
    if any(not t for t in terms):
        raise ROIError(f"Cannot parse ROI {_short(spec)}: an operator lacks a term; {_ROI_HELP}.")
    return [Term(op, ROI.parse(t)) for op, t in zip(ops, terms)]


def parse_rois(roi) -> list[list[Term]]:
    """Check ``generate(roi=...)`` before any compute: one ROI (expression) or a non-empty list of them.

    Example:
        >>> len(parse_rois(["system", "context - user"]))
        2
    """
    specs = list(roi) if isinstance(roi, (list, tuple)) else [roi]
    if not specs:
        raise ROIError("roi is an empty list; give at least one ROI, e.g. roi='system'.")
    return [parse_expression(r) for r in specs]


def resolve_roi(spec: "str | ROI", prompt: Prompt) -> torch.Tensor:
    """Resolve a token ROI against a rendered prompt to a boolean mask over its tokens (shape ``(T,)``).

    Raises :class:`ROIError` when the ROI is not in the prompt or selects no token.

    Example:
        >>> mask = resolve_roi("system", render_prompt(tok, messages))
    """
    roi = ROI.parse(spec)
    n = len(prompt)
    if roi.kind == "mask":
        raise ROIError("ROI 'mask' stands for token weights passed directly (roi_mask=); there is nothing to "
                       "resolve against a prompt.")
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
            if prompt.message_spans[i] is None:
                m = prompt.messages[i]
                raise ROIError(f"ROI {str(roi)!r}: message {i} ({m['role']}) was not found verbatim in the rendered "
                               "chat prompt; the chat template rewrites it. Use a 'chars:' or 'tokens:' ROI instead.")
            mask |= prompt.tokens_in_chars(*prompt.message_spans[i])
    elif roi.kind in ("context", "document"):
        if not prompt.document_spans:
            raise ROIError(f"ROI {str(roi)!r} needs documents: pass documents=[{{'title': ..., 'text': ...}}, ...].")
        if roi.kind == "context":
            idx = range(len(prompt.document_spans))
        else:
            if not 1 <= roi.value[0] <= len(prompt.document_spans):
                raise ROIError(f"ROI {str(roi)!r}: there are {len(prompt.document_spans)} documents (1-based).")
            idx = [roi.value[0] - 1]
        mask = torch.zeros(n, dtype=torch.bool)
        for i in idx:
            mask |= prompt.tokens_in_chars(*prompt.document_spans[i])
    elif roi.kind == "chars":
        start, end = roi.value
        if not 0 <= start < end <= len(prompt.text):
            raise ROIError(f"ROI {str(roi)!r} is not in the prompt: the rendered prompt has "
                           f"{len(prompt.text)} characters and the span must satisfy 0 <= A < B.")
        mask = prompt.tokens_in_chars(start, end)
    elif roi.kind == "tokens":
        # Ranges are checked and filled as ranges: "tokens:0-30000000" costs what "tokens:0-3" does.
        bad = [f"{a}" if a == b else f"{a}-{b}" for a, b in roi.value
               if not (-n <= a < n if a == b else 0 <= a <= b < n)]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise ROIError(f"ROI token positions {shown} are outside the prompt ({n} tokens).")
        mask = torch.zeros(n, dtype=torch.bool)
        for a, b in roi.value:
            if a == b:
                mask[a] = True
            else:
                mask[a:b + 1] = True
    else:
        raise ROIError(f"ROI {str(roi)!r} is over attention heads, not prompt tokens; it needs the model "
                       "(resolve_region(spec, prompt, model)).")
    if not mask.any():
        raise ROIError(f"ROI {str(roi)!r} selects no prompt token (is the message empty?).")
    return mask


# --- resolved regions: weights over tokens and heads -------------------------------------

@dataclass
class Region:
    """A resolved ROI: signed weights over prompt tokens ``(T,)`` and over attention heads ``(L, H)``.

    A plain ROI has weight 1 on its elements; ``"a - b"`` gives -1 on ``b``. The score of a
    candidate is ``tokens . token_relevance + sum(heads * head_relevance)``.
    """

    name: str
    tokens: torch.Tensor
    heads: torch.Tensor | None = None


def resolve_region(spec: "str | ROI", prompt: Prompt, model=None) -> Region:
    """Resolve a ROI or ROI expression (``"context - user"``, ``"system | heads:in-context"``).

    Example:
        >>> r = resolve_region("context - user", render_prompt(tok, msgs, documents=docs))
        >>> r.tokens   # +1 on document tokens, -1 on the question
    """
    expr = parse_expression(spec)
    name = str(spec) if isinstance(spec, ROI) else spec.strip()
    tokens = torch.zeros(len(prompt))
    heads = None
    for term in expr:
        t, h = _resolve_term(term.roi, prompt, model)
        if h is not None and heads is None:
            heads = torch.zeros_like(h)
        if term.op == "|":
            tokens = torch.maximum(tokens, t)
            heads = torch.maximum(heads, h) if h is not None else heads
        else:
            sign = -1.0 if term.op == "-" else 1.0
            tokens = tokens + sign * t
            if h is not None:
                heads = heads + sign * h
    if not tokens.any() and (heads is None or not heads.any()):
        raise ROIError(f"ROI {_short(name)} selects nothing (its parts cancel out or are empty).")
    return Region(name, tokens, heads)


def _resolve_term(roi: ROI, prompt: Prompt, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    if roi.kind == "heads":

        if model is None:
            raise ROIError(f"ROI {str(roi)!r} needs the model (to know its layers and heads).")
        return torch.zeros(len(prompt)), head_mask(roi.value[0], model).float()
    return resolve_roi(roi, prompt).float(), None
