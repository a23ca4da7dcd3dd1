"""``agd bench``: seconds per token and peak memory of greedy vs AGD engines, measured in one run.

Each (mode, prompt length) runs in a fresh subprocess so that peak memory (the process's
high-water mark on CPU, ``max_memory_allocated`` on CUDA) belongs to that mode alone. Prompts are
seeded random token ids (architecture-agnostic, works for random-init models); the ROI is their
first quarter, standing in for a system prompt. Every mode decodes exactly ``new_tokens`` tokens
(end-of-sequence does not stop it). Timings: one warm-up, then the median of ``repeats``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["MODES", "run_bench", "register_bench"]

# mode -> generate settings. "Forced" AGD (min_prob=0) attributes k=5 candidates at every step,
# the worst case for the reverse engine; the forward engine costs the same either way.
MODES: dict[str, dict] = {
    "greedy": {},
    "agd-reverse": dict(engine="reverse", k=5, min_prob=0.0),
    "agd-forward": dict(engine="forward", k=5, min_prob=0.0),
    "agd_e-forward": dict(engine="forward", k=5, min_prob=0.05, entropy_threshold=1.734),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load(args):
    from .models import load_model
    from .shapes import random_model

    dtype = getattr(torch, args.dtype)
    if args.random_init:
        return random_model(args.random_init, device=args.device, dtype=dtype)
    return load_model(args.model, dtype=dtype, device=args.device)[0]


def _worker(args) -> dict:
    """Time one mode at one prompt length in this process; return the measurements."""
    from .decoding import AGDConfig, generate_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    with torch.no_grad():  # page every weight in (safetensors are memory-mapped) before taking the base
        model(torch.zeros(1, 1, dtype=torch.long, device=args.device))
    base = torch.cuda.memory_allocated() / 2**20 if args.device.startswith("cuda") else _rss_mib()
    gen = torch.Generator().manual_seed(args.length)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 4), vocab - 1, (1, args.length), generator=gen).to(args.device)
    roi = torch.zeros(args.length, dtype=torch.bool)
    roi[: max(1, args.length // 4)] = True
    n = args.reverse_tokens if args.mode == "agd-reverse" else args.new_tokens

    def once(n_tokens: int) -> tuple[float, int]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        if args.mode == "greedy":
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                               pad_token_id=0)
            guided = 0
        else:
            cfg = AGDConfig(max_new_tokens=n_tokens, min_new_tokens=n_tokens, **MODES[args.mode])
            guided = generate_ids(model, ids, {"roi": roi}, cfg).guided_steps
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, guided

    once(min(n, 2))  # warm-up at the same prompt length (also sets the memory high-water mark)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [once(n) for _ in range(args.repeats)]
    seconds, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return dict(mode=args.mode, length=args.length, new_tokens=n, repeats=args.repeats, seconds=seconds,
                s_per_token=seconds / n, cpu_s_per_token=cpu / n, guided_steps=runs[0][2],
                peak_mib=_peak_mib(args.device), base_mib=base)


def _machine(args) -> dict:
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), device=args.device,
                dtype=args.dtype, model=args.random_init and f"random-init:{args.random_init}" or args.model)
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _table(results: list[dict], machine: dict, args) -> str:
    # On a CPU with one thread per run, CPU seconds measure the work done even when other processes
    # share the machine; wall-clock seconds (also reported) do not. On a GPU, wall clock it is.
    key = "cpu_s_per_token" if machine["device"] == "cpu" and args.threads == 1 else "s_per_token"
    lines = [f"# agd bench: {machine['model']} on {machine.get('gpu') or machine['cpu']} ({machine['device']}, "
             f"{machine['dtype']})", "",
             f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['threads']} threads; "
             f"{args.new_tokens} new tokens (reverse engine: {args.reverse_tokens}), median of {args.repeats} "
             "after one warm-up. ROI = first quarter of a random-token prompt. `agd-reverse` and `agd-forward` "
             "attribute k=5 candidates at every step (min_prob=0); `agd_e-forward` is the paper's setting "
             "(min_prob 0.05, entropy gate 1.734). Peak memory: whole process (CPU: max RSS; CUDA: "
             "max allocated), and in brackets the part above the loaded model. Ratios use "
             + ("CPU seconds (one thread per run; robust to other load on the machine)." if key == "cpu_s_per_token"
                else "wall-clock seconds."), "",
             "| prompt | mode | wall s/token | CPU s/token | x greedy | peak MiB (above model) | x greedy (above model) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    by = {(r["length"], r["mode"]): r for r in results}
    for length in args.lengths:
        g = by.get((length, "greedy"))
        for mode in args.modes:
            r = by.get((length, mode))
            if r is None:
                continue
            extra = r["peak_mib"] - r["base_mib"]
            if g:
                gx = g["peak_mib"] - g["base_mib"]
                ratios = (f"{r[key] / g[key]:.2f}",
                          f"{r['peak_mib'] / g['peak_mib']:.2f} ({extra / max(gx, 1e-9):.2f})")
            else:
                ratios = ("", "")
            lines.append(f"| {length} | {mode} | {r['s_per_token']:.4f} | {r['cpu_s_per_token']:.4f} | {ratios[0]} | "
                         f"{r['peak_mib']:.0f} ({extra:.0f}) | {ratios[1]} |")
        f, rv = by.get((length, "agd-forward")), by.get((length, "agd-reverse"))
        if f and rv:
            lines.append(f"| {length} | forward speed-up over reverse | | | {rv[key] / f[key]:.1f}x | | |")
    return "\n".join(lines) + "\n"


def run_bench(args) -> list[dict]:
    """Run every (length, mode) in its own subprocess and write JSON + markdown under ``args.out``."""
    from tqdm import tqdm

    machine = _machine(args)
    print(json.dumps(machine))
    results = []
    jobs = [(length, mode) for length in args.lengths for mode in args.modes]
    for length, mode in tqdm(jobs, desc="bench", unit="run"):
        cmd = [sys.executable, "-m", "agdecode.bench", "--worker", "--mode", mode, "--length", str(length),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--new-tokens", str(args.new_tokens), "--reverse-tokens", str(args.reverse_tokens),
               "--repeats", str(args.repeats)] + (["--random-init", args.random_init] if args.random_init else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tqdm.write(f"{mode} @ {length}: FAILED\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        tqdm.write(f"{mode:>14} @ {length:>5}: {r['s_per_token']:.4f} s/token, peak {r['peak_mib']:.0f} MiB")
    table = _table(results, machine, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (args.random_init or args.model).replace("/", "_") + f"-{args.device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(dict(machine=machine, results=results), indent=1))
    (out / f"{stem}.md").write_text(table)
    print(f"written: {out / (stem + '.json')}, {out / (stem + '.md')}")
    return results


def _add_args(p: argparse.ArgumentParser) -> None:
    from .shapes import SHAPES

    p.add_argument("--model", default="smollm2", help="model to load (default: smollm2)")
    p.add_argument("--random-init", choices=list(SHAPES), help="use a randomly initialised model of this shape")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--reverse-tokens", type=int, default=4,
                   help="tokens for the slow reverse engine (default 4; each is a full recompute)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median; default 3)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="what to measure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's choice)")
    p.add_argument("--out", default="docs/bench", help="folder for the JSON and markdown results")


def register_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of greedy vs AGD engines (ratios from one run)",
                       description=__doc__)
    _add_args(p)
    p.set_defaults(func=lambda args: (run_bench(args), 0)[1])


if __name__ == "__main__":  # the per-measurement subprocess
    parser = argparse.ArgumentParser()
    _add_args(parser)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=list(MODES))
    parser.add_argument("--length", type=int)
    a = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(json.dumps(_worker(a)))
