"""Where a prefill's time goes: torch.profiler's operators by self time, plain model vs forward engine.

    .venv/bin/python scripts/profile_prefill.py 4096 --dtype float32 > docs/bench/quiet/profile-prefill-4096.txt

One random-token prompt of the given length (the bench's prompts), SmolLM2 (``--dtype``, default
auto: bf16 where the CPU has bf16 units), one thread; the forward engine with one ROI (the prompt's
first quarter), as `agd bench` runs it. One warm-up run of each first.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from agdecode.bench import _prompts
from agdecode.engines.forward import ForwardEngine
from agdecode.models import dtype_name, load_model
from agdecode.sources import Row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("length", type=int)
    p.add_argument("--rows", type=int, default=10, help="operators to list")
    p.add_argument("--dtype", default="auto", help="model dtype (default auto)")
    args = p.parse_args()
    if args.length < 1 or args.rows < 1:
        p.error("length and --rows must be at least 1")
    torch.set_num_threads(1)
    model = load_model("smollm2", dtype=args.dtype)[0]
    ids = _prompts(model, [args.length], 0)[0]
    roi = torch.zeros(1, args.length)
    roi[0, : args.length // 4] = 1

    def greedy():
        with torch.no_grad():
            model(ids[None], logits_to_keep=1)

    def agd():
        with ForwardEngine(model) as eng:
            eng.prefill([Row(ids, token_weights=roi)])

    print(f"# SmolLM2-135M-Instruct, {dtype_name(model.dtype)}, 1 thread, {args.length} tokens\n")
    greedy(), agd()  # warm-up
    for name, fn in (("greedy (plain forward)", greedy), ("AGD (forward engine, one ROI)", agd)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"## {name}, {args.length} tokens\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
