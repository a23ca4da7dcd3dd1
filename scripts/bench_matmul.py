"""Matrix-product speed of this CPU in fp32 and bf16, one thread: the figures the README's precision and
speed sections quote.

    .venv/bin/python scripts/bench_matmul.py > docs/bench/quiet/matmul.txt

1. GFLOP/s of ``torch.matmul`` with an 8192 x 2048 weight at 64 and 512 rows (what bf16 buys).
2. Microseconds of ``F.linear`` at 1, 2, 4 and 32 rows for SmolLM2's MLP shapes, in fp32 and bf16, and
   fp32 through oneDNN's packed linear (torch's private ``mkldnn`` ops): a decode step of AGD is two
   rows per sequence (primal and tangent) where greedy's is one.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def bench(f, n: int = 50) -> float:
    """Seconds per call, after three warm-up calls."""
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main() -> None:
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, 1 thread")
    for dt in (torch.float32, torch.bfloat16):
        w = torch.randn(8192, 2048, dtype=dt)
        rates = []
        for rows in (64, 512):
            x = torch.randn(rows, 2048, dtype=dt)
            rates.append(f"{rows} rows {2 * rows * 2048 * 8192 / bench(lambda: x @ w.T, 10) / 1e9:.0f} GFLOP/s")
        print(f"matmul 8192 x 2048 {str(dt)[6:]}: " + ", ".join(rates))
    for n, k in ((1536, 576), (576, 1536)):
        for dt in (torch.float32, torch.bfloat16):
            w = torch.randn(n, k, dtype=dt)
            cells = []
            for rows in (1, 2, 4, 32):
                x = torch.randn(rows, k, dtype=dt)
                cell = f"{rows} rows {bench(lambda: F.linear(x, w)) * 1e6:.0f} us"
                if dt == torch.float32:
                    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                    cell += f" (oneDNN packed {bench(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, 'none', [], '')) * 1e6:.0f})"
                cells.append(cell)
            print(f"F.linear {n} x {k} {str(dt)[6:]}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
