"""Regions of interest (ROI): which prompt tokens a candidate's relevance is summed over.

A prompt is rendered once (:mod:`agdecode.prompt`: chat template -> text -> tokens with character
offsets and message spans); every ROI is resolved against that rendering to a weight over prompt
positions (or attention heads).
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

Documents are rendered into the last user message (:func:`agdecode.prompt.render_documents`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import ROIError
from .heads import head_mask, parse_head_spec
from .prompt import ROLES, Prompt, _short

__all__ = ["ROI", "ROIError", "Region", "Term", "parse_expression", "parse_rois", "resolve_region", "resolve_roi"]



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
        if self.kind in ("role", "context"):
            return self.value[0] if self.value else self.kind
        if self.kind == "chars":
            return f"chars:{self.value[0]}-{self.value[1]}"
        if self.kind == "tokens":
            return "tokens:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.value)
        return f"{self.kind}:{','.join(map(str, self.value))}"


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
