"""The ``agd`` command line. Each subcommand lives in a small ``register(subparsers)`` function."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import traceback
from pathlib import Path

from rich.console import Console
from safetensors import safe_open
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from . import __version__, generate, load_model
from .baselines.steering import fit_steering_vector
from .bench import register_bench
from .checks import check_not_clobbering, check_writable, is_agd_json, threshold
from .config import AGDConfig, resolve_config
from .decoding import make_jobs
from .discovery import register_heads
from .engines import ENGINES
from .errors import AgdError
from .eval.cli import register_calibrate, register_eval
from .heads import parse_head_spec
from .identity import model_identity
from .methods import get_method, method_names
from .models import DTYPE_HELP, dtype_name
from .provenance import provenance
from .prompt import render_documents
from .report.html import register_report
from .report.terminal import print_comparison, print_result
from .roi import parse_rois
from .serve import register_serve

__all__ = ["main"]

BUG_REPORT = ("agd: internal error: this is a bug in agdecode, not a problem with your input; please report it "
              "with the command you ran and the traceback above.")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    d = AGDConfig()
    p.add_argument("prompt", nargs="?", default=None, help="the user message")
    p.add_argument("--system", default=None,
                   help="a system message (default: none), e.g. 'Always answer in French.'; the default ROI "
                        "is the system message, so without one pass --roi (e.g. user, heads:parametric)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (built-in SmolLM2-135M-Instruct), a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--method", default=d.method, choices=list(method_names()),
                   help="decoding method (default agd); cad, dola, steer, sample are the baselines, and any "
                        "registered method (README, 'Adding a method')")
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
    p.add_argument("--entropy-threshold", type=threshold, default=None,
                   help="AGD_e: below this entropy (nats) take the greedy token; the paper uses 1.734; 'auto' = "
                        "this model's calibrated value (`agd calibrate`) (default: off)")
    p.add_argument("--attribution", default=d.attribution, choices=["lrp", "ixg"],
                   help="AttnLRP (lrp, default) or plain Input x Gradient (ixg)")
    p.add_argument("--engine", default=d.engine, choices=list(ENGINES),
                   help=f"how scores are computed (default {d.engine})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens to generate (default 64)")
    p.add_argument("--compare", action="store_true", help="run greedy and AGD and show them side by side")
    p.add_argument("--json", metavar="FILE",
                   help="write the full result(s) with the per-step trace to FILE ('-': standard output, the "
                        "text view then goes to standard error)")
    g = p.add_argument_group("many conversations")
    g.add_argument("--input", metavar="FILE.jsonl",
                   help="one conversation per line: {\"messages\": [...], \"documents\": [...] (optional), \"id\": "
                        "... (optional)} or a bare list of messages; results go to --output as JSON Lines")
    g.add_argument("--output", metavar="FILE.jsonl", default="-",
                   help="with --input: where the results go, one JSON line per conversation, appended as they "
                        "finish; an existing file is resumed (its ids are skipped) (default: standard output)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="conversations decoded together (default: 8 on CPU, 32 on CUDA)")
    g = p.add_argument_group("logits processing and stopping (every method)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop a reply once it ends with TEXT (repeatable; the text is kept)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")
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
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="repetition penalty, any method (default: none; 1.2 with dola, the DoLa authors' setting)")
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


def _messages(args) -> list[dict]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": args.prompt}]


def _read_documents(path: str) -> list:
    try:
        docs = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AgdError(f"--documents {path}: cannot read a JSON list of documents ({e})") from None
    render_documents(docs, "")  # the same checks (and messages) as generate(documents=...)
    if not docs:
        raise AgdError(f"--documents {path}: the list of documents is empty.")
    return docs


def _check_generate_args(args) -> dict:
    """Everything that can be checked without the model, checked before it loads; returns the documents."""
    if args.input is not None:
        if args.prompt is not None or args.system or args.documents or args.compare:
            raise AgdError("--input takes the conversations (and their documents) from the file: drop the prompt, "
                           "--system, --documents and --compare")
        if args.output != "-":
            check_writable(args.output, "--output")
            out = Path(args.output)
            if out.is_file() and out.stat().st_size and not out.with_name(out.name + ".agd.json").is_file():
                raise AgdError(f"--output {out} exists and was not written by `agd generate --input` (no "
                               f"{out.name}.agd.json beside it): it is kept as it is; choose another --output.")
    elif args.prompt is None:
        raise AgdError('give the user message, e.g. agd generate "Tell me about cats." '
                       '--system "Always answer in French." (see agd generate --help), or --input FILE.jsonl')
    if args.batch_size is not None and args.batch_size < 1:
        raise AgdError(f"--batch-size must be at least 1, got {args.batch_size}")
    rois = args.roi or ["system"]
    if args.input is None and not args.system and not args.roi and (args.compare or get_method(args.method).uses_roi):
        raise AgdError("the default ROI is the system message, and there is none: pass one with --system "
                       "(e.g. --system \"Always answer in French.\") or choose another ROI with --roi (e.g. user).")
    for expr in parse_rois(rois):
        for term in expr:
            if term.roi.kind == "heads":
                parse_head_spec(term.roi.value[0])  # a head-set file is read (and checked) now
    d = AGDConfig()
    if args.compare or not get_method(args.method).stochastic:
        given = [f for f, v, default in (("--temperature", args.temperature, d.temperature),
                                          ("--top-p", args.top_p, d.top_p)) if v != default]
        if given:  # they would be silently ignored: a deterministic method does not sample
            raise AgdError(f"{' and '.join(given)} only apply to --method sample; --method "
                           f"{'greedy/agd' if args.compare else args.method} is deterministic")
    if not args.compare and args.steer_vector and not Path(args.steer_vector).is_file():
        raise AgdError(f"--steer-vector {args.steer_vector!r} not found (create one with `agd steer fit`).")
    methods = ("greedy", "agd") if args.compare else (args.method,)
    for m in methods:
        settings = {} if args.compare else _baseline_settings(args)
        try:
            AGDConfig(method=m, roi=rois, k=args.k, min_prob=args.min_prob,
                      entropy_threshold=args.entropy_threshold, attribution=args.attribution, engine=args.engine,
                      max_new_tokens=args.max_new_tokens, **_processing(args), **settings).validate()
        except AgdError:
            raise
        except ValueError as e:  # the settings' own checks, worded for the API: still a bad input here
            raise AgdError(str(e)) from None
    if args.json is not None and not args.json.strip():
        raise AgdError("--json needs a file name (or - for standard output)")
    if args.json and args.json != "-":
        check_writable(args.json, "--json")
        check_not_clobbering(args.json, "--json", own=lambda p: is_agd_json(p, "token_ids"),
                             inputs=(args.input, args.documents))
    return {"documents": _read_documents(args.documents)} if args.documents else {}


def _processing(args) -> dict:
    """The logits-processing and stopping settings of the command line."""
    return {"stop_strings": args.stop, "no_repeat_ngram_size": args.no_repeat_ngram_size}


def read_conversations(path: str) -> list[dict]:
    """Read ``--input``: one conversation per JSON line; every bad line is named before anything runs.

    Example:
        >>> read_conversations("convs.jsonl")[0]
        {'id': '0', 'messages': [{'role': 'user', 'content': 'Hi'}], 'documents': None}
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AgdError(f"--input {path}: cannot read it as UTF-8 text ({e})") from None
    out, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: not JSON ({e.msg})")
            continue
        item = {"messages": obj} if isinstance(obj, list) else obj
        msgs = item.get("messages") if isinstance(item, dict) else None
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            bad.append(f"line {n}: expected a list of {{'role', 'content'}} messages, or an object with one "
                       "under 'messages'")
            continue
        docs = item.get("documents")
        if docs is not None and not isinstance(docs, list):
            bad.append(f"line {n}: 'documents' must be a list of {{'title', 'text'}}")
            continue
        cid = item.get("id", n)
        if isinstance(cid, bool) or not isinstance(cid, (str, int)) or cid == "":
            bad.append(f"line {n}: 'id' must be a non-empty string or an integer, got {json.dumps(cid)[:40]}")
            continue
        out.append({"id": str(cid), "messages": msgs, "documents": docs})
    if bad:
        raise AgdError(f"--input {path}: {len(bad)} bad line(s): " + "; ".join(bad[:5])
                       + (" ..." if len(bad) > 5 else ""))
    if not out:
        raise AgdError(f"--input {path}: no conversations in it")
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise AgdError(f"--input {path}: ids must be unique (e.g. {next(i for i in ids if ids.count(i) > 1)!r} repeats)")
    return out


def _generate_many(args, model, tok, settings: dict) -> int:
    """``agd generate --input``: all conversations checked first, then decoded in batches, results appended."""
    convs = read_conversations(args.input)
    cfg = resolve_config(model, tok, **settings)
    done = set() if args.output == "-" else _resume(Path(args.output), convs, cfg, model)
    todo = [c for c in convs if c["id"] not in done]
    make_jobs(model, tok, cfg, [c["messages"] for c in todo], [c["documents"] for c in todo])  # every input checked
    batch = args.batch_size or (32 if str(args.device).startswith("cuda") else 8)
    out = sys.stdout if args.output == "-" else open(args.output, "a", encoding="utf-8")
    if done and not quiet():
        print(f"{len(done)} of {len(convs)} conversations already in {args.output}", file=sys.stderr)
    bar = tqdm(total=len(todo), unit="conv", desc="agd generate", file=sys.stderr, dynamic_ncols=True,
               disable=quiet() or not todo)  # with an ETA
    try:
        for start in range(0, len(todo), 4 * batch):
            part = todo[start:start + 4 * batch]
            results = generate(model, tok, [c["messages"] for c in part], documents=[c["documents"] for c in part],
                               config=cfg, batch_size=batch)
            for c, r in zip(part, results):
                out.write(json.dumps({"id": c["id"], **r.to_dict()}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(part))
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    return 0


def _resume(out: Path, convs: list[dict], cfg, model) -> set[str]:
    """The ids already in ``out``, made from the same input and settings (checked through the sidecar
    ``OUT.agd.json``); a new output gets its sidecar. Nothing is ever deleted but a torn last line.

    Refused, naming the problem: an output without a sidecar (not ours), one made from other input
    conversations or with other settings, a line that is not a result of this input (other than a
    torn last line, which an interrupted run leaves and which is cut off).
    """
    sidecar = out.with_name(out.name + ".agd.json")
    made_from = {"input_sha256": hashlib.sha256(json.dumps(convs, sort_keys=True).encode()).hexdigest(),
                 "settings": json.loads(json.dumps(cfg.to_dict(), default=str)),
                 "model": model_identity(model)["fingerprint"], "dtype": dtype_name(model.dtype)}
    if not out.exists() or out.stat().st_size == 0:
        check_not_clobbering(sidecar, "the sidecar", own=lambda p: is_agd_json(p, "input_sha256"))
        sidecar.write_text(json.dumps({**made_from, "provenance": provenance()}, indent=1), encoding="utf-8")
        return set()
    if not sidecar.is_file():
        raise AgdError(f"--output {out} exists and was not written by `agd generate --input` (no {sidecar.name} "
                       "beside it): it is kept as it is; choose another --output.")
    try:
        before = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AgdError(f"{sidecar}: cannot read it ({e}); choose another --output") from None
    if not isinstance(before, dict) or not isinstance(before.get("settings"), dict):
        raise AgdError(f"{sidecar} is not a sidecar written by agd generate --input; choose another --output")
    keys = sorted(k for k in made_from["settings"] if (before.get("settings") or {}).get(k) != made_from["settings"][k])
    differs = [what for key, what in (("input_sha256", "from other input conversations"),
                                      ("settings", f"with other settings ({', '.join(keys)})"),
                                      ("model", "with another model"), ("dtype", f"in another dtype ({before.get('dtype')})"))
               if before.get(key) != made_from[key]]
    if differs:
        raise AgdError(f"--output {out} was made {' and '.join(differs)} than this run: resuming would mix them; "
                       "choose another --output.")
    ids, done = {c["id"] for c in convs}, set()
    data = out.read_bytes()
    lines = data.split(b"\n")
    offset = 0
    for n, line in enumerate(lines, 1):
        last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
        try:
            rid = json.loads(line)["id"] if line.strip() else None
            if rid is not None and rid not in ids:
                raise ValueError(f"id {rid!r} is not in --input")
        except (ValueError, KeyError, TypeError) as e:
            if last and not data.endswith(b"\n"):  # an interrupted run's torn last line: cut it off
                with open(out, "r+b") as f:
                    f.truncate(offset)
                print(f"{out}: an incomplete last line (interrupted run) was removed", file=sys.stderr)
                break
            raise AgdError(f"--output {out}, line {n}: not a result of this input ({e}); it is kept as it is. "
                           "Choose another --output.") from None
        if rid is not None:
            done.add(rid)
        offset += len(line) + 1
    else:
        if not data.endswith(b"\n"):  # a complete last line without its newline: the next result starts a line
            with open(out, "ab") as f:
                f.write(b"\n")
    return done


def _write_json(path: str, payload) -> None:
    text = json.dumps(payload, ensure_ascii=False, indent=1)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text, encoding="utf-8")
        print(f"trace written to {path}")


def cmd_generate(args) -> int:
    extra = _check_generate_args(args)
    if args.input is not None:
        read_conversations(args.input)  # a bad file is refused before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    kw = dict(roi=args.roi or ["system"], k=args.k, min_prob=args.min_prob, entropy_threshold=args.entropy_threshold,
              attribution=args.attribution, engine=args.engine, max_new_tokens=args.max_new_tokens,
              **_processing(args), **extra)
    if args.input is not None:
        return _generate_many(args, model, tok, dict(kw, method=args.method, **_baseline_settings(args)))
    messages = _messages(args)
    console = Console(stderr=True) if args.json == "-" else None  # stdout carries the JSON
    if args.compare:
        results = {m: generate(model, tok, messages, method=m, **kw) for m in ("greedy", "agd")}
        print_comparison(messages, results["greedy"], results["agd"], console=console)
    else:
        results = {args.method: generate(model, tok, messages, method=args.method, **kw, **_baseline_settings(args))}
        print_result(results[args.method], console=console)
    if args.json:
        prov = provenance()  # the code, packages and machine behind the trace
        payload = {m: {**r.to_dict(), "extra": {**r.extra, "provenance": prov}} for m, r in results.items()}
        _write_json(args.json, payload if args.compare else payload[args.method])
    return 0


def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with AGD (or greedy), optionally compared side by side",
                       description="Generate a reply with Attribution-Guided Decoding on a chat prompt.")
    _add_decoding_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_steer_fit(args) -> int:
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise AgdError(f"--prompts {args.prompts}: cannot read it as a UTF-8 text file ({e})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not [p for p in prompts if p.strip()]:
        raise AgdError("no prompts: give user prompts with --prompt TEXT (repeatable) or --prompts FILE")
    if not args.instruction.strip():
        raise AgdError("--instruction is empty")
    if args.layer is not None and args.layer < 0:
        raise AgdError(f"--layer must be >= 0, got {args.layer}")
    check_writable(args.out, "--out")
    out = Path(args.out).with_suffix(".safetensors")
    for path in (out, out.with_suffix(".json")):  # both are written; neither may hold something else
        check_not_clobbering(path, "--out", own=_is_steering_file, inputs=(args.prompts,))
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    vector = fit_steering_vector(model, tok, prompts, args.instruction, layer=args.layer, placement=args.placement)
    path = vector.save(args.out)
    print(f"steering vector for layer {vector.layer} from {len(prompts)} prompts written to {path} "
          f"(metadata: {path.with_suffix('.json')})")
    return 0


def _is_steering_file(path: Path) -> bool:
    """A vector or its metadata as ``agd steer fit`` writes them (safe to rewrite by fitting again)."""
    if path.suffix == ".json":
        return is_agd_json(path, "instruction") and is_agd_json(path, "layer")
    try:
        with safe_open(str(path), framework="pt") as f:
            return "agdecode" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


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
    fit.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    fit.add_argument("--device", default="cpu", help="torch device (default cpu)")
    fit.set_defaults(func=cmd_steer_fit)


COMMANDS = [register_generate, register_report, register_steer, register_heads, register_bench, register_eval, register_calibrate,
            register_serve]


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose and -q/--quiet on every (sub)command, so they go wherever the user types them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbosity(child)
    if not any("--quiet" in a.option_strings for a in parser._actions):
        g = parser.add_mutually_exclusive_group()
        g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=argparse.SUPPRESS,
                       help="more output: agdecode's log and transformers' warnings")
        g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=argparse.SUPPRESS, help="less output: no progress bars or notes")


_QUIET = False  # set by main() for the command it runs


def quiet() -> bool:
    """Whether ``agd -q`` asked for no progress output (read by the commands' progress bars)."""
    return _QUIET


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agd``.

    Example:
        $ agd generate "What is the capital of Japan?" --system "Always answer in French." --compare
    """
    parser = argparse.ArgumentParser(prog="agd", description="Attribution-Guided Decoding for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"agd (agdecode) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    _add_verbosity(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed usage and the error (status 2), or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    verbosity = getattr(args, "verbosity", 0)
    if verbosity > 0:  # -v: agdecode's own log (model loading, batches), transformers' warnings
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        hf_logging.set_verbosity_warning()
    else:
        hf_logging.set_verbosity_error()  # keep loader chatter and progress bars out of the output
        hf_logging.disable_progress_bar()
    global _QUIET
    _QUIET = verbosity < 0  # -q: no progress bars or notes, only results and errors
    if _QUIET and hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        return args.func(args)
    except AgdError as e:  # written for people: one line, no traceback
        print(f"agd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agd: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is a bug: show where, and ask for a report
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
