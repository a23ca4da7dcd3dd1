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
    from .decoding import METHODS, AGDConfig
    from .engines import ENGINES

    d = AGDConfig()
    p.add_argument("prompt", nargs="?", default=DEMO_USER, help=f"the user message (default: {DEMO_USER!r})")
    p.add_argument("--system", default=DEMO_SYSTEM,
                   help=f"the system message, the default ROI (default: {DEMO_SYSTEM!r}; '' for none)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (built-in SmolLM2-135M-Instruct), a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32; bf16 moves ROI scores ~2-3%%)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="decoding method (default agd); cad, dola, steer, sample are the baselines (README)")
    p.add_argument("--roi", action="append", default=None,
                   help="region of interest: system (default), user, message:N, chars:A-B, tokens:I,J-K, "
                        "context, document:N, heads:parametric|in-context|FILE.json|L.H,...; combine with "
                        "' + ', ' - ', ' | ' (e.g. 'context - user'); repeat to score several (the first decides)")
    p.add_argument("--documents", metavar="FILE",
                   help="JSON list of {\"title\", \"text\"} documents, rendered before the user message "
                        "(for --roi context / document:N)")
    p.add_argument("--k", type=int, default=d.k, help=f"number of top tokens considered (default {d.k})")
    p.add_argument("--min-prob", type=float, default=d.min_prob,
                   help=f"drop candidates below this probability (default {d.min_prob})")
    p.add_argument("--entropy-threshold", type=_threshold, default=None,
                   help="AGD_e: below this entropy (nats) take the greedy token; the paper uses 1.734; 'auto' = "
                        "this model's calibrated value (`agd calibrate`) (default: off)")
    p.add_argument("--attribution", default=d.attribution, choices=["lrp", "ixg"],
                   help="AttnLRP (lrp, default) or plain Input x Gradient (ixg)")
    p.add_argument("--engine", default=d.engine, choices=list(ENGINES),
                   help=f"how scores are computed (default {d.engine})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens to generate (default 64)")
    p.add_argument("--compare", action="store_true", help="run greedy and AGD and show them side by side")
    p.add_argument("--json", metavar="FILE", help="write the full result(s) with the per-step trace to FILE")
    _add_baseline_args(p.add_argument_group("baselines (each flag is read by one --method)"), d)


def _layers(text: str):
    """'low', 'high' or comma-separated layer indices."""
    if text in ("low", "high"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'low', 'high' or layer indices like 8,10,12, got {text!r}")


def _add_baseline_args(g, d) -> None:
    g.add_argument("--cad-alpha", type=float, default=d.cad_alpha,
                   help=f"cad: (1+a)*logits(prompt) - a*logits(prompt without the ROI) (default {d.cad_alpha}; "
                        "Shi et al. also use 1.0)")
    g.add_argument("--dola-layers", type=_layers, default=d.dola_layers,
                   help="dola: premature layers, 'low', 'high' (default) or indices like 8,10,12")
    g.add_argument("--repetition-penalty", type=float, default=None, help="dola: repetition penalty (default 1.2)")
    g.add_argument("--steer-vector", metavar="FILE", help="steer: a vector saved by `agd steer fit`")
    g.add_argument("--steer-layer", type=int, default=None, help="steer: layer (default: the vector's)")
    g.add_argument("--steer-weight", type=float, default=d.steer_weight,
                   help=f"steer: weight of the vector (default {d.steer_weight})")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"sample (default {d.temperature})")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"sample: nucleus mass (default {d.top_p})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"sample: random seed (default {d.seed})")


def _baseline_settings(args) -> dict:
    settings = dict(cad_alpha=args.cad_alpha, dola_layers=args.dola_layers, steer_weight=args.steer_weight,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    # These three are refused by methods that do not read them, so pass them only when given.
    optional = dict(repetition_penalty=args.repetition_penalty, steer_vector=args.steer_vector,
                    steer_layer=args.steer_layer)
    return {**settings, **{k: v for k, v in optional.items() if v is not None}}


def _threshold(text: str):
    """A number of nats, or 'auto' (the model's calibration from `agd calibrate`)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats or 'auto', got {text!r}")


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
    if args.documents:
        try:
            kw["documents"] = json.loads(Path(args.documents).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--documents {args.documents}: cannot read a JSON list of documents ({e})") from None
    if args.compare:
        results = {m: generate(model, tok, messages, method=m, **kw) for m in ("greedy", "agd")}
        print_comparison(messages, results["greedy"], results["agd"])
    else:
        results = {args.method: generate(model, tok, messages, method=args.method, **kw, **_baseline_settings(args))}
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


def cmd_steer_fit(args) -> int:
    from . import load_model
    from .baselines.steering import fit_steering_vector

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    vector = fit_steering_vector(model, tok, prompts, args.instruction, layer=args.layer, placement=args.placement)
    path = vector.save(args.out)
    print(f"steering vector for layer {vector.layer} from {len(prompts)} prompts written to {path} "
          f"(metadata: {path.with_suffix('.json')})")
    return 0


def register_steer(sub) -> None:
    p = sub.add_parser("steer", help="activation steering vectors (the 'steer' baseline)")
    fit = p.add_subparsers(dest="steer_command", required=True).add_parser(
        "fit", help="fit a steering vector for an instruction",
        description="Mean difference of the last-token residual stream at a layer between prompts with and "
                    "without the instruction (Stolfo et al., 2025). Use it with "
                    "`agd generate --method steer --steer-vector FILE`.")
    fit.add_argument("--instruction", required=True, help="the instruction, e.g. 'Always answer in French.'")
    fit.add_argument("--prompts", metavar="FILE", help="user prompts, one per line")
    fit.add_argument("--prompt", action="append", help="a user prompt (repeatable; adds to --prompts)")
    fit.add_argument("--layer", type=int, default=None, help="layer (default: the middle one)")
    fit.add_argument("--placement", default="system", choices=["system", "user"],
                     help="instruction as a system message (default) or appended to the user message")
    fit.add_argument("--out", required=True, help="output file (.safetensors; a .json with metadata goes next to it)")
    fit.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder, or a .gguf file")
    fit.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    fit.add_argument("--device", default="cpu", help="torch device (default cpu)")
    fit.set_defaults(func=cmd_steer_fit)


def register_report(sub) -> None:
    from .report.html import register_report as register

    register(sub)


def register_heads(sub) -> None:
    from .discovery import register_heads as register

    register(sub)


def register_bench(sub) -> None:
    from .bench import register_bench as register

    register(sub)


def register_eval(sub) -> None:
    from .eval.cli import register_eval as register

    register(sub)


def register_calibrate(sub) -> None:
    from .eval.cli import register_calibrate as register

    register(sub)


def register_serve(sub) -> None:
    from .serve import register_serve as register

    register(sub)


COMMANDS = [register_generate, register_report, register_steer, register_heads, register_bench, register_eval, register_calibrate,
            register_serve]


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
    except (ValueError, FileNotFoundError, ArithmeticError) as e:  # our errors are written for people
        print(f"agd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
