"""``agd eval rules|qa|report`` and ``agd calibrate``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..calibrate import calibrate, load_calibration, plot_histogram, save_calibration
from ..checks import check_writable, positive_int
from ..errors import AgdError
from ..models import DTYPE_HELP, load_model
from .data import ItemFileError, read_items
from .datasets import BUILTIN, load_items, qa_messages
from .methods import method_choices, parse_set
from .ray_runner import RayPool
from .report import archive_runs, build_report, markdown_tables, update_doc
from .runner import EvalSpec, check_limit, prepare, run_eval
from .sysbench import add_arguments

__all__ = ["register_eval", "register_calibrate"]

DEFAULTS = {"rules": {"data": "rules", "max_new_tokens": 256}, "qa": {"data": "triviaqa", "max_new_tokens": 48}}


def _add_run_args(p: argparse.ArgumentParser, task: str) -> None:
    d = DEFAULTS[task]
    p.add_argument("--data", default=d["data"],
                   help=f"a built-in set or a JSONL file (default {d['data']}; see `agd eval --help`)")
    p.add_argument("--method", action="append", default=None, metavar="NAME[,NAME...]",
                   help=f"decoding method(s), comma-separated or repeated: {', '.join(method_choices())}; NAME@ROI sets "
                        "the ROI (e.g. agd@context) (default: greedy,agd)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d["max_new_tokens"],
                   help=f"maximum tokens per response (default {d['max_new_tokens']})")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling methods, per item (default 0)")
    p.add_argument("--roi", default=None, help="ROI of the AGD methods (default: rules: system; qa: context with "
                                               "documents, else user)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="any further generate() argument, e.g. --set k=3 --set cad_alpha=1.0 (recorded)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration file for the *-auto methods (default: the model's, from `agd calibrate`)")
    p.add_argument("--out", default=None, help=f"output directory (default runs/{task}-DATA); one folder per method")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed input lines (reported and recorded) instead of refusing the file")
    p.add_argument("--ray", action="store_true", help="shard the items over local Ray actors")
    p.add_argument("--ray-address", default=None,
                   help="shard over an existing Ray cluster (e.g. auto, ray://host:10001)")
    p.add_argument("--ray-workers", type=positive_int, default=None,
                   help="number of actors (default: GPUs, or CPUs / cores per worker)")
    p.add_argument("--ray-cpus-per-worker", type=positive_int, default=2, help="CPU cores per actor without GPUs (default 2)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's); 1 is far faster on a CPU shared with other jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="conversations decoded together (default: 8 on CPU, 32 on CUDA)")
    p.set_defaults(func=cmd_run, task=task)


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def cmd_run(args) -> int:
    methods = [m.strip() for arg in (args.method or ["greedy,agd"]) for m in arg.split(",") if m.strip()]
    out = Path(args.out or f"runs/{args.task}-{Path(args.data).stem}")
    extra = parse_set(args.set)
    specs = [EvalSpec(task=args.task, data=args.data, method=m, model=args.model, dtype=args.dtype, device=args.device,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit, roi=args.roi, extra=extra,
                      on_error="skip" if args.skip_bad_lines else "fail", calibration=args.calibration,
                      batch_size=args.batch_size)
             for m in methods]
    # Refuse an unavailable method, a bad file or an unwritable output before loading anything.
    auto = any(prepare(spec)[1].get("entropy_threshold") == "auto" for spec in specs)
    check_out_dir(out, "--out")
    if args.calibration and not Path(args.calibration).is_file():
        raise AgdError(f"--calibration {args.calibration!r} not found (write one with `agd calibrate --out FILE`).")
    ray = None
    if args.ray or args.ray_address:
        ray = {"address": args.ray_address, "workers": args.ray_workers, "cpus_per_worker": args.ray_cpus_per_worker}
    _threads(args.threads)
    model = tok = None
    if ray is None:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        if auto:  # a missing calibration stops the command before the first method runs, not after it
            load_calibration(model, args.calibration)
    try:
        for spec in specs:
            pool = RayPool(spec, **ray) if ray is not None else None
            s = run_eval(spec, out, model, tok, pool=pool, progress=not args.no_progress)
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items() if v is not None)
            err = f", {s['n_errors']} errors" if s["n_errors"] else ""
            guided = s["trace"]["guided_fraction"] or 0
            print(f"{spec.method}: n={s['n']}{err}: {metrics}; guided {guided:.2f} of steps")
            if s.get("scorer_errors"):
                print(f"warning: {spec.method}: the rule checker raised on {s['scorer_errors']} item(s); those "
                      "instructions count as not followed (see 'scores.errors' in records.jsonl).", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    print(f"records in {out}/<method>/records.jsonl; compare with: agd eval report {out}")
    return 0


def check_out_dir(path: Path, what: str) -> None:
    """An output directory must be a directory (or not exist yet) below a writable one."""
    if path.exists() and not path.is_dir():
        raise AgdError(f"{what} {str(path)!r} exists and is not a directory.")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise AgdError(f"{what} {str(path)!r}: {str(existing)!r} is not a writable directory.")


def cmd_report(args) -> int:
    if args.out:
        check_out_dir(Path(args.out), "--out")

    if args.update_doc or args.check_doc:
        doc = args.update_doc or args.check_doc
        changed = update_doc(doc, args.run_dirs, check=bool(args.check_doc))
        if args.check_doc:
            if changed:
                print(f"{doc}: table(s) {', '.join(changed)} differ from the records under "
                      f"{', '.join(args.run_dirs)}; run `agd eval report --update-doc {doc} {' '.join(args.run_dirs)}`",
                      file=sys.stderr)
                return 1
            print(f"{doc}: every marked table equals the one regenerated from the records")
        else:
            print(f"{doc}: updated {', '.join(changed)}" if changed else f"{doc}: tables already up to date")
        return 0
    if args.markdown_tables:
        for name, table in markdown_tables(args.run_dirs).items():
            print(f"<!-- table:{name} -->\n{table}\n<!-- /table:{name} -->\n")
        return 0
    print(build_report(args.run_dirs, args.out, plots=not args.no_plots))
    print(f"(written to {Path(args.out or args.run_dirs[0]) / 'report.md'})", file=sys.stderr)
    return 0


def cmd_archive(args) -> int:
    for folder in archive_runs(args.run_dirs, args.to):
        print(folder)
    return 0


def register_eval(sub) -> None:
    sets = ", ".join(f"{k} ({v[0]})" for k, v in BUILTIN.items())
    p = sub.add_parser("eval", help="evaluate decoding methods: rule following, QA recall, reports",
                       description=f"Evaluation harness. Built-in sets: {sets}. Runs are append-only JSONL, "
                                   "resumable: run the same command again after a crash or Ctrl-C.")
    s = p.add_subparsers(dest="eval_command", required=True)
    _add_run_args(s.add_parser("rules", help="IFEval rules in the system message (prompt/instruction, strict/loose)"),
                  "rules")
    _add_run_args(s.add_parser("qa", help="answer recall, closed- or open-book"), "qa")
    _add_sysbench(s)
    r = s.add_parser("report", help="tables and plots with bootstrap CIs and paired comparisons against greedy")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or folders containing them")
    r.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the first RUN_DIR)")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    r.add_argument("--markdown-tables", action="store_true",
                   help="print only the tables, each between <!-- table:NAME --> markers, for a document")
    r.add_argument("--update-doc", default=None, metavar="DOC",
                   help="rewrite the marked tables of the markdown file DOC from the runs (nothing else written)")
    r.add_argument("--check-doc", default=None, metavar="DOC",
                   help="exit 1 if a marked table of DOC differs from the one regenerated from the runs")
    r.set_defaults(func=cmd_report)
    a = s.add_parser("archive", help="copy runs, compressed, into a folder to commit (e.g. docs/results)",
                     description="Write each run under RUN_DIR as DEST/<task>-<data>/<method>/{run.json, "
                                 "records.jsonl.gz, timings.jsonl.gz}: records sorted by id, gzip without a time "
                                 "stamp, so the same records always give the same bytes. `agd eval report DEST` "
                                 "reads the archives like run directories.")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or folders containing them")
    a.add_argument("--to", required=True, metavar="DEST", help="archive folder (e.g. docs/results)")
    a.set_defaults(func=cmd_archive)


def _add_sysbench(sub) -> None:
    add_arguments(sub.add_parser("sysbench", help="SysBench-format dialogues checked by an OpenAI-compatible judge "
                                                  "(CSR, ISR, SSR)"))


def _conversations(spec: str) -> tuple[list[list[dict]], dict]:
    if spec in BUILTIN:
        s = load_items(spec, BUILTIN[spec][0])
    else:
        try:
            s = read_items(spec, "rules")
        except ItemFileError:
            s = read_items(spec, "qa")
    convs = [it["messages"] if "messages" in it else qa_messages(it) for it in s.items]
    return convs, {"name": s.name, "source": s.source, "sha256": s.sha256}


def cmd_calibrate(args) -> int:
    check_limit(args.limit)
    if not 0 <= args.percentile <= 100:
        raise AgdError(f"--percentile must be in [0, 100], got {args.percentile}")
    for path, what in ((args.out, "--out"), (args.plot, "--plot")):
        if path:
            check_writable(path, what)
    _threads(args.threads)
    convs, data = _conversations(args.data)
    if args.limit is not None:
        convs = convs[:args.limit]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    record, _ = calibrate(model, tok, convs, percentile=args.percentile, max_new_tokens=args.max_new_tokens,
                          data=data, progress=not args.no_progress, batch_size=args.batch_size)
    record["model"]["cli_name"] = args.model
    path = save_calibration(record, args.out)
    shown = {k: v for k, v in record.items() if k != "histogram"}
    print(json.dumps(shown, indent=1))
    paper = 100 * record["fraction_guided"]["paper_1.734"]
    print(f"\n{record['percentile']:g}th percentile of {record['n_steps']} greedy-step entropies: "
          f"{record['threshold']:.3f} nats (the paper's 1.734 would leave {paper:.0f} % of steps open to guidance "
          f"here). Saved to {path}; entropy_threshold=\"auto\" now uses it for this model.")
    if args.plot:
        print(f"histogram: {plot_histogram(record, args.plot)}")
    return 0


def register_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate the entropy gate (entropy_threshold='auto') for a model",
                       description="Greedy-decode a calibration set, record the entropy (nats) of every generated "
                                   "step, and store the chosen percentile for this model in the user cache; "
                                   "entropy_threshold='auto' (and --entropy-threshold auto) then uses it. "
                                   "The paper's 1.734 is its 80th percentile on IHEval for its models.")
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder, or a .gguf file")
    p.add_argument("--data", default="rules-calibration",
                   help="calibration set: a built-in set or a JSONL file (default: rules-calibration, IFEval prompts "
                        "with rules in the system message, disjoint from the evaluated rules items)")
    p.add_argument("--percentile", type=float, default=80.0, help="percentile of the step entropies (default 80)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens generated per item (default 128)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="write the calibration here instead of the user cache")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the entropy histogram")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="conversations decoded together (default: 8 on CPU, 32 on CUDA)")
    p.set_defaults(func=cmd_calibrate)
