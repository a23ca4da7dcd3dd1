"""Exactness and batched-speed checks for a GPU machine (no weights, no network, no pytest needed).

    scripts/gpu_check.sh                       # on a CUDA machine: the full check, under 8 minutes
    python scripts/gpu_check.py --device cpu --shape tiny-llama --quick    # the same code on a CPU (tests)

1. Exactness, fp32, tiny random models of every supported architecture on the device: a batch of
   prompts of different lengths gives each sequence its batch-of-one tokens and ROI scores (1e-4
   relative), for two ROIs at once and a head ROI; the forward engine's scores equal the reverse
   engine's (1e-4 relative).
2. The same batch-vs-single comparison on a random-init model of a real shape (default
   Llama-3.1-8B) in bf16: agreement rates are printed (bf16 is not expected to be bit-stable under
   padding), not asserted.
3. ``agd bench --throughput`` and ``agd bench`` (latency) on that model, results in ``--out``.

Exit status 1 if an fp32 exactness check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from agdecode.decoding import AGDConfig, Decoder, Job, run  # noqa: E402
from agdecode.methods import engine_row  # noqa: E402
from agdecode.roi import Region  # noqa: E402
from agdecode.shapes import random_model  # noqa: E402

ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention"]),
}


def tiny(arch: str, device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=1000, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.to(device).eval()


def decode(model, prompts, cfg: AGDConfig, heads: torch.Tensor | None = None) -> list[Job]:
    jobs = []
    for p in prompts:
        first = torch.zeros(len(p))
        first[: len(p) // 3] = 1.0
        last = torch.zeros(len(p))
        last[len(p) // 2:] = 1.0
        regions = [Region("first", first, heads), Region("last", last)]
        jobs.append(Job(engine_row(p, regions), regions, max_new_tokens=cfg.max_new_tokens))
    run(Decoder(model, None, cfg), jobs, len(jobs))
    return jobs


def compare(batched: list[Job], single: list[Job]) -> tuple[float, float]:
    """(share of sequences with identical tokens, largest relative score difference)."""
    same, worst = 0, 0.0
    for a, b in zip(batched, single):
        same += a.out_ids == b.out_ids
        for s, t in zip(a.steps, b.steps):
            for c, d in zip(s.candidates, t.candidates):
                if c.scores and d.scores:
                    scale = max(max(abs(v) for v in x.scores.values()) for x in t.candidates if x.scores) or 1e-6
                    worst = max(worst, max(abs(c.scores[k] - d.scores[k]) / scale for k in c.scores))
    return same / len(batched), worst


def prompts_for(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    return [torch.randint(min(100, v // 4), v - 1, (n,), generator=g) for n in lengths]


def exactness(device: str, n_tokens: int) -> bool:
    ok = True
    for arch in ARCHS:
        model = tiny(arch, device)
        prompts = prompts_for(model, [37, 12, 25])
        heads = torch.zeros(2, 4)
        heads[1, 2] = 1.0
        for name, cfg, h in (("two token ROIs", AGDConfig(k=4, min_prob=0.0, max_new_tokens=n_tokens), None),
                             ("head + token ROI", AGDConfig(k=4, min_prob=0.0, max_new_tokens=n_tokens), heads)):
            batched = decode(model, prompts, cfg, h)
            single = [decode(model, [p], cfg, h)[0] for p in prompts]
            same, worst = compare(batched, single)
            good = same == 1.0 and worst < 1e-4
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {arch:7} batch vs single, {name}: tokens identical {same:.0%}, "
                  f"max relative score difference {worst:.1e}", flush=True)
        rev = decode(model, prompts, AGDConfig(k=4, min_prob=0.0, max_new_tokens=n_tokens, engine="reverse"))
        fwd = decode(model, prompts, AGDConfig(k=4, min_prob=0.0, max_new_tokens=n_tokens))
        same, worst = compare(fwd, rev)
        good = same == 1.0 and worst < 1e-4
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {arch:7} forward vs reverse engine: tokens identical {same:.0%}, "
              f"max relative score difference {worst:.1e}", flush=True)
    return ok


def real_shape(shape: str, device: str, dtype: str, n_tokens: int) -> dict:
    t0 = time.perf_counter()
    model = random_model(shape, device=device, dtype=getattr(torch, dtype))
    prompts = prompts_for(model, [300, 120, 512, 64])
    cfg = AGDConfig(k=5, min_prob=0.0, max_new_tokens=n_tokens)
    batched = decode(model, prompts, cfg)
    single = [decode(model, [p], cfg)[0] for p in prompts]
    same, worst = compare(batched, single)
    out = {"shape": shape, "dtype": dtype, "tokens_identical": same, "max_relative_score_difference": worst,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"info {shape} {dtype}: batch vs single tokens identical {same:.0%}, max relative score difference "
          f"{worst:.1e} (not asserted in {dtype})", flush=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true", help="short runs (for a CPU test of this script)")
    p.add_argument("--out", default="gpu-check")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; pass --device cpu to run the checks on the CPU", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 3 if a.quick else 8
    ok = exactness(a.device, n)
    info = real_shape(a.shape, a.device, a.dtype, n)
    (out / "exactness.json").write_text(json.dumps({"fp32_exact": ok, "real_shape": info}, indent=1))
    bench = [sys.executable, "-m", "agdecode", "bench", "--random-init", a.shape, "--device", a.device,
             "--dtype", a.dtype, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if a.quick:
        runs = [["--throughput", "--batch-sizes", "1", "2", "--prompt-range", "8", "16", "--new-tokens", "2",
                 "--rounds", "1", "--modes", "greedy", "agd_e-forward"]]
    else:
        runs = [["--throughput", "--batch-sizes", "1", "4", "16", "32", "--new-tokens", "64", "--rounds", "3",
                 "--modes", "greedy", "agd-forward", "agd_e-forward"],
                ["--lengths", "256", "1024", "4096", "--new-tokens", "64", "--rounds", "3", "--no-memory",
                 "--modes", "greedy", "agd-forward", "agd_e-forward"]]
    for extra in runs:
        print("bench:", " ".join(extra), flush=True)
        subprocess.run(bench + extra, env=env, check=True)
    print(f"gpu_check: fp32 exactness {'PASSED' if ok else 'FAILED'}; results in {out}/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
