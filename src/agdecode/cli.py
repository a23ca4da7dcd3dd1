"""The ``agd`` command line. Each subcommand lives in a small ``register(subparsers)`` function."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

DEMO_SYSTEM = "Always answer in French."
DEMO_USER = "Tell me about cats."


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    from .decoding import AGDConfig
    from .engines import ENGINES

    d = AGDConfig()
    p.add_argument("prompt", nargs="?", default=DEMO_USER, help=f"the user message (default: {DEMO_USER!r})")
    p.add_argument("--system", default=DEMO_SYSTEM,
                   help=f"the system message, the default ROI (default: {DEMO_SYSTEM!r}; '' for none)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (built-in SmolLM2-135M-Instruct), a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32; bf16 moves ROI scores ~2-3%%)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--method", default=d.method, choices=["agd", "greedy"], help="decoding method (default agd)")
    p.add_argument("--roi", action="append", default=None,
                   help="region of interest: system (default), user, message:N, chars:A-B, tokens:I,J-K; "
                        "repeat to score several (the first decides)")
    p.add_argument("--k", type=int, default=d.k, help=f"number of top tokens considered (default {d.k})")
    p.add_argument("--min-prob", type=float, default=d.min_prob,
                   help=f"drop candidates below this probability (default {d.min_prob})")
    p.add_argument("--entropy-threshold", type=float, default=None,
                   help="AGD_e: below this entropy (nats) take the greedy token; the paper uses 1.734 (default: off)")
    p.add_argument("--attribution", default=d.attribution, choices=["lrp", "ixg"],
                   help="AttnLRP (lrp, default) or plain Input x Gradient (ixg)")
    p.add_argument("--engine", default=d.engine, choices=list(ENGINES),
                   help=f"how scores are computed (default {d.engine})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens to generate (default 64)")
    p.add_argument("--compare", action="store_true", help="run greedy and AGD and show them side by side")
    p.add_argument("--json", metavar="FILE", help="write the full result(s) with the per-step trace to FILE")


def _messages(args) -> list[dict]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": args.prompt}]


def cmd_generate(args) -> int:
    from . import generate, load_model
    from .report.terminal import print_comparison, print_result

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    kw = dict(roi=args.roi or ["system"], k=args.k, min_prob=args.min_prob, entropy_threshold=args.entropy_threshold,
              attribution=args.attribution, engine=args.engine, max_new_tokens=args.max_new_tokens)
    messages = _messages(args)
    if args.compare:
        results = {m: generate(model, tok, messages, method=m, **kw) for m in ("greedy", "agd")}
        print_comparison(messages, results["greedy"], results["agd"])
    else:
        results = {args.method: generate(model, tok, messages, method=args.method, **kw)}
        print_result(results[args.method])
    if args.json:
        payload = {m: r.to_dict() for m, r in results.items()}
        Path(args.json).write_text(json.dumps(payload if args.compare else payload[args.method],
                                              ensure_ascii=False, indent=1))
        print(f"trace written to {args.json}")
    return 0


def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with AGD (or greedy), optionally compared side by side",
                       description="Generate a reply with Attribution-Guided Decoding on a chat prompt.")
    _add_decoding_args(p)
    p.set_defaults(func=cmd_generate)


COMMANDS = [register_generate]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agd``.

    Example:
        $ agd generate "What is the capital of Japan?" --system "Always answer in French." --compare
    """
    parser = argparse.ArgumentParser(prog="agd", description="Attribution-Guided Decoding for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep loader chatter and progress bars out of the output
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are written for people: no stack trace
        print(f"agd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
