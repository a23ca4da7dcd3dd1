"""A run directory: its settings (``run.json``), its append-only records (``records.jsonl``) and
their wall-clock timings (``timings.jsonl``).

Each finished item is one JSON line, written with a single ``write`` and flushed to disk before the
next item starts, so a crash or Ctrl-C loses at most the item in progress. On resume a torn last
line (a kill in the middle of a write) is cut off, the ids already present are skipped, and a
run directory made with other settings is refused rather than mixed.

A record's ``timing`` goes to ``timings.jsonl`` (one ``{"id": ..., "generate_s": ...}`` line per
item), not into ``records.jsonl``: two runs of the same settings then write byte-identical records.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import RunFileError, RunMismatchError

__all__ = ["RunStore", "RunMismatchError", "RunFileError", "summarize", "item_values", "METRICS"]

# Per task: metric name -> how to read (numerator, denominator) from a record's scores.
METRICS = {
    "rules": ["prompt_strict", "prompt_loose", "inst_strict", "inst_loose"],
    "qa": ["recall", "recall_word"],
}
QUALITY = ["logprob", "repeat4", "words", "tokens"]


class RunStore:
    """The files of one run (one task, data set, method and model).

    Example:
        >>> store = RunStore("runs/rules/greedy")
        >>> done = store.open({"task": "rules", ...}, info={...})
        >>> store.append({"id": "rules-000", ...})
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_file = self.path / "run.json"
        self.records_file = self.path / "records.jsonl"
        self.timings_file = self.path / "timings.jsonl"

    def open(self, settings: dict, info: dict | None = None) -> set[str]:
        """Create the run, or check that it has the same ``settings``; return the ids already done."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.run_file.is_file():
            old = self.settings()
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise RunMismatchError(
                    f"{self.path} holds a run with other settings (differences: {', '.join(diff)}); "
                    "use another --out, or delete that directory to start over.")
            if info:  # resumed: run.json says how it was run last (limit, items, provenance) and before
                old_info = json.loads(self.run_file.read_text(encoding="utf-8")).get("info") or {}
                history = old_info.pop("history", []) + [old_info]
                tmp = self.run_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"settings": old, "info": {**info, "history": history}}, indent=1,
                                          default=str))
                tmp.replace(self.run_file)
        else:
            tmp = self.run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": settings, "info": info or {}}, indent=1, default=str))
            tmp.replace(self.run_file)
        self._repair_tail()
        return {r["id"] for r in self.records() if not r.get("error")}  # failed items run again

    def _repair_tail(self) -> None:
        if not self.records_file.is_file():
            return
        data = self.records_file.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if good < len(data):
            print(f"note: {self.records_file}: dropped an incomplete last line ({len(data) - good} bytes) "
                  "from an interrupted write; that item runs again.", file=sys.stderr)
            with open(self.records_file, "r+b") as f:
                f.truncate(good)

    def append(self, record: dict) -> None:
        """Append one record durably (one write, flushed and fsync'ed); its ``timing`` goes to ``timings.jsonl``.

        The record is written first: a kill between the two writes loses a timing, never a record.
        """
        record = dict(record)
        timing = record.pop("timing", None)
        _append_line(self.records_file, record)
        if timing is not None:
            _append_line(self.timings_file, {"id": record["id"], **timing})

    def timings(self) -> dict[str, dict]:
        """Item id -> its timing (seconds), the last line of each id; unreadable lines are skipped.

        Example:
            >>> store.timings()["rules-000"]["generate_s"]
            2.64
        """
        out: dict[str, dict] = {}
        if self.timings_file.is_file():
            for line in self.timings_file.read_text(encoding="utf-8").splitlines():
                try:
                    t = json.loads(line)
                except json.JSONDecodeError:  # a torn line from a kill: timings are only indicative
                    continue
                if isinstance(t, dict) and "id" in t:
                    out[t.pop("id")] = t
        return out

    def records(self) -> list[dict]:
        """The records, one per id: the first, or the first success after failures (a failed item is
        retried when the run is resumed)."""
        if not self.records_file.is_file():
            return []
        out, seen = [], {}
        try:
            lines = self.records_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise RunFileError(f"{self.records_file} is not UTF-8 text ({e.reason}); it was not written by "
                               "agdecode or is damaged.") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunFileError(f"{self.records_file} line {n} is not JSON ({e}); the file is damaged: "
                                       "delete that line (its item then runs again).") from None
                if not isinstance(r, dict) or not isinstance(r.get("id"), str):
                    raise RunFileError(f"{self.records_file} line {n} is not a record (no string 'id').")
                if r["id"] not in seen:
                    seen[r["id"]] = len(out)
                    out.append(r)
                elif out[seen[r["id"]]].get("error") and not r.get("error"):
                    out[seen[r["id"]]] = r  # a failed item that ran again and succeeded
        return out

    def settings(self) -> dict:
        """The settings in ``run.json``; a damaged file is refused with a message naming it."""
        try:
            settings = json.loads(self.run_file.read_text(encoding="utf-8"))["settings"]
        except FileNotFoundError:
            raise RunFileError(f"{self.run_file} not found: not a run directory.") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise RunFileError(f"{self.run_file} is not a run file written by agdecode ({type(e).__name__}: {e}); "
                               "delete the run directory to start over.") from None
        if not isinstance(settings, dict):
            raise RunFileError(f"{self.run_file}: 'settings' is not an object; delete the run directory to start over.")
        return settings


def _append_line(path: Path, obj: dict) -> None:
    line = json.dumps(obj, ensure_ascii=False, default=float) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def item_values(record: dict, metric: str) -> tuple[float, float]:
    """(numerator, denominator) of ``metric`` for one record: instruction-level rule metrics weigh each
    instruction, everything else each item.

    Example:
        >>> item_values({"scores": {"inst_strict": [True, False]}}, "inst_strict")
        (1.0, 2.0)
    """
    v = record["scores"][metric]
    if isinstance(v, list):
        return float(sum(v)), float(len(v))
    return float(v), 1.0


def summarize(records: list[dict], task: str, timings: dict[str, dict] | None = None) -> dict:
    """The summary of a run: accuracy metrics, quality proxies, trace statistics (deterministic), and
    the timings of ``timings`` (``RunStore.timings()``; kept apart, since they differ between
    otherwise identical runs).

    Example:
        >>> summarize(store.records(), "qa", store.timings())["metrics"]["recall"]
        0.42
    """
    ok = [r for r in records if not r.get("error")]
    metrics = {}
    for m in METRICS[task]:
        num, den = np.array([item_values(r, m) for r in ok]).reshape(-1, 2).sum(axis=0)
        metrics[m] = float(num / den) if den else None
    quality = {}
    for q in QUALITY:
        vals = [r["quality"][q] for r in ok if r["quality"].get(q) is not None]
        quality[q] = float(np.mean(vals)) if vals else None
    steps = sum(r["trace"]["steps"] for r in ok)
    trace = {"steps": steps,
             "guided_fraction": sum(r["trace"]["guided"] for r in ok) / steps if steps else None,
             "overrides_per_item": float(np.mean([r["trace"]["overrides"] for r in ok])) if ok else None,
             "gated_fraction": sum(r["trace"]["gated"] for r in ok) / steps if steps else None}
    timings = timings or {}
    secs = [timings[r["id"]]["generate_s"] for r in ok if "generate_s" in timings.get(r["id"], {})]
    timing = {"generate_s_mean": float(np.mean(secs)) if secs else None, "generate_s_total": float(sum(secs)),
              "n_timed": len(secs)}
    return {"task": task, "n": len(ok), "n_errors": len(records) - len(ok),
            "scorer_errors": sum(bool(r["scores"].get("errors")) for r in ok),
            "metrics": metrics, "quality": quality, "trace": trace, "timing": timing}
