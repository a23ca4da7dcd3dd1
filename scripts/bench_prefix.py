"""Prefix reuse in `agd serve`: a long system prompt shared by many requests, with and without the cache.

One process, one model, two servers on it (``--prefix-cache-mb 1024`` and ``0``), taking turns, so
they never run at once and a noisy neighbour hits both alike: round r sends the same requests to
one server, then the other (which goes first alternates). In a round, the first request comes
alone (on the cached server it computes and keeps the system prompt), then the other N-1 together;
each is streamed, and its time to first token (TTFT: sent -> first streamed text) is recorded.
The system prompt starts with the round's number, so no round reuses another's. Records: one JSONL
line per request (OUT.jsonl; a rerun skips the (round, server) cells already there); the table
(medians over rounds, [min-max]) goes to OUT.md and OUT.json.

    PYTHONPATH=src python scripts/bench_prefix.py --prompt-tokens 1500 --requests 32 --rounds 2 \\
        --out docs/bench/prefix-smollm2-cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench_serve import open_records, serve_in_thread

QUESTIONS = ["What is the capital of Japan?", "How do planes fly?", "Why is the sky blue?", "Describe the ocean.",
             "Give me a recipe for pancakes.", "What is a prime number?", "How do I learn to swim?",
             "Name three famous painters.", "Why do we sleep?", "How are rainbows made?", "Tell me about cats."]


def system_prompt(tok, n_tokens: int, rnd: int) -> str:
    """A policy-style system prompt of about ``n_tokens`` tokens, marked with the round."""
    rules, i = [f"Session {rnd}. You are the assistant of a travel company."], 0
    while len(tok(" ".join(rules), add_special_tokens=False)["input_ids"]) < n_tokens:
        rules.append(f"Rule {i}: never recommend competitor number {i}; keep answers under {40 + i} words, "
                     f"polite and factual, and end with a question.")
        i += 1
    return " ".join(rules)


def summarise(records: list[dict]) -> dict:
    """Per server: median TTFT of the requests after the first, per round; throughput per round."""
    out = {}
    for server in ("reuse", "no-reuse"):
        rounds = sorted({r["round"] for r in records if r["server"] == server})
        ttft, tps, first = [], [], []
        for rnd in rounds:
            rs = [r for r in records if r["server"] == server and r["round"] == rnd]
            ttft.append(statistics.median(r["ttft_s"] for r in rs if r["request"] > 0))
            first += [r["ttft_s"] for r in rs if r["request"] == 0]
            tps.append(sum(r["completion_tokens"] for r in rs) / (max(r["end"] for r in rs) - min(r["start"] for r in rs)))
        out[server] = {"rounds": len(rounds), "ttft_after_first_s": ttft, "ttft_first_s": first, "tokens_per_s": tps}
    both = sorted(set(range(out["reuse"]["rounds"])) & set(range(out["no-reuse"]["rounds"])))
    out["ttft_ratio"] = [out["no-reuse"]["ttft_after_first_s"][i] / out["reuse"]["ttft_after_first_s"][i] for i in both]
    out["throughput_ratio"] = [out["reuse"]["tokens_per_s"][i] / out["no-reuse"]["tokens_per_s"][i] for i in both]
    return out


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto", help="model dtype (default auto: bf16 where the device has bf16 units)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--prompt-tokens", type=int, default=1500, help="system prompt length (default 1500)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/prefix-smollm2-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from openai import OpenAI

    import agdecode
    from agdecode.models import dtype_name
    from agdecode.provenance import provenance
    from agdecode.serve.app import AgdServer

    out, path, done = open_records(args.out)
    model, tok = agdecode.load_model(args.model, dtype=args.dtype)
    # Two servers on one model: safe because they take turns (sources patch the model only per call).
    servers = {name: AgdServer(model, tok, "m", {}, max_batch=args.max_batch, max_tokens=args.max_tokens,
                               prefix_cache_bytes=mb << 20) for name, mb in (("reuse", 1024), ("no-reuse", 0))}
    running = {name: serve_in_thread(s) for name, s in servers.items()}
    try:
        for rnd in range(args.rounds):
            system = system_prompt(tok, args.prompt_tokens, rnd)
            convs = [[{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                     for i in range(args.requests)]
            order = ["reuse", "no-reuse"] if rnd % 2 == 0 else ["no-reuse", "reuse"]
            for name in order:
                if any((r["round"], r["server"]) == (rnd, name) for r in done):
                    continue
                client = OpenAI(base_url=running[name][2], api_key="unused", max_retries=0, timeout=3600)

                def one(i: int, name=name, client=client) -> dict:
                    start, first, text, usage = time.perf_counter(), None, "", None
                    stream = client.chat.completions.create(model="m", messages=convs[i], max_tokens=args.max_tokens,
                                                            stream=True, stream_options={"include_usage": True})
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            first = first or time.perf_counter()
                            text += chunk.choices[0].delta.content
                        usage = chunk.usage or usage
                    end = time.perf_counter()
                    return {"round": rnd, "server": name, "request": i, "start": start, "end": end,
                            "ttft_s": (first or end) - start, "latency_s": end - start,
                            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "text": text}

                recs = [one(0)]  # alone: on the cached server it computes the shared prompt once
                with ThreadPoolExecutor(args.requests - 1 or 1) as pool:
                    recs += list(pool.map(one, range(1, args.requests)))
                with path.open("a") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
                done += recs
                later = [r["ttft_s"] for r in recs[1:]]
                print(f"round {rnd} {name:8s}: first TTFT {recs[0]['ttft_s']:.2f} s, later TTFT median "
                      f"{statistics.median(later):.2f} s (max {max(later):.2f}), prompt {recs[0]['prompt_tokens']} "
                      f"tokens", flush=True)
    finally:
        for uv, thread, _ in running.values():
            uv.should_exit = True
            thread.join()
    s = summarise(done)
    same = all(len({r["text"] for r in done if (r["round"], r["request"]) == key}) == 1
               for key in {(r["round"], r["request"]) for r in done})
    setup = {"model": args.model, "dtype": dtype_name(model.dtype), "threads": args.threads,
             "prompt_tokens": args.prompt_tokens, "requests": args.requests, "max_tokens": args.max_tokens,
             "max_batch": args.max_batch, "method": "agd (server default)", "cpu": platform.processor() or
             platform.machine(), "torch": torch.__version__, "provenance": provenance()}
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "summary": s, "same_text_both_ways": same},
                                                   indent=1) + "\n")
    rows = "\n".join(f"| {n} | {_med(s[n]['ttft_first_s'])} | {_med(s[n]['ttft_after_first_s'])} | "
                     f"{_med(s[n]['tokens_per_s'])} |" for n in ("reuse", "no-reuse"))
    md = (f"# Prefix reuse in agd serve ({args.model}, {setup['dtype']}, {args.threads} thread)\n\n"
          f"A {args.prompt_tokens}-token system prompt shared by {args.requests} requests (AGD, the server's "
          f"default method; {args.max_tokens} new tokens each); the first request alone, then the other "
          f"{args.requests - 1} together; {s['reuse']['rounds']} rounds, servers interleaved. Command:\n\n"
          f"    PYTHONPATH=src python scripts/bench_prefix.py --prompt-tokens {args.prompt_tokens} "
          f"--requests {args.requests} --rounds {args.rounds} --out {args.out}\n\n"
          "| server | TTFT of the first (s) | median TTFT of the others (s) | tokens/s |\n|---|---:|---:|---:|\n"
          f"{rows}\n\nTTFT of the requests after the first, no reuse / reuse, per round: "
          f"{', '.join(f'{x:.1f}x' for x in s['ttft_ratio'])}; throughput with / without: "
          f"{', '.join(f'{x:.2f}x' for x in s['throughput_ratio'])}. Every request got "
          f"{'the same' if same else 'NOT the same'} text from both servers. Raw per-request records: `{path.name}`.\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
