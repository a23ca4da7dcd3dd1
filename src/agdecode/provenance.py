"""Where a figure came from: the code (git commit, uncommitted changes), the packages and the machine.

Written into every bench JSON and every eval ``run.json``, so a number can be traced to the code
that made it.

Example:
    >>> provenance()["git"]
    {'commit': '5b4a0c4776d938ae1782a37c1a7b0e2810b05401', 'dirty': False}
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch
import transformers

from ._version import __version__

__all__ = ["git_state", "provenance"]

_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when installed from one (pip install -e)


def git_state() -> dict:
    """``{"commit", "dirty", "changed"}`` of the checkout this package runs from; None (and ``[]``)
    when it is not a git checkout (an installed wheel) or git is missing. ``dirty``: tracked files
    differ from the commit (the figure is then of those changes, not of the commit alone); ``changed``
    names them, so a reader sees whether they could matter (a README edit cannot)."""
    unknown = {"commit": None, "dirty": None, "changed": []}
    # Only a source checkout (src/agdecode is this package): an installed copy sits in site-packages,
    # whose parent folders may belong to some other repository.
    if (_ROOT / "src" / "agdecode").resolve() != Path(__file__).resolve().parent:
        return unknown
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                                cwd=_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return unknown
    if commit.returncode != 0 or status.returncode != 0:
        return unknown
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit.stdout.strip(), "dirty": bool(changed), "changed": changed}


def provenance() -> dict:
    """The git state, the versions of the packages that decide the numbers, and the machine."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return {"git": git_state(), "agdecode": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
