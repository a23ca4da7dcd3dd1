"""``agd bench``: speed and memory of greedy vs AGD, with the modes interleaved in one process.

Two measurements, each in fresh subprocesses:

- **latency** (default): one sequence, prompts of ``--lengths`` tokens, ``--new-tokens`` tokens
  each. Per length, one process holds the model and runs ``--rounds`` rounds; every round times
  each mode once, in alternation (greedy, AGD, greedy, AGD ...), twice: the prompt alone (prefill:
  one token) and the whole generation. Load on a shared machine then hits all modes alike; the
  headline ratio is the ratio of the wall-clock medians, with the spread of the per-round ratios.
  Peak memory comes from one more process per mode (a process's high-water mark is its own).
- **throughput** (``--throughput``): ``--batch-sizes`` sequences at once, prompts of mixed
  lengths (``--prompt-range``), generated tokens per second for greedy (transformers' batched
  ``model.generate``, left-padded) and the AGD modes, prefill and decode separately, interleaved
  the same way.

Prompts are seeded random token ids (architecture-agnostic; works for random-init models); the ROI
is each prompt's first quarter, standing in for a system prompt. Every mode decodes exactly the
number of tokens asked (end-of-sequence does not stop it). Every timed run is written to the JSON,
so any figure can be recomputed from it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .config import AGDConfig
from .decoding import Decoder, make_jobs, run
from .errors import AgdError
from .eval.datasets import load_items
from .models import DTYPE_HELP, dtype_name, load_model, native_bf16, resolve_dtype
from .prompt import render_prompt
from .provenance import provenance
from .roi import Region, resolve_region
from .shapes import SHAPES, random_model
from .sources import left_pad

__all__ = ["MODES", "run_bench", "register_bench"]

# mode -> generate settings. "greedy" is transformers' ``model.generate``; "greedy-loop" is greedy through
# agdecode's own loop (the Decoder, a KV cache that appends in place, each prompt prefilled at its own
# length on a CPU), the fair baseline for AGD, which runs through the same loop. "Forced" AGD (min_prob=0) attributes k=5 candidates at every step,
# the worst case for the reverse engine; the forward engine costs the same either way.
MODES: dict[str, dict] = {
    "greedy": {},
    "greedy-loop": dict(method="greedy"),
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
    """The model and its tokenizer (None for a random-init model)."""
    dtype = resolve_dtype(args.dtype, args.device)
    if args.random_init:
        return random_model(args.random_init, device=args.device, dtype=dtype), None
    return load_model(args.model, dtype=dtype, device=args.device)


def _prompts(model, lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [torch.randint(min(1000, vocab // 4), vocab - 1, (n,), generator=gen) for n in lengths]


def _rules_prompts(tok, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` rules dev conversations, rendered, with their system message as the ROI: real
    prompts, on which AGD_e's entropy gate opens as it does in use (random ids rarely open it)."""
    items = load_items("rules", "rules").items
    out = []
    for it in (items * (n // len(items) + 1))[:n]:
        prompt = render_prompt(tok, it["messages"])
        out.append((prompt.input_ids[0], resolve_region("system", prompt).tokens.float()))
    return out


def _decode(model, mode: str, prompts: list, n_tokens: int, device: str) -> int:
    """Generate ``n_tokens`` for every prompt at once with ``mode``; return the number of guided steps.
    A prompt is token ids ``(T,)`` (ROI: its first quarter) or ``(ids, roi weights)``."""
    prompts = [p if isinstance(p, tuple) else (p, (torch.arange(len(p)) < max(1, len(p) // 4)).float())
               for p in prompts]
    if mode == "greedy":  # transformers' own batched generate, left-padded
        ids, mask = left_pad([p for p, _ in prompts])
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_tokens,
                           min_new_tokens=n_tokens, do_sample=False, pad_token_id=0)
        return 0
    cfg = AGDConfig(max_new_tokens=n_tokens, min_new_tokens=n_tokens, **MODES[mode])  # greedy-loop too
    jobs = [job for p, roi in prompts for job in make_jobs(model, None, cfg, [p], regions=[Region("roi", roi)])]
    run(Decoder(model, None, cfg), jobs, len(jobs))
    return sum(s.reason == "attribution" for j in jobs for s in j.steps)


def _timed(fn, device: str) -> tuple[float, float, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _worker(args) -> dict:
    """Interleaved timing rounds (or one memory run) in this process; returns every run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _load(args)
    with torch.no_grad():  # page every weight in (safetensors are memory-mapped) before taking the base
        model(torch.zeros(1, 1, dtype=torch.long, device=args.device))
    base = torch.cuda.memory_allocated() / 2**20 if args.device.startswith("cuda") else _rss_mib()
    if args.throughput and args.prompts == "rules":
        cases = [(b, _rules_prompts(tok, b)) for b in args.batch_sizes]
    elif args.throughput:
        lo, hi = args.prompt_range
        cases = [(b, _prompts(model, [int(n) for n in torch.randint(lo, hi + 1, (b,),
                                                                     generator=torch.Generator().manual_seed(b))], b))
                 for b in args.batch_sizes]
    else:
        cases = [(1, _prompts(model, [args.length], args.length))]
    modes = [args.mode] if args.memory_mode else args.modes

    def tokens(mode: str) -> int:
        return args.reverse_tokens if mode == "agd-reverse" else args.new_tokens

    runs = []
    for b, prompts in cases:  # warm-up: each mode once, short
        for mode in modes:
            _decode(model, mode, prompts, 2, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for r in range(1 if args.memory_mode else args.rounds):
        for b, prompts in cases:
            for mode in modes:  # interleaved: every round runs every mode, in the same order
                for phase, n in (("prefill", 1), ("total", tokens(mode))):
                    # Prefill alone is timed in the first --prefill-rounds rounds only (it is the long part).
                    if phase == "prefill" and (args.memory_mode or r >= args.prefill_rounds):
                        continue
                    wall, cpu, guided = _timed(lambda: _decode(model, mode, prompts, n, args.device), args.device)
                    runs.append(dict(round=r, mode=mode, batch=b, phase=phase, new_tokens=n, wall_s=wall, cpu_s=cpu,
                                     guided_steps=guided,
                                     prompt_tokens=[len(p[0] if isinstance(p, tuple) else p) for p in prompts]))
    out = dict(length=args.length, runs=runs, base_mib=base)
    if args.memory_mode:
        out.update(mode=args.mode, peak_mib=_peak_mib(args.device))
    return out


def _machine(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)  # before provenance(), which records the thread count
    return dict(provenance(), device=args.device, dtype=dtype_name(resolve_dtype(args.dtype, args.device)),
                dtype_asked=args.dtype, bf16_units=native_bf16(args.device)[1],
                model=args.random_init and f"random-init:{args.random_init}" or args.model,
                command="agd bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]))


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(runs: list[dict], key: tuple = ("batch",)) -> dict:
    """Per (key..., mode): medians and min-max of wall and CPU seconds, prefill and decode apart.

    Decode time of a run = its total minus the same round's prefill of the same mode; per-round
    ratios to greedy give the spread of the headline ratio (ratio of the medians).
    """
    def k(r):
        return tuple(r[x] for x in key)

    by: dict = {}
    for r in runs:
        by.setdefault((k(r), r["mode"], r["round"]), {})[r["phase"]] = r
    out: dict = {}
    for (kk, mode, rnd), ph in by.items():
        if "total" not in ph:
            continue
        t, p = ph["total"], ph.get("prefill")
        cell = out.setdefault(kk, {}).setdefault(mode, {"wall": [], "cpu": [], "prefill_wall": [], "decode_wall": [],
                                                        "rounds": {}, "guided": [],
                                                        "tokens": t["new_tokens"] * t["batch"],
                                                        "decode_steps": max(t["new_tokens"] - 1, 1)})
        cell["wall"].append(t["wall_s"])
        cell["cpu"].append(t["cpu_s"])
        cell["rounds"][rnd] = t["wall_s"]
        cell["guided"].append(t.get("guided_steps", 0) / cell["tokens"])
        if p is not None:
            cell["prefill_wall"].append(p["wall_s"])
    for (kk, mode, rnd), ph in by.items():  # decode = total - prefill (of this round, else the median one)
        c = out.get(kk, {}).get(mode)
        if c is None or "total" not in ph or not c["prefill_wall"]:
            continue
        p = ph["prefill"]["wall_s"] if "prefill" in ph else statistics.median(c["prefill_wall"])
        c["decode_wall"].append(ph["total"]["wall_s"] - p)
    table: dict = {}
    for kk, modes in out.items():
        for mode, c in modes.items():
            row = {"wall_s": _stats(c["wall"]), "cpu_s": _stats(c["cpu"]), "tokens": c["tokens"],
                   "tokens_per_s": c["tokens"] / statistics.median(c["wall"]),
                   "guided_share": statistics.median(c["guided"])}
            if c["prefill_wall"]:
                row["prefill_s"] = _stats(c["prefill_wall"])
                row["decode_s_per_step"] = _stats([d / c["decode_steps"] for d in c["decode_wall"]])
            # Ratios to transformers' generate ("x_greedy_*") and to greedy through agdecode's own loop ("x_loop_*").
            for prefix, ref in (("x_greedy", modes.get("greedy")), ("x_loop", modes.get("greedy-loop"))):
                if ref is not None:
                    row.update(_ratios(c, ref, prefix))
            table.setdefault(kk, {})[mode] = row
    return table


def _ratios(c: dict, g: dict, prefix: str) -> dict:
    """Wall, CPU, prefill and decode ratios of cell ``c`` to reference cell ``g`` (per token: the reverse
    engine decodes fewer), with the spread of the per-round wall ratios."""
    per_token = g["tokens"] / c["tokens"]
    row = {f"{prefix}_wall": statistics.median(c["wall"]) / statistics.median(g["wall"]) * per_token,
           f"{prefix}_cpu": statistics.median(c["cpu"]) / statistics.median(g["cpu"]) * per_token}
    per_round = [c["rounds"][r] / g["rounds"][r] * per_token for r in c["rounds"] if r in g["rounds"]]
    row[f"{prefix}_wall_rounds"] = {"min": min(per_round), "max": max(per_round)}
    if c["prefill_wall"] and g["prefill_wall"]:
        row[f"{prefix}_prefill"] = statistics.median(c["prefill_wall"]) / statistics.median(g["prefill_wall"])
        row[f"{prefix}_decode"] = statistics.median(c["decode_wall"]) / statistics.median(g["decode_wall"]) \
            * (g["decode_steps"] / c["decode_steps"])
    return row


def _provenance(machine: dict) -> str:
    git = machine.get("git") or {}
    return (f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['threads']} threads, "
            f"{machine['dtype']} ({machine.get('bf16_units', '?')}); commit {str(git.get('commit'))[:10]}"
            f"{' (uncommitted changes)' if git.get('dirty') else ''}")


def _ratio(r: dict, prefix: str) -> str:
    """``x`` of ``r`` to a reference, with the spread of the per-round ratios ('' without that reference)."""
    if f"{prefix}_wall" not in r:
        return ""
    xr = r[f"{prefix}_wall_rounds"]
    return f"**{r[f'{prefix}_wall']:.2f}** [{xr['min']:.2f}-{xr['max']:.2f}]"


def _decode_cells(r: dict) -> str:
    """Decode s/step and its ratio; '-' where total minus prefill is not positive (a few decode steps
    against a long prefill: the difference is noise)."""
    d = r["decode_s_per_step"]["median"]
    if d <= 0:
        return "- | -"
    return f"{d:.4f} | {r.get('x_loop_decode', float('nan')):.2f}"


def _latency_table(summary: dict, memory: dict, machine: dict, args) -> str:
    nan = float("nan")
    lines = [f"# agd bench (latency): {machine['model']} on {machine.get('gpu') or machine['cpu']} "
             f"({machine['device']}, {machine['dtype']})", "",
             f"`{machine['command']}`", "",
             f"{_provenance(machine)}; one "
             f"sequence, {args.new_tokens} new tokens (reverse engine: {args.reverse_tokens}); {args.rounds} rounds "
             "with the modes interleaved, after a warm-up; median [min-max] over rounds. `x loop` = ratio of the "
             "wall-clock medians per token to `greedy-loop` (greedy through agdecode's own loop, the fair "
             "baseline), `x generate` to `greedy` (transformers' `model.generate`); [min-max] of the per-round "
             "ratios. Prefill = the prompt alone (one token); "
             "decode = the rest, per step. `agd-reverse` and `agd-forward` attribute k=5 candidates at every step "
             "(min_prob=0); `agd_e-forward` is the paper's setting (min_prob 0.05, entropy gate 1.734); `guided` = "
             "share of the tokens chosen by attribution. Peak memory: "
             "whole process of a separate run (CPU: max RSS; CUDA: max allocated), in brackets above the loaded model.",
             "", "| prompt | mode | wall s/token | x loop (wall) | x generate (wall) | guided | prefill s | "
             "x loop prefill | x generate prefill | decode s/step | x loop decode | peak MiB (above model) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in args.lengths:
        rows = summary.get((length,), {})
        for mode in args.modes:
            r = rows.get(mode)
            if r is None:
                continue
            n, w = r["tokens"], r["wall_s"]
            mem = memory.get((length, mode))
            memtxt = f"{mem['peak_mib']:.0f} ({mem['peak_mib'] - mem['base_mib']:.0f})" if mem else ""
            lines.append(
                f"| {length} | {mode} | {w['median'] / n:.4f} [{w['min'] / n:.4f}-{w['max'] / n:.4f}] | "
                f"{_ratio(r, 'x_loop')} | {_ratio(r, 'x_greedy')} | {r['guided_share']:.2f} | "
                + (f"{r['prefill_s']['median']:.3f} | {r.get('x_loop_prefill', nan):.2f} | "
                   f"{r.get('x_greedy_prefill', nan):.2f} | "
                   f"{_decode_cells(r)} | "
                   if "prefill_s" in r else "| | | | | ")
                + f"{memtxt} |")
        f, rv = rows.get("agd-forward"), rows.get("agd-reverse")
        if f and rv:
            sp = (rv["wall_s"]["median"] / rv["tokens"]) / (f["wall_s"]["median"] / f["tokens"])
            lines.append(f"| {length} | forward speed-up over reverse (wall, per token) | {sp:.1f}x | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def _throughput_table(summary: dict, machine: dict, args) -> str:
    lo, hi = args.prompt_range
    lines = [f"# agd bench (throughput): {machine['model']} on {machine.get('gpu') or machine['cpu']} "
             f"({machine['device']}, {machine['dtype']})", "",
             f"`{machine['command']}`", "",
             f"{_provenance(machine)}; batches of B sequences with "
             + ("the first B rules dev conversations as prompts (ROI: their system message)" if args.prompts == "rules"
                else f"prompts of {lo}-{hi} tokens (seeded random ids; ROI: their first quarter)")
             + f", {args.new_tokens} new tokens each; "
             f"{args.rounds} rounds with the modes interleaved; medians, [min-max] of the per-round ratios. "
             "`greedy` is transformers' batched `model.generate` (left-padded prefill, concatenating cache); "
             "`greedy-loop` is greedy through agdecode's own loop, the one AGD runs in (the fair baseline: "
             "`x loop`). Generated tokens/s = B x new tokens / wall seconds; `guided` = share of the generated "
             "tokens chosen by attribution; `gain` = tokens/s at B over tokens/s at batch 1 of the same mode "
             "(its ratio to greedy-loop's gain).", "",
             "| B | mode | tokens/s | x loop tokens/s | x generate tokens/s | guided | gain over B=1 | gain / loop's "
             "gain | prefill s | x loop prefill | decode s/step | x loop decode |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    one = summary.get((args.batch_sizes[0],), {}) if args.batch_sizes[0] == 1 else {}
    nan = float("nan")

    def speed(r: dict, prefix: str) -> str:
        # tokens/s ratio = 1 / wall ratio (the same tokens); the spread likewise inverted
        if f"{prefix}_wall" not in r:
            return ""
        xr = r[f"{prefix}_wall_rounds"]
        return f"**{1 / r[f'{prefix}_wall']:.2f}** [{1 / xr['max']:.2f}-{1 / xr['min']:.2f}]"

    for b in args.batch_sizes:
        rows = summary.get((b,), {})
        for mode in args.modes:
            r = rows.get(mode)
            if r is None:
                continue
            gain = r["tokens_per_s"] / one[mode]["tokens_per_s"] if mode in one else nan
            lgain = (rows["greedy-loop"]["tokens_per_s"] / one["greedy-loop"]["tokens_per_s"]
                     if "greedy-loop" in rows and "greedy-loop" in one else nan)
            lines.append(f"| {b} | {mode} | {r['tokens_per_s']:.1f} | {speed(r, 'x_loop')} | {speed(r, 'x_greedy')} | "
                         f"{r['guided_share']:.2f} | {gain:.2f} | {gain / lgain:.2f} | "
                         f"{r['prefill_s']['median']:.2f} | {r.get('x_loop_prefill', nan):.2f} | "
                         f"{_decode_cells(r)} |")
    return "\n".join(lines) + "\n"


def _subprocess(args, extra: list[str]) -> dict | None:
    cmd = [sys.executable, "-m", "agdecode.bench", "--worker", "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--reverse-tokens", str(args.reverse_tokens),
           "--rounds", str(args.rounds), "--modes", *args.modes, "--batch-sizes", *map(str, args.batch_sizes),
           "--prompt-range", *map(str, args.prompt_range), "--prefill-rounds", str(args.prefill_rounds),
           "--prompts", args.prompts] + extra \
        + (["--random-init", args.random_init] if args.random_init else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tqdm.write(f"{' '.join(extra)}: FAILED\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(args) -> dict:
    """Run the measurements in subprocesses; write JSON (every run) + markdown under ``args.out``."""
    if args.prompts == "rules" and (args.random_init or not args.throughput):
        raise AgdError("--prompts rules needs --throughput and a real model (not --random-init): it renders "
                       "the rules conversations with the model's chat template")
    machine = _machine(args)
    print(json.dumps(machine))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (args.random_init or args.model).replace("/", "_") + f"-{args.device.split(':')[0]}-{machine['dtype']}" \
        + ("-rules" if args.prompts == "rules" else "")
    if args.throughput:
        res = _subprocess(args, ["--throughput"])
        runs = res["runs"] if res else []
        summary = summarize(runs, ("batch",))
        table = _throughput_table(summary, machine, args)
        data = dict(machine=machine, runs=runs, summary={str(k[0]): v for k, v in summary.items()})
        stem += "-throughput"
    else:
        runs, memory = [], {}
        jobs = [(length, None) for length in args.lengths]
        if args.memory:
            jobs += [(length, mode) for length in args.lengths for mode in args.modes]
        for length, mode in tqdm(jobs, desc="bench", unit="process"):
            res = _subprocess(args, ["--length", str(length)] + (["--memory-mode", "--mode", mode] if mode else []))
            if res is None:
                continue
            if mode:
                memory[(length, mode)] = {"peak_mib": res["peak_mib"], "base_mib": res["base_mib"]}
            else:
                runs += [dict(r, length=length) for r in res["runs"]]
        summary = summarize(runs, ("length",))
        table = _latency_table(summary, memory, machine, args)
        data = dict(machine=machine, runs=runs, summary={str(k[0]): v for k, v in summary.items()},
                    memory=[dict(length=l, mode=m, **v) for (l, m), v in memory.items()])
        stem += "-latency"
    print(table)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out / f"{stem}.md").write_text(table)
    print(f"written: {out / (stem + '.json')}, {out / (stem + '.md')}")
    return data


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model to load (default: smollm2)")
    p.add_argument("--random-init", choices=list(SHAPES), help="use a randomly initialised model of this shape")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="latency: prompt lengths")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--reverse-tokens", type=int, default=4,
                   help="tokens for the slow reverse engine (default 4; each is a full recompute)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="what to measure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--prefill-rounds", type=int, default=10**6,
                   help="time the prompt alone in the first N rounds only (default: every round)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="latency: skip the peak-memory runs")
    p.add_argument("--throughput", action="store_true", help="measure batched throughput instead of latency")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32], help="throughput: batch sizes")
    p.add_argument("--prompts", choices=["random", "rules"], default="random",
                   help="throughput: seeded random ids of --prompt-range tokens, ROI their first quarter (default), "
                        "or the rules dev conversations, ROI their system message (the entropy gate opens as in use)")
    p.add_argument("--prompt-range", type=int, nargs=2, default=[256, 512], metavar=("MIN", "MAX"),
                   help="throughput: prompt lengths drawn from this range (default 256 512)")
    p.add_argument("--out", default="docs/bench", help="folder for the JSON and markdown results")


def register_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of greedy vs AGD (modes interleaved in one process)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=lambda args: (run_bench(args), 0)[1])


if __name__ == "__main__":  # the measuring subprocess
    parser = argparse.ArgumentParser()
    _add_args(parser)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--memory-mode", action="store_true")
    parser.add_argument("--mode", choices=list(MODES))
    parser.add_argument("--length", type=int)
    a = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(json.dumps(_worker(a)))
