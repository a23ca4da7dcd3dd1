"""Long prompts joining a running batch of `agd serve`: the running requests' largest gap between tokens.

The server (in this process, the real HTTP path, AGD as its default method, no prefix reuse so
every prompt is computed in full) first gets RUNNING streaming requests that generate until told
to stop; once each streams, BURST requests with long, distinct prompts (a system message of
400-1,800 tokens, seeded) arrive together. Prefills run in pieces between decode steps
(`Decoder.advance`), so each running request keeps receiving tokens; the script records every
token's arrival and reports the largest gap between two tokens of a running request while the burst
joins, beside the burst's total prefill compute (`agd_prefill_seconds` from /metrics): the stall
that prefilling the burst at once, between two steps, would have caused. Records: OUT.jsonl (one
line per streamed token of a running request, one per burst request), OUT.json / OUT.md (summary).

    PYTHONPATH=src python scripts/bench_admission.py --out docs/bench/admission-smollm2-cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench_prefix import QUESTIONS, system_prompt
from bench_serve import serve_in_thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--running", type=int, default=2, help="requests decoding when the burst arrives")
    ap.add_argument("--burst", type=int, default=30, help="long prompts arriving together")
    ap.add_argument("--min-tokens", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/bench/admission-smollm2-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from openai import OpenAI

    import agdecode
    from agdecode.models import dtype_name
    from agdecode.provenance import provenance
    from agdecode.serve.app import AgdServer

    model, tok = agdecode.load_model(args.model, dtype=args.dtype)
    server = AgdServer(model, tok, "m", {}, max_batch=args.running + args.burst, prefix_cache_bytes=0)
    uv, thread, url = serve_in_thread(server)
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.burst)]
    # Distinct from their first tokens on ("Session i"), so no prompt shares a prefix with another.
    burst = [[{"role": "system", "content": system_prompt(tok, n, 1000 + i)},
              {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i, n in enumerate(lengths)]
    stop, started, tokens = threading.Event(), threading.Semaphore(0), {i: [] for i in range(args.running)}

    def running(i: int) -> None:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": "Answer at length."},
                                 {"role": "user", "content": f"Tell me everything about topic {i}."}],
            max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not tokens[i]:
                    started.release()
                tokens[i].append(time.perf_counter())
            if stop.is_set():
                stream.close()  # the server frees the row at its next token
                return

    def joining(i: int) -> dict:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="m", messages=burst[i], max_tokens=8)
        return {"kind": "burst", "request": i, "prompt_tokens": r.usage.prompt_tokens, "start": t0,
                "end": time.perf_counter()}

    pool = ThreadPoolExecutor(args.running + args.burst)
    runners = [pool.submit(running, i) for i in range(args.running)]
    for _ in range(args.running):
        started.acquire()
    t_burst = time.perf_counter()
    done = list(pool.map(joining, range(args.burst)))
    t_end = time.perf_counter()
    stop.set()
    for f in runners:
        f.result()
    metrics = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    uv.should_exit = True
    thread.join()
    prefill_sum = sum(float(m) for m in re.findall(r'^agd_prefill_seconds_sum\{method="agd"\} (\S+)', metrics, re.M))
    gaps = [b - a for ts in tokens.values() for a, b in zip(ts, ts[1:]) if b > t_burst and a < t_end]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".jsonl").open("w") as f:
        for i, ts in tokens.items():
            f.writelines(json.dumps({"kind": "running", "request": i, "token": j, "t": t - t_burst}) + "\n"
                         for j, t in enumerate(ts))
        f.writelines(json.dumps({**r, "start": r["start"] - t_burst, "end": r["end"] - t_burst}) + "\n" for r in done)
    summary = {"largest_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "gaps": len(gaps),
               "burst_wall_s": t_end - t_burst, "burst_prompt_tokens": [r["prompt_tokens"] for r in done],
               "prefill_seconds_sum": prefill_sum}
    setup = {"model": args.model, "dtype": dtype_name(model.dtype), "threads": args.threads, "running": args.running,
             "burst": args.burst, "prompt_range": [args.min_tokens, args.max_tokens], "method": "agd (server default)",
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "provenance": provenance()}
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "summary": summary}, indent=1) + "\n")
    md = (f"# Long prompts joining a running batch ({args.model}, {setup['dtype']}, {args.threads} thread)\n\n"
          f"{args.running} requests streaming; {args.burst} prompts of {min(summary['burst_prompt_tokens'])}-"
          f"{max(summary['burst_prompt_tokens'])} tokens arrive together (AGD, no prefix reuse). Command:\n\n"
          f"    PYTHONPATH=src python scripts/bench_admission.py --running {args.running} --burst {args.burst} "
          f"--out {args.out}\n\n"
          f"- largest gap between two tokens of a running request while the burst joined: "
          f"**{summary['largest_gap_s']:.2f} s** (median {summary['median_gap_s']:.2f} s over {len(gaps)} gaps)\n"
          f"- the burst's prefill compute, all requests: {prefill_sum:.1f} s (what prefilling them at once, "
          f"between two steps, would have stalled the running requests for); the burst took {t_end - t_burst:.1f} s\n\n"
          f"Raw records (every token time of the running requests, every burst request): `{out.name}.jsonl`.\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
