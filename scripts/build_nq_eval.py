"""Copy the evaluation split of open-book NQ into the package (``src/agdecode/data/nq_oracle_eval.jsonl.gz``).

Source: ``shared/data/nq-open-oracle.jsonl.gz`` (Liu et al., "Lost in the Middle", MIT; NQ data
CC BY-SA 3.0): 2,655 NQ-open questions, each with its gold ("oracle") Wikipedia passage, ids = 0-based
line numbers. **Split:** lines < 2000 are for evaluation (copied here; the distractor passages of
the open-book set are also drawn from them only); lines >= 2000 are reserved for head discovery
and must never be used for evaluation.

Run: ``.venv/bin/python scripts/build_nq_eval.py [SOURCE]`` (deterministic; gzip without timestamp).
"""
from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

EVAL_LINES = 2000  # lines [0, 2000) evaluate; [2000, 2655) are the head-discovery split
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq-open-oracle.jsonl.gz"
OUT = Path(__file__).resolve().parent.parent / "src" / "agdecode" / "data" / "nq_oracle_eval.jsonl.gz"


def main(source: Path = SOURCE) -> None:
    rows = []
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if line_no >= EVAL_LINES:
                break
            d = json.loads(line)
            (ctx,) = d["ctxs"]
            rows.append({"line": line_no, "question": d["question"], "answers": d["answers"],
                         "title": ctx["title"], "text": ctx["text"]})
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:  # mtime=0: byte-identical rebuilds
        gz.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    OUT.write_bytes(buf.getvalue())
    print(f"{OUT}: {len(rows)} questions (source lines 0-{EVAL_LINES - 1}), {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)
