"""Throughput and latency of `agd serve` for 1, 8 and 32 concurrent clients (README "Server").

Starts the server in this process (uvicorn in a thread, the real HTTP path) and sends the same N
requests with C client threads for each C; C = 1 is the same requests sent one at a time. The
methods are interleaved (round 1: greedy, AGD_e at each C; round 2: the same; ...), so a noisy
neighbour hits both alike; the table reports medians over rounds with their [min-max] spread, and
AGD_e's throughput as a ratio of greedy's measured in the same round. One JSONL record per request
is appended to OUT.jsonl (a rerun skips the (round, method, clients) cells already there); the
table goes to OUT.md and OUT.json.

    PYTHONPATH=src python scripts/bench_serve.py --model smollm2 --requests 32 --max-tokens 32 \\
        --out docs/bench/serve-smollm2-cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

METHODS = {"agd_e": {"method": "agd", "entropy_threshold": 1.734}, "greedy": {"method": "greedy"}}
SYSTEMS = ["Always answer in French.", "Answer in one sentence.", "You are a pirate; talk like one.",
           "Never use the letter e.", "Answer only with a list."]
QUESTIONS = ["Tell me about cats.", "What is the capital of Japan?", "How do planes fly?", "Why is the sky blue?",
             "Give me a recipe for pancakes.", "What is a prime number?", "Describe the ocean.",
             "How do I learn to swim?", "What is photosynthesis?", "Name three famous painters.",
             "What does a computer do?", "Why do we sleep?", "How are rainbows made?"]


def requests(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def serve_in_thread(server):
    import uvicorn

    from agdecode.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    return uv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def _cell(rs: list[dict]) -> dict:
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    tokens = sum(r["completion_tokens"] for r in rs)
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(rs) / wall, "wall_s": wall, "tokens": tokens}


def summarise(records: list[dict]) -> list[dict]:
    """One row per (method, clients): medians over rounds [min, max], latency percentiles over every
    request, and per round the ratio to greedy's throughput at the same number of clients."""
    cells: dict[tuple, dict] = {}
    for r in records:
        cells.setdefault((r["method"], r["clients"], r.get("round", 0)), []).append(r)
    per = {k: _cell(v) for k, v in cells.items()}
    rows = []
    for method in METHODS:
        for c in sorted({k[1] for k in per if k[0] == method}):
            rounds = sorted(k[2] for k in per if k[:2] == (method, c))
            tps = [per[(method, c, k)]["tokens_per_s"] for k in rounds]
            lat = [r["latency_s"] for k in rounds for r in cells[(method, c, k)]]
            ratio = [per[(method, c, k)]["tokens_per_s"] / per[("greedy", c, k)]["tokens_per_s"]
                     for k in rounds if ("greedy", c, k) in per]
            one = [per[(method, c, k)]["tokens_per_s"] / per[(method, 1, k)]["tokens_per_s"]
                   for k in rounds if (method, 1, k) in per]
            rows.append({"method": method, "clients": c, "rounds": len(rounds),
                         "requests": sum(len(cells[(method, c, k)]) for k in rounds),
                         "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
                         "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
                         "speedup": statistics.median(one) if one else None,
                         "x_greedy": statistics.median(ratio) if ratio else None,
                         "x_greedy_range": [min(ratio), max(ratio)] if ratio else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | clients | rounds | tokens/s, median [min-max] | x greedy, same round [min-max] | "
             "p50 latency (s) | p95 latency (s) | throughput vs one at a time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["tokens_per_s_range"]
        ratio = ("-" if r["x_greedy"] is None else
                 f"{r['x_greedy']:.2f} [{r['x_greedy_range'][0]:.2f}-{r['x_greedy_range'][1]:.2f}]")
        lines.append(f"| {r['method']} | {r['clients']} | {r['rounds']} | {r['tokens_per_s']:.1f} [{lo:.1f}-{hi:.1f}] | "
                     f"{ratio} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="model dtype (default auto: bf16 where the device has bf16 units)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every (method, clients) cell")
    ap.add_argument("--out", default="docs/bench/serve-smollm2-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from openai import OpenAI

    import agdecode
    from agdecode.serve import served_name
    from agdecode.serve.app import AgdServer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".jsonl")
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    from agdecode.models import dtype_name
    from agdecode.provenance import provenance

    model, tok = agdecode.load_model(args.model, dtype=args.dtype, device=args.device)
    name = served_name(args.model)
    server = AgdServer(model, tok, name, {}, max_batch=args.max_batch, max_tokens=args.max_tokens)
    uv, thread, url = serve_in_thread(server)
    convs = requests(args.requests)
    try:
        cells = [(rnd, clients, method) for rnd in range(args.rounds) for clients in map(int, args.clients.split(","))
                 for method in args.methods.split(",")]  # interleaved: every method in every round
        for rnd, clients, method in cells:
            if any((r.get("round", 0), r["method"], r["clients"]) == (rnd, method, clients) for r in done):
                continue
            client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

            def one(i: int) -> dict:
                start = time.perf_counter()
                r = client.chat.completions.create(model=name, messages=convs[i], max_tokens=args.max_tokens,
                                                   extra_body={"agd": METHODS[method]})
                end = time.perf_counter()
                return {"round": rnd, "method": method, "clients": clients, "request": i, "start": start, "end": end,
                        "latency_s": end - start, "prompt_tokens": r.usage.prompt_tokens,
                        "completion_tokens": r.usage.completion_tokens,
                        "finish_reason": r.choices[0].finish_reason,
                        "guided_steps": r.model_extra["agd"]["guided_steps"], "text": r.choices[0].message.content}

            with ThreadPoolExecutor(clients) as pool:
                recs = list(pool.map(one, range(args.requests)))
            with path.open("a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            done += recs
            row = summarise(recs)[0]
            print(f"round {rnd} {method:7s} clients={clients:3d}: {row['tokens_per_s']:.1f} tokens/s, "
                  f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s", flush=True)
    finally:
        uv.should_exit = True
        thread.join()
    rows = summarise(done)
    texts: dict = {}
    for r in done:
        texts.setdefault((r["method"], r["request"]), set()).add(r["text"])
    same = all(len(t) == 1 for t in texts.values())
    setup = {"model": args.model, "device": args.device, "dtype": dtype_name(model.dtype),
             "threads": args.threads,
             "requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
             "provenance": provenance()}
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows, "same_text_at_every_concurrency": same},
                                                   indent=1))
    out.with_suffix(".md").write_text(
        f"# agd serve throughput ({args.model}, {args.device})\n\n"
        f"{args.requests} requests x {args.max_tokens} max tokens; server max batch {args.max_batch}; "
        f"torch threads {args.threads}. Command:\n\n"
        f"    PYTHONPATH=src python scripts/bench_serve.py --model {args.model} --device {args.device} "
        f"--requests {args.requests} --max-tokens {args.max_tokens} --rounds {args.rounds} --out {args.out}\n\n"
        f"{table(rows)}\n\nEvery request got {'the same' if same else 'NOT the same'} text at every number of "
        f"clients. Raw per-request records: `{path.name}`.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
