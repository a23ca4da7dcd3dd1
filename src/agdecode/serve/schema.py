"""The OpenAI chat-completions request schema (the part a local AGD server can honour), as pydantic models.

Fields of the OpenAI API that change nothing here (``user``, ``metadata``, ``store``, ...) are
accepted and ignored, as by other OpenAI-compatible servers; fields that would change the answer in
a way this server cannot (``n`` > 1, tools, logprobs, penalties) are refused by :func:`unsupported`
rather than silently dropped. AGD's own settings ride in the extension object ``agd`` (unknown keys
there are refused: a typo must not silently fall back to a default) and ``documents``.
"""
from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from ..config import SEED_RANGE
from ..roi import parse_rois

# A bound far above any model's context, so a huge max_tokens is a 400 here, not an error deep inside.
_MAX_TOKENS = 2**31 - 1

__all__ = ["AgdOptions", "ChatRequest", "CompletionRequest", "Document", "Message", "unsupported"]

_Number = StrictFloat  # strict: a JSON integer is a number, true is not


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    """One chat message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Document(BaseModel):
    """A document for ``roi="context"`` / ``"document:N"``, rendered before the last user message."""

    model_config = ConfigDict(extra="forbid")
    title: StrictStr = ""
    text: StrictStr


# Over HTTP a head ROI is a shipped set's name or layer.head pairs; anything else (a file path, with
# or without spaces or '#') would read the server's disk. Checked on the terms the ROI grammar's own
# parser finds, so no spelling slips past it.
_HEADS_OK = re.compile(r"parametric|in-context|\d+\.\d+(,\d+\.\d+)*")


class AgdOptions(BaseModel):
    """The ``agd`` extension object: AGD settings for this request (absent = the server's defaults)."""

    model_config = ConfigDict(extra="forbid")
    method: StrictStr | None = None
    roi: StrictStr | list[StrictStr] | None = None
    k: StrictInt | None = None
    min_prob: _Number | None = None
    entropy_threshold: _Number | Literal["auto"] | None = None
    attribution: StrictStr | None = None
    repetition_penalty: _Number | None = Field(None, gt=0)
    chat_template_kwargs: dict | None = None
    trace: StrictBool = False

    @field_validator("roi")
    @classmethod
    def _no_files(cls, roi):
        for r in [roi] if isinstance(roi, str) else roi or []:
            for expr in parse_rois(r):  # parsing reads no file (a head file is read when resolved)
                for term in expr:
                    name = term.roi.value[0] if term.roi.kind == "heads" else None
                    if name is not None and not _HEADS_OK.fullmatch(name):
                        raise ValueError(f"heads ROI {name[:60]!r}: over HTTP only 'parametric', 'in-context' or "
                                         "layer.head pairs like 3.1,4.5 are accepted (no files)")
        return roi

    def settings(self) -> dict:
        """The AGDConfig settings this request sets (``entropy_threshold: null`` = off, so it counts)."""
        return self.model_dump(exclude_unset=True, exclude={"trace", "chat_template_kwargs"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="allow")  # unknown fields are refused by unsupported(), by name
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1, le=_MAX_TOKENS)
    temperature: _Number | None = Field(None, ge=0, le=2)
    top_p: _Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Refused unless absent or neutral (see unsupported()).
    presence_penalty: _Number | None = None
    frequency_penalty: _Number | None = None
    logit_bias: dict | None = None
    # vLLM's sampling extensions, honoured.
    repetition_penalty: _Number | None = Field(None, gt=0)
    min_tokens: StrictInt | None = Field(None, ge=0, le=_MAX_TOKENS)
    ignore_eos: StrictBool = False
    top_k: StrictInt | None = None
    # Extensions.
    agd: AgdOptions | None = None
    documents: list[Document] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops or None

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def template_kwargs(self) -> dict | None:
        return self.agd.chat_template_kwargs if self.agd is not None else None


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=_MAX_TOKENS)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_kwargs(self) -> dict | None:
        return self.chat_template_kwargs or super().template_kwargs()


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt, no chat template. ROIs: ``chars:A-B``, ``tokens:...``,
    ``context`` / ``document:N`` (``documents`` are put before the prompt)."""

    prompt: StrictStr | list[StrictStr]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("one prompt per request (a list of exactly one string): AGD decodes one completion "
                             "per request")
        text = prompt[0] if isinstance(prompt, list) else prompt
        if not text:
            raise ValueError("the prompt is empty")
        return text

    def conversation(self) -> str:
        return self.prompt


# OpenAI fields that change nothing a local server returns: accepted and ignored, as by other
# OpenAI-compatible servers. Any other unknown field is refused by name (a vLLM extension such as
# guided_json, or a typo), never silently dropped.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice",
                            "modalities", "reasoning_effort", "prediction", "web_search_options", "safety_identifier",
                            "prompt_cache_key", "verbosity"})


def unsupported(req: ChatRequest | CompletionRequest) -> tuple[str, str] | None:
    """``(param, message)`` for the first feature this server does not implement, else None."""
    unknown = sorted(set(req.model_extra or {}) - IGNORED_FIELDS)
    if isinstance(req, CompletionRequest) and "chat_template_kwargs" in unknown:
        return "chat_template_kwargs", "a completion has no chat template: drop chat_template_kwargs"
    if unknown:
        return unknown[0], (f"{unknown[0]!r} is not supported by this server (supported: the OpenAI fields, "
                            "vLLM's repetition_penalty, min_tokens, top_k, ignore_eos, chat_template_kwargs, "
                            "and the 'agd' and 'documents' extensions)")
    if isinstance(req, CompletionRequest):
        checks = [("echo", req.echo, "echo is not supported"),
                  ("logprobs", req.logprobs is not None, "logprobs are not supported"),
                  ("suffix", req.suffix is not None, "suffix (insertion) is not supported"),
                  ("best_of", req.best_of not in (None, 1), "best_of must be 1"),
                  ("chat_template_kwargs", req.agd is not None and req.agd.chat_template_kwargs is not None,
                   "a completion has no chat template: drop agd.chat_template_kwargs")]
        bad = next(((param, msg) for param, bad, msg in checks if bad), None)
        if bad is not None:
            return bad
    elif req.chat_template_kwargs is not None and req.agd is not None and req.agd.chat_template_kwargs is not None:
        return "chat_template_kwargs", "chat_template_kwargs is given twice (top level and in 'agd'): give it once"
    checks = [
        ("top_k", req.top_k not in (None, -1, 0) and (req.temperature or 0) > 0,
         "top_k is not supported when sampling (use -1 or leave it out; sampling narrows with top_p)"),
        ("n", req.n not in (None, 1), "n must be 1: AGD decoding gives one completion per request"),
        ("presence_penalty", req.presence_penalty not in (None, 0), "presence_penalty is not supported (use 0)"),
        ("frequency_penalty", req.frequency_penalty not in (None, 0), "frequency_penalty is not supported (use 0)"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(req, ChatRequest):
        checks += [
            ("logprobs", bool(req.logprobs) or req.top_logprobs is not None, "logprobs are not supported"),
            ("tools", bool(req.tools) or bool(req.functions), "tools and functions are not supported"),
            ("response_format", req.response_format not in (None, {"type": "text"}),
             "response_format other than {'type': 'text'} is not supported"),
        ]
    return next(((param, msg) for param, bad, msg in checks if bad), None)

