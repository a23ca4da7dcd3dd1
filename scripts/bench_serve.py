"""Throughput and latency of `agd serve` for 1, 8 and 32 concurrent clients (README "Server").

Starts the server in this process (uvicorn in a thread, the real HTTP path) and sends the same N
requests with C client threads for each C; C = 1 is the same requests sent one at a time. The
methods are interleaved (round 1: greedy, AGD_e at each C; round 2: the same; ...), so a noisy
neighbour hits both alike; the table reports medians over rounds with their [min-max] spread, and
AGD_e's throughput as a ratio of greedy's measured in the same round. With ``--methods`` including
``transformers-serve``, transformers' own server (``transformers serve --continuous-batching``, a
subprocess with the same thread count, on the same model folder and dtype, temperature 0) answers
the same requests in the same rounds: the greedy anchor. One JSONL record per request
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

METHODS = {"agd_e": {"method": "agd", "entropy_threshold": 1.734}, "greedy": {"method": "greedy"},
           # `transformers serve` (continuous batching) on the same model folder and dtype: greedy's anchor.
           "transformers-serve": None}
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


def start_transformers_serve(model: str, dtype: str, threads: int):
    """``transformers serve`` on ``model``'s folder as a subprocess; (process, client, model id) once healthy."""
    import os
    import subprocess
    import sys
    import urllib.request

    from openai import OpenAI

    from agdecode.models import DEFAULT_MODEL, builtin_model_folder

    folder = str(builtin_model_folder()) if model == DEFAULT_MODEL else model
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(exe), "serve", folder, "--port", str(port), "--device", "cpu", "--dtype", dtype,
                             "--continuous-batching"], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise SystemExit("transformers serve did not start")
    return proc, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600), folder


def open_records(out: str) -> tuple[Path, Path, list[dict]]:
    """``(OUT, OUT.jsonl, the records already there)``: a rerun appends and skips what is done."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".jsonl")
    return out, path, [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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

    out, path, done = open_records(args.out)
    from agdecode.models import dtype_name
    from agdecode.provenance import provenance

    model, tok = agdecode.load_model(args.model, dtype=args.dtype, device=args.device)
    name = served_name(args.model)
    server = AgdServer(model, tok, name, {}, max_batch=args.max_batch, max_tokens=args.max_tokens)
    uv, thread, url = serve_in_thread(server)
    convs = requests(args.requests)
    anchor = (start_transformers_serve(args.model, dtype_name(model.dtype), args.threads)
              if "transformers-serve" in args.methods.split(",") else None)
    # Warm-up, not timed: first calls pay one-off costs (transformers serve loads its model on the first).
    warm = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    for m in (m for m in args.methods.split(",") if m != "transformers-serve"):
        warm.chat.completions.create(model=name, messages=convs[0], max_tokens=2, extra_body={"agd": METHODS[m]})
    if anchor is not None:
        anchor[1].chat.completions.create(model=anchor[2], messages=convs[0], max_tokens=2, temperature=0)
    try:
        cells = [(rnd, clients, method) for rnd in range(args.rounds) for clients in map(int, args.clients.split(","))
                 for method in args.methods.split(",")]  # interleaved: every method in every round
        for rnd, clients, method in cells:
            if any((r.get("round", 0), r["method"], r["clients"]) == (rnd, method, clients) for r in done):
                continue
            client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

            def one(i: int) -> dict:
                start = time.perf_counter()
                if method == "transformers-serve":
                    r = anchor[1].chat.completions.create(model=anchor[2], messages=convs[i], temperature=0,
                                                          max_tokens=args.max_tokens)
                else:
                    r = client.chat.completions.create(model=name, messages=convs[i], max_tokens=args.max_tokens,
                                                       extra_body={"agd": METHODS[method]})
                end = time.perf_counter()
                return {"round": rnd, "method": method, "clients": clients, "request": i, "start": start, "end": end,
                        "latency_s": end - start, "prompt_tokens": r.usage.prompt_tokens,
                        "completion_tokens": r.usage.completion_tokens,
                        "finish_reason": r.choices[0].finish_reason,
                        "guided_steps": (r.model_extra.get("agd") or {}).get("guided_steps", 0),
                        "text": r.choices[0].message.content}

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
        if anchor is not None:
            anchor[0].terminate()
            anchor[0].wait(60)
    rows = summarise(done)
    texts: dict = {}
    for r in done:
        texts.setdefault((r["method"], r["request"]), set()).add(r["text"])
    same = all(len(t) == 1 for t in texts.values())
    # transformers serve and our greedy on the same requests: the same text? (None: not both run)
    pairs = [(texts[("greedy", i)], texts[("transformers-serve", i)]) for (m, i) in texts if m == "greedy"
             and ("transformers-serve", i) in texts]
    anchor_same = all(a == b for a, b in pairs) if pairs else None
    setup = {"model": args.model, "device": args.device, "dtype": dtype_name(model.dtype),
             "threads": args.threads,
             "requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
             "provenance": provenance()}
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows, "same_text_at_every_concurrency": same,
                                                    "greedy_same_text_as_transformers_serve": anchor_same},
                                                   indent=1))
    out.with_suffix(".md").write_text(
        f"# agd serve throughput ({args.model}, {args.device})\n\n"
        f"{args.requests} requests x {args.max_tokens} max tokens; server max batch {args.max_batch}; "
        f"torch threads {args.threads}. Command:\n\n"
        f"    PYTHONPATH=src python scripts/bench_serve.py --model {args.model} --device {args.device} "
        f"--requests {args.requests} --max-tokens {args.max_tokens} --rounds {args.rounds} "
        f"--clients {args.clients} --methods {args.methods} --out {args.out}\n\n"
        f"{table(rows)}\n\nEvery request got {'the same' if same else 'NOT the same'} text at every number of "
        f"clients."
        + ("" if anchor_same is None else f" agd serve's greedy gave {'the same' if anchor_same else 'NOT the same'} "
           "text as transformers serve on every request.")
        + f" Raw per-request records: `{path.name}`.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
