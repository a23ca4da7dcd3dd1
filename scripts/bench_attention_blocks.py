"""Does blocking the forward engine's prefill attention over keys (flash-style, online softmax) pay in
eager PyTorch? One 128-query chunk at the end of a 4096-token prompt, SmolLM2's attention shape
(3 key heads, 3 query heads each, head size 64, one ROI), one thread; the current `_dual_attention`
against key blocks of 256 / 512 / 1024 accumulated with running maxima (the primal output, the
softmax-JVP sums and the tangent outputs, in fp32), and both against a float64 reference.

    .venv/bin/python scripts/bench_attention_blocks.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from agdecode.engines.forward import _dual_attention  # noqa: E402


def bench(f, n: int = 10) -> float:
    """Milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def blocked(q0, qt, qk, k0, kt, v0, vt, mask, g: int, fv: float, bk: int = 512):
    """``_dual_attention`` over key blocks of ``bk``: the same inputs and outputs (q0 (b, h, G*T, d),
    qt (b, R, h, G*T, d), k0 (b, h, S, d), kt (b, R, h, S, d), mask (b, 1, T, S) additive)."""
    b, h, gt, d = q0.shape
    s, t, r = k0.shape[2], gt // g, qt.shape[1]
    f32 = torch.float32
    m = torch.full((b, h, gt, 1), -float("inf"), dtype=f32)       # running maximum of the scores
    l = torch.zeros(b, h, gt, 1, dtype=f32)                       # sum of exp(score - m)
    o0 = torch.zeros(b, h, gt, d, dtype=f32)                      # sum of p v0
    c = torch.zeros(b, r, h, gt, 1, dtype=f32)                    # sum of p ds
    a = torch.zeros(b, r, h, gt, d, dtype=f32)                    # sum of p ds v0
    bt = torch.zeros(b, r, h, gt, d, dtype=f32)                   # sum of p vt
    for j in range(0, s, bk):
        ks = slice(j, j + bk)
        s0 = (q0 @ k0[:, :, ks].mT).float()
        if mask is not None:
            s0.view(b, h, g, t, -1).add_(mask[:, :, None, :, ks])
        new = torch.maximum(m, s0.amax(-1, keepdim=True))
        p, scale, m = torch.exp(s0 - new), torch.exp(m - new), new
        l.mul_(scale).add_(p.sum(-1, keepdim=True))
        pd = p.to(q0.dtype)
        o0.mul_(scale).add_(pd @ v0[:, :, ks])
        ds = (qt @ k0[:, None, :, ks].mT).add_(qk[:, None] @ kt[:, :, :, ks].mT).float().mul_(p[:, None])
        c.mul_(scale[:, None]).add_(ds.sum(-1, keepdim=True))
        a.mul_(scale[:, None]).add_(ds.to(q0.dtype) @ v0[:, None, :, ks])
        bt.mul_(scale[:, None]).add_(pd[:, None] @ vt[:, :, :, ks])
    o0 = o0 / l
    ot = (a - c * o0[:, None] + bt / fv) / l[:, None]
    return o0.to(q0.dtype), ot.to(q0.dtype)


def main() -> None:
    torch.set_num_threads(1)
    b, h, g, t, s, d, r = 1, 3, 3, 128, 4096, 64, 1
    for dt in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        q0 = torch.randn(b, h, g * t, d, dtype=dt) * 0.3
        qt, qk = torch.randn(b, r, h, g * t, d, dtype=dt) * 0.1, q0 / 4
        k0, kt = torch.randn(b, h, s, d, dtype=dt), torch.randn(b, r, h, s, d, dtype=dt) * 0.1
        v0, vt = torch.randn(b, h, s, d, dtype=dt), torch.randn(b, r, h, s, d, dtype=dt) * 0.1
        pos, keys = torch.arange(s - t, s)[:, None], torch.arange(s)[None]
        mask = torch.where(keys <= pos, 0.0, -1e9).to(dt)[None, None]
        args = (q0, qt, qk, k0, kt, v0, vt, mask)
        ref = _dual_attention(*(x.double() for x in args), g, 2.0)
        runs = [("current", lambda: _dual_attention(*args, g, 2.0))] + [
            (f"key blocks of {bk}", lambda bk=bk: blocked(*args, g, 2.0, bk)) for bk in (256, 512, 1024)]
        for name, f in runs:
            o0, ot = f()
            e0 = ((o0.double() - ref[0]).norm() / ref[0].norm()).item()
            et = ((ot.double() - ref[1]).norm() / ref[1].norm()).item()
            print(f"{str(dt).removeprefix('torch.')}  {name:18s} {bench(f):7.2f} ms   relative error: primal {e0:.2g}, "
                  f"tangent {et:.2g}")


if __name__ == "__main__":
    main()
