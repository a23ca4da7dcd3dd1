"""sha256 per method of the decoded outputs (response text, override steps, per-step reasons) of agd eval runs.

    python scripts/hash_runs.py RUN_DIR      # RUN_DIR/<method>/records.jsonl (or .jsonl.gz): one line per method

Two runs of the same command at two commits decode the same tokens exactly when their lines match
(docs/identity.md).
"""
import gzip
import hashlib
import json
import sys
from pathlib import Path

root = Path(sys.argv[1])


def lines(d: Path) -> list[str]:
    if (d / "records.jsonl").is_file():
        return (d / "records.jsonl").read_text().splitlines()
    with gzip.open(d / "records.jsonl.gz", "rt") as f:
        return f.read().splitlines()


for d in sorted(p for p in root.iterdir() if (p / "records.jsonl").is_file() or (p / "records.jsonl.gz").is_file()):
    recs = sorted((json.loads(line) for line in lines(d)), key=lambda r: r["id"])
    payload = [(r["id"], r.get("response"), r.get("trace", {}).get("overrides"), r.get("trace", {}).get("reasons"),
                r.get("error")) for r in recs]
    print(f"{d.name:22s} n={len(recs):3d} {hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]}")
