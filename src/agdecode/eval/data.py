"""Reading item files (JSON Lines) for ``agd eval``: every line validated, bad lines named by number.

A malformed line is never scored as a silent zero: by default the whole file is refused with the
list of bad lines; with ``on_error="skip"`` they are skipped, reported, and recorded in the run.

Rule items: ``{"id", "messages": [{"role", "content"}, ...], "instruction_id_list": [...], "kwargs": [...]}``
(IFEval instruction ids and arguments; the rules usually in the system message).
QA items: ``{"id", "question", "answers": [...], "documents": [{"title", "text"}, ...]}`` (documents optional).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import AgdError, ItemFileError
from .ifeval import checker

__all__ = ["ItemFileError", "ItemSet", "read_items", "parse_lines", "TASKS"]

TASKS = ("rules", "qa")


@dataclass
class ItemSet:
    """Validated items plus where they came from and which lines were skipped."""

    name: str
    task: str
    items: list[dict]
    source: str = ""
    sha256: str = ""
    skipped: list[str] = field(default_factory=list)  # "line N: why", for the run record

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "n_items": len(self.items),
                "skipped_lines": self.skipped}


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _check_rules(d: dict) -> str | None:
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be {{'role': str, 'content': str}}"
    if not any(m["role"] == "user" for m in msgs):
        return "'messages' has no user message"
    ids, kwargs = d.get("instruction_id_list"), d.get("kwargs")
    if not _is_str_list(ids) or not ids:
        return "'instruction_id_list' must be a non-empty list of strings"
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        return f"'kwargs' must be a list of {len(ids)} objects, one per instruction"
    known = checker().instructions_registry.INSTRUCTION_DICT
    unknown = [i for i in ids if i not in known]
    if unknown:
        return f"unknown IFEval instruction id(s) {unknown}"
    for iid, kw in zip(ids, kwargs):
        # The checker would raise on these for every response: a bad item, not a failed rule.
        accepted = inspect.signature(known[iid]("x").build_description).parameters
        extra = sorted(k for k, v in kw.items() if v is not None and k not in accepted)
        if extra:
            return f"kwargs of {iid!r} has argument(s) {extra} it does not take (it takes {sorted(accepted)})"
    return None


def _check_qa(d: dict) -> str | None:
    if not isinstance(d.get("question"), str) or not d["question"].strip():
        return "'question' must be a non-empty string"
    if not _is_str_list(d.get("answers")) or not any(a.strip() for a in d["answers"]):
        return "'answers' must be a non-empty list of strings"
    docs = d.get("documents")
    if docs is not None:
        if not isinstance(docs, list):
            return "'documents' must be a list"
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("title", "text")):
                return f"documents[{i}] must be {{'title': str, 'text': str}}"
    return None


def parse_lines(lines: Iterable[str], task: str, on_error: str = "fail",
                source: str = "<input>") -> tuple[list[dict], list[str]]:
    """Parse and validate JSONL ``lines`` of ``task`` items; return (items, bad-line reports).

    Blank lines are ignored. ``id`` may be a string or an integer (kept as a string) and must be
    unique. With ``on_error="fail"`` any bad line raises :class:`ItemFileError` naming them all.

    Example:
        >>> items, bad = parse_lines(['{"id": 1, "question": "q", "answers": ["a"]}', "oops"], "qa", "skip")
        >>> items[0]["id"], bad
        ('1', ["line 2: not JSON (Expecting value: line 1 column 1 (char 0))"])
    """
    if task not in TASKS:
        raise AgdError(f"task must be one of {TASKS}, got {task!r}")
    if on_error not in ("fail", "skip"):
        raise AgdError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    check = _check_rules if task == "rules" else _check_qa
    items, bad, seen = [], [], set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: not JSON ({e})")
            continue
        if not isinstance(d, dict):
            bad.append(f"line {n}: not a JSON object")
            continue
        if isinstance(d.get("id"), bool) or not isinstance(d.get("id"), (str, int)) or str(d["id"]) == "":
            bad.append(f"line {n}: missing or invalid 'id' (a string or an integer)")
            continue
        problem = check(d)
        if problem is None and str(d["id"]) in seen:
            problem = f"duplicate id {d['id']!r}"
        if problem:
            bad.append(f"line {n} (id {d['id']!r}): {problem}")
            continue
        d["id"] = str(d["id"])
        seen.add(d["id"])
        items.append(d)
    if bad and on_error == "fail":
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ItemFileError(f"{source}: {len(bad)} malformed line(s):\n  {shown}\n"
                            "Fix them, or pass --skip-bad-lines to skip them (they are then listed in the run record).")
    if bad:
        print(f"warning: {source}: skipped {len(bad)} malformed line(s): " + "; ".join(bad[:5])
              + (" ..." if len(bad) > 5 else ""), file=sys.stderr)
    if not items:
        raise ItemFileError(f"{source}: no valid {task} item.")
    return items, bad


def read_items(path: str | Path, task: str, on_error: str = "fail") -> ItemSet:
    """Read a JSONL item file for ``task`` ("rules" or "qa"), validating every line.

    Example:
        >>> s = read_items("my_rules.jsonl", "rules")
        >>> len(s.items), s.skipped
    """
    path = Path(path)
    if not path.is_file():
        raise ItemFileError(f"No such item file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ItemFileError(f"{path}: line {line} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "save the file as UTF-8 (JSON Lines are UTF-8).") from None
    items, bad = parse_lines(text.splitlines(), task, on_error, source=str(path))
    return ItemSet(path.name, task, items, str(path), hashlib.sha256(raw).hexdigest(), bad)
