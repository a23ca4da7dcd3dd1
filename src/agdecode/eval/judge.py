"""The LLM judge of ``agd eval sysbench``: an OpenAI-compatible chat endpoint asked, per turn, whether
the reply meets each criterion of its checklist (one JSON verdict per criterion).

The request is a template (``data/sysbench_judge.txt``, or ``--judge-template``) with ``$system``,
``$history``, ``$user``, ``$response``, ``$criteria`` (numbered) and ``$n`` filled in; a verdict
that cannot be read is None (the metrics count it as not satisfied, never as a pass).

Example:
    >>> judge = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="judge"))
    >>> judge.ping(); verdicts, raw = judge.check("Be brief.", [], "Hi", "Hello!", ["The reply is brief."])
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import AgdError, JudgeError

__all__ = ["JudgeConfig", "Judge", "judge_prompt", "parse_verdicts", "DEFAULT_TEMPLATE"]

DEFAULT_TEMPLATE = "sysbench_judge.txt"
_YES = {"yes", "y", "true", "是", "满足", "pass", "satisfied"}
_NO = {"no", "n", "false", "否", "不满足", "fail", "not satisfied"}


@dataclass
class JudgeConfig:
    """Where the judge is and how to ask it. ``url`` is the OpenAI-compatible base URL (``.../v1``)."""

    url: str
    model: str
    template: str | None = None   # a file; None: the shipped data/sysbench_judge.txt
    timeout: float = 120.0        # seconds per request
    retries: int = 2              # the client's own retries (with backoff) before a failure is reported
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never recorded; local servers need none

    def template_text(self) -> str:
        if self.template is None:
            return (resources.files("agdecode") / "data" / DEFAULT_TEMPLATE).read_text(encoding="utf-8")
        p = Path(self.template)
        if not p.is_file():
            raise AgdError(f"No such judge template: {p}")
        return p.read_text(encoding="utf-8")


def _render_history(history: list[dict]) -> str:
    if not history:
        return "(none)"
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)


def judge_prompt(template: str, system: str, history: list[dict], user: str, response: str,
                 criteria: list[str]) -> str:
    """The judge's request for one turn: ``template`` with its ``$`` fields filled in.

    Example:
        >>> judge_prompt("$n: $criteria", "S", [], "U", "R", ["a", "b"])
        '2: 1. a\\n2. b'
    """
    return string.Template(template).safe_substitute(
        system=system, history=_render_history(history), user=user, response=response, n=len(criteria),
        criteria="\n".join(f"{i}. {c}" for i, c in enumerate(criteria, 1)))


def _verdict(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, dict):
        for k in ("verdict", "result", "satisfied", "answer", "评判结果", "结果"):
            if k in v:
                return _verdict(v[k])
        return None
    if isinstance(v, str):
        s = v.strip().strip(".").lower()
        return True if s in _YES else False if s in _NO else None
    return None


def parse_verdicts(text: str, n: int) -> list[bool | None]:
    """One verdict per criterion from the judge's answer: True, False, or None where it cannot be read.

    The answer must hold a JSON object keyed by criterion number (``"1"``..``"n"``), possibly inside
    a markdown fence or after some text; a JSON list of n verdicts is accepted too.

    Example:
        >>> parse_verdicts('```json\\n{"1": {"verdict": "yes"}, "2": "no"}\\n```', 3)
        [True, False, None]
    """
    obj = None
    for candidate in [text.strip()] + re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.S):
        try:
            obj = json.loads(candidate)
            break
        except json.JSONDecodeError:
            continue
    if obj is None:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                obj = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                obj = None
    if isinstance(obj, list) and len(obj) == n:
        return [_verdict(v) for v in obj]
    if not isinstance(obj, dict):
        return [None] * n
    keyed = {re.sub(r"\D", "", str(k)): v for k, v in obj.items()}  # "1", "criterion 1", "criteria1" -> "1"
    return [_verdict(keyed[str(i)]) if str(i) in keyed else None for i in range(1, n + 1)]


class Judge:
    """An OpenAI-compatible chat endpoint that answers the checklist of one turn.

    Example:
        >>> judge = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="qwen2.5-72b-instruct"))
        >>> verdicts, raw = judge.check("Be brief.", [], "Hi", "Hello!", ["The reply is brief."])
    """

    def __init__(self, config: JudgeConfig):
        try:
            import openai  # optional: pip install 'agdecode[judge]'
        except ImportError as e:
            raise AgdError("The SysBench judge needs the openai package: pip install 'agdecode[judge]'") from e
        self.config = config
        self.template = config.template_text()
        self._openai = openai
        self.client = openai.OpenAI(base_url=config.url, api_key=os.environ.get(config.api_key_env) or "EMPTY",
                                    timeout=config.timeout, max_retries=config.retries)

    def ping(self) -> None:
        """Check before any decoding that the judge answers and serves ``model`` (:class:`JudgeError` if not).

        Uses ``GET /models``; a server that does not list its models is only checked for being up.
        """
        o, url = self._openai, self.config.url
        try:
            served = [m.id for m in self.client.models.list()]
        except o.APITimeoutError as e:
            raise JudgeError(f"the judge at {url} timed out (over {self.config.timeout:g} s); is it running?") from e
        except o.APIConnectionError as e:
            raise JudgeError(f"the judge at {url} cannot be reached ({e.__cause__ or e}); is it running?") from e
        except o.APIStatusError:
            return
        if served and self.config.model not in served:
            raise JudgeError(f"the judge at {url} serves {served}, not --judge-model {self.config.model!r}")

    def ask(self, prompt: str) -> str:
        """The judge's raw answer to ``prompt`` (temperature 0); :class:`JudgeError` if it cannot answer."""
        o = self._openai
        url = self.config.url
        try:
            out = self.client.chat.completions.create(model=self.config.model, temperature=0,
                                                      messages=[{"role": "user", "content": prompt}])
        except o.APITimeoutError as e:
            raise JudgeError(f"the judge at {url} timed out (over {self.config.timeout:g} s per request, "
                             f"{self.config.retries} retries); raise --judge-timeout or check the server") from e
        except o.APIConnectionError as e:
            raise JudgeError(f"the judge at {url} cannot be reached ({e.__cause__ or e}); is it running?") from e
        except o.APIStatusError as e:
            raise JudgeError(f"the judge at {url} refused the request: HTTP {e.status_code} "
                             f"({str(e.message)[:200]}); check --judge-model {self.config.model!r}") from e
        content = out.choices[0].message.content if out.choices else None
        return content or ""

    def check(self, system: str, history: list[dict], user: str, response: str,
              criteria: list[str]) -> tuple[list[bool | None], str]:
        """(verdict per criterion, raw answer) for one reply."""
        raw = self.ask(judge_prompt(self.template, system, history, user, response, criteria))
        return parse_verdicts(raw, len(criteria)), raw
