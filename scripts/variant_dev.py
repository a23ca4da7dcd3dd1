"""The dev-set tuning of the project's variant (min_prob_ratio, docs/results.md "A variant beyond the paper").

Runs (bf16, 1 thread, 100 items of rules-calibration, disjoint from the evaluated `rules` items):

    C="--data rules-calibration --limit 100 --max-new-tokens 64 --threads 1 --seed 0 --no-progress --dtype bfloat16"
    agd eval rules $C --method greedy,agd-gated --out runs/variant/dev-base
    for r in 0.25 0.5; do agd eval rules $C --method agd-gated --set min_prob_ratio=$r --out runs/variant/dev-rel$r; done

then `python scripts/variant_dev.py runs/variant docs/variant` copies the records (gzip) and writes the table
(prompt- and instruction-level strict accuracy, mean token log-probability under the plain model).
"""
from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path

RUNS = {"greedy": "dev-base/greedy", "agd-gated (AGD_e)": "dev-base/agd-gated",
        "AGD_e, min_prob_ratio 0.25": "dev-rel0.25/agd-gated", "AGD_e, min_prob_ratio 0.5": "dev-rel0.5/agd-gated"}


def _records(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f) if not r.get("error")}


def _inst(rec: dict) -> list[float]:
    v = rec["scores"]["inst_strict"]
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


def table(root: Path) -> str:
    runs = {name: _records(next(iter(sorted((root / rel).glob("records.jsonl*"))))) for name, rel in RUNS.items()}
    ids = sorted(set.intersection(*map(set, runs.values())))
    lines = [f"{len(ids)} items of rules-calibration (bf16)", "",
             "| run | prompt_strict | inst_strict | logprob |", "|---|---|---|---|"]
    for name, recs in runs.items():
        lines.append(f"| {name} | {statistics.mean(float(recs[i]['scores']['prompt_strict']) for i in ids):.3f} | "
                     f"{statistics.mean(x for i in ids for x in _inst(recs[i])):.3f} | "
                     f"{statistics.mean(recs[i]['quality']['logprob'] for i in ids):.3f} |")
    return "\n".join(lines)


def main(src: str, dest: str) -> None:
    src_root, dest_root = Path(src), Path(dest)
    for rel in RUNS.values():
        out = dest_root / rel
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text((src_root / rel / "run.json").read_text())
        lines = sorted((src_root / rel / "records.jsonl").read_text().splitlines(), key=lambda x: json.loads(x)["id"])
        with gzip.GzipFile(out / "records.jsonl.gz", "wb", mtime=0) as f:
            f.write(("\n".join(lines) + "\n").encode())
    (dest_root / "dev-tuning.md").write_text("# min_prob_ratio, tuned on the dev set\n\n" + __doc__.split("\n\n", 1)[1]
                                            + "\n" + table(dest_root) + "\n")
    print(table(dest_root))


if __name__ == "__main__":
    main(*sys.argv[1:3])
