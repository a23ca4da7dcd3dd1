"""End to end, bf16 against fp32: the same methods on the same items, paired, from `agd eval` records.

    for dt in float32 bfloat16; do
        agd eval rules --data rules --method greedy,agd-gated --dtype $dt --max-new-tokens 64 --limit 200 \
            --threads 1 --seed 0 --out runs/precision/rules-$dt
        agd eval archive runs/precision/rules-$dt --to docs/precision/rules-$dt
    done
    python scripts/compare_precision.py docs/precision/rules-float32 docs/precision/rules-bfloat16 \
        --out docs/precision/rules-bf16-vs-fp32

For each method found in both folders: each metric in both dtypes, the paired difference bf16 - fp32
over the items both have (mean, 95 % bootstrap CI, items won / lost, exact sign-test p), and the share
of items whose response is the same text. Then, within each dtype, each method against greedy (does
the method's effect survive bf16?). Holm's correction runs over every test in the report. Writes
``OUT.md`` and ``OUT.json`` (every figure; the records stay in the two folders).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from agdecode.errors import AgdError  # noqa: E402
from agdecode.eval.records import METRICS, item_values  # noqa: E402
from agdecode.eval.report import holm, load_runs, paired_vs  # noqa: E402


def _by_method(folder: str) -> dict[str, dict]:
    return {r["settings"]["method"]: r for r in load_runs([folder])}


def _rate(run: dict, metric: str) -> float:
    num, den = np.array([item_values(r, metric) for r in run["records"]]).reshape(-1, 2).sum(0)
    return float(num / den)


def _logprob(run: dict) -> float:
    vals = [r["quality"]["logprob"] for r in run["records"] if r["quality"].get("logprob") is not None]
    return float(np.mean(vals))


def _same_text(a: dict, b: dict) -> tuple[int, int]:
    ra, rb = {r["id"]: r["response"] for r in a["records"]}, {r["id"]: r["response"] for r in b["records"]}
    ids = set(ra) & set(rb)
    return sum(ra[i] == rb[i] for i in ids), len(ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fp32", help="folder of the fp32 runs (agd eval --out, or its archive)")
    p.add_argument("bf16", help="folder of the bf16 runs")
    p.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    a = p.parse_args()
    try:
        r32, r16 = _by_method(a.fp32), _by_method(a.bf16)
    except AgdError as e:
        print(f"compare_precision: error: {e}", file=sys.stderr)
        return 2
    for name, runs, want in (("fp32", r32, "float32"), ("bf16", r16, "bfloat16")):
        wrong = [m for m, r in runs.items() if r["settings"].get("dtype") != want]
        if wrong:
            print(f"compare_precision: error: {name} folder holds runs in another dtype: {', '.join(wrong)}",
                  file=sys.stderr)
            return 2
    methods = [m for m in r32 if m in r16]
    if not methods:
        print("compare_precision: error: no method is in both folders", file=sys.stderr)
        return 2
    task = r32[methods[0]]["settings"]["task"]
    metrics = METRICS[task][:1] + METRICS[task][2:3]  # prompt-level and instruction-level, strict
    tests: list[dict] = []
    for m in methods:
        for metric in metrics:
            tests.append({"kind": "bf16 - fp32", "method": m, "metric": metric,
                          **paired_vs(r16[m], r32[m], metric)})
    for dt, runs in (("float32", r32), ("bfloat16", r16)):
        for m in methods:
            if m != "greedy" and "greedy" in runs:
                for metric in metrics:
                    tests.append({"kind": f"{m} - greedy ({dt})", "method": m, "metric": metric,
                                  **paired_vs(runs[m], runs["greedy"], metric)})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
    levels = {m: {"fp32": {**{k: _rate(r32[m], k) for k in metrics}, "logprob": _logprob(r32[m]),
                           "n": len(r32[m]["records"])},
                  "bf16": {**{k: _rate(r16[m], k) for k in metrics}, "logprob": _logprob(r16[m]),
                           "n": len(r16[m]["records"])},
                  "same_text": _same_text(r32[m], r16[m]),
                  "guided_fraction": {dt: sum(r["trace"]["guided"] for r in runs[m]["records"])
                                      / max(1, sum(r["trace"]["steps"] for r in runs[m]["records"]))
                                      for dt, runs in (("fp32", r32), ("bf16", r16))}}
              for m in methods}
    command = "python scripts/compare_precision.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    lines = [f"# {task}: bf16 against fp32, end to end (paired)", "", f"`{command}`", "",
             f"Records: `{a.fp32}` (fp32) and `{a.bf16}` (bf16), the same items and settings; "
             f"model {r32[methods[0]]['settings']['model'].get('name_or_path', '?')}. Prompt-level and "
             "instruction-level strict accuracy; `logprob` = mean token log-probability of the response "
             "(fluency proxy); `same text` = items whose response is identical in both dtypes; `guided` = "
             "share of steps chosen by attribution.", "",
             "| method | n | prompt fp32 | prompt bf16 | inst fp32 | inst bf16 | logprob fp32 / bf16 | same text | "
             "guided fp32 / bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        lv = levels[m]
        same, n = lv["same_text"]
        lines.append(f"| {m} | {n} | {lv['fp32'][metrics[0]]:.3f} | {lv['bf16'][metrics[0]]:.3f} | "
                     f"{lv['fp32'][metrics[1]]:.3f} | {lv['bf16'][metrics[1]]:.3f} | "
                     f"{lv['fp32']['logprob']:.3f} / {lv['bf16']['logprob']:.3f} | {same}/{n} | "
                     f"{lv['guided_fraction']['fp32']:.2f} / {lv['guided_fraction']['bf16']:.2f} |")
    lines += ["", f"Paired differences (mean over items, 95 % bootstrap CI, items won / lost, exact sign test; "
              f"Holm over all {len(tests)} tests):", "",
              "| comparison | metric | n | difference [95 % CI] | won / lost | p | p (Holm) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for t in tests:
        lines.append(f"| {t['kind']}: {t['method']} | {t['metric']} | {t['n']} | {t['delta']:+.3f} "
                     f"[{t['lo']:+.3f}, {t['hi']:+.3f}] | {t['wins']} / {t['losses']} | {t['p']:.3f} | "
                     f"{t['p_holm']:.3f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "levels": levels, "tests": tests}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
