"""Checks of user input shared by every command: argparse types and output paths (the ground floor).

Nothing here imports the rest of the package, so any module may use these.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from numbers import Real
from pathlib import Path
from typing import Callable

from .errors import AgdError

__all__ = ["is_int", "is_number", "check_writable", "check_not_clobbering", "is_agd_json", "is_agd_html", "positive_int", "nonnegative_int", "threshold", "port"]


def is_int(x) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite real number that is not a bool.

    Example:
        >>> is_number(0.5), is_number(float("nan")), is_number(False)
        (True, False, False)
    """
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0, at most 2**40 (a size in MiB, where 0 means "off")."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 2**40:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (at most 2**40), got {text!r}")
    return n


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 and negative counts would silently mean something else)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def threshold(text: str):
    """A number of nats, or 'auto' (the model's calibration from `agd calibrate`)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats or 'auto', got {text!r}")


def port(text: str) -> int:
    """An argparse type: a TCP port 1-65535 (uvicorn would take 70000 and listen elsewhere)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return n


def check_writable(path: str | Path, what: str = "output", create_parents: bool = False) -> None:
    """Refuse an output path that cannot be written, before any compute (the result would be lost).

    With ``create_parents`` the writer makes missing folders, so the nearest existing one must be writable.

    Example:
        >>> check_writable("trace.json", "--json")
    """
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise AgdError(f"{what} {str(path)!r} is a directory; give a file name.")
    if create_parents:
        parent = next(a for a in p.absolute().parents if a.exists())
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AgdError(f"{what} {str(path)!r}: the directory {str(parent)!r} {state}.")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise AgdError(f"{what} {str(path)!r} is not writable.")


def check_not_clobbering(path: str | Path, what: str, own: Callable[[Path], bool] | None = None,
                         inputs: tuple = ()) -> None:
    """Refuse to overwrite a file the user may still need: ``path`` must not exist, or be one of the
    project's own outputs (``own(path)`` true: a trace, a report, a steering vector, rewritten by
    re-running the same command); never one of ``inputs``.

    Example:
        >>> check_not_clobbering("trace.html", "--output", inputs=("trace.json",))
    """
    p = Path(path)
    for given in inputs:
        if given is not None and p.exists() and Path(given).exists() and p.resolve() == Path(given).resolve():
            raise AgdError(f"{what} {str(path)!r} is also the input: it would be overwritten; choose another name.")
    if p.exists() and not p.is_dir() and p.stat().st_size and not (own is not None and own(p)):
        raise AgdError(f"{what} {str(path)!r} exists and was not written by agd: it is kept as it is; "
                       "choose another name or remove it first.")


def is_agd_json(path: Path, key: str) -> bool:
    """Whether ``path`` is a JSON object (or an object of them) that agdecode wrote: it has ``key``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    return key in data or (bool(data) and all(isinstance(v, dict) and key in v for v in data.values()))


def is_agd_html(path: Path) -> bool:
    """Whether ``path`` is a report page written by ``agd report`` (its generator meta tag)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return GENERATOR_TAG in f.read(4096)
    except OSError:
        return False


GENERATOR_TAG = '<meta name="generator" content="agdecode">'
