"""``agd eval sysbench``: SysBench-format dialogues, decoded turn by turn, checked by an LLM judge.

SysBench (Qin et al. 2024, *SysBench: Can Large Language Models Follow System Messages?*; data and
judge at github.com/PKU-Baichuan-MLSystemLab/SysBench, file ``datas/system_benchmark_eval_datas.json``;
not shipped here, download it yourself) asks whether a model keeps to its system message over a
five-turn conversation, including turns that contradict it. The layout read here, a JSON list of
dialogues::

    [{"system_id": 1,                                   # optional id ("id" also accepted; else the index)
      "messages": [{"role": "system", "content": "..."},
                   {"role": "user", "content": "turn 1"}, {"role": "assistant", "content": "reference 1"},
                   ... five user turns, each followed by its reference answer (optional with --no history) ...],
      "prompt_infos": [{"alignment": "...",             # per user turn, in order; an opaque label, kept
                        "criteria": {"1": {"criteria_content": "...", "criteria_type": "..."}, "2": ...}},
                       ...]}]

``criteria`` may also be a list of strings or of such objects, or a dict of strings; the checklist
is read in key order (numeric keys numerically). Each turn is decoded with the chosen method, the
history being the model's own earlier replies (SysBench's "without ground-truth history" setting)
or the reference answers (``--gt-history``). An OpenAI-compatible judge (``--judge-url``, e.g. a
local vLLM, or ``agd serve``) gets one chat request per turn, built from a template
(``data/sysbench_judge.txt``, replaceable with ``--judge-template``; ``$system``, ``$history``,
``$user``, ``$response``, ``$criteria`` (numbered), ``$n`` are filled in) and must answer with a
JSON verdict per criterion (``{"1": {"verdict": "yes"}, "2": "no", ...}``; "yes"/"no", "是"/"否",
true/false). SysBench's own judge prompt is in Chinese (GPT-4o): pass it as a template to match it.

Metrics (SysBench's): CSR = satisfied criteria / all criteria; ISR = turns with every criterion
satisfied / all turns; SSR = mean over dialogues of (turns satisfied in a row from the first) /
(turns in the dialogue, 5 in SysBench). A criterion whose verdict cannot be read counts as not
satisfied and is counted (``unparsable``); it is never a pass.

Records: one JSON line per turn (``<id>:<turn>``), appended and flushed as the runner does. If the
judge is down or times out, the turn's reply is recorded with the error and the run stops with
one line saying so; the same command resumes it: replies already generated are judged then, not
decoded again.

Example:
    >>> spec = SysBenchSpec(data="system_benchmark_eval_datas.json", method="agd",
    ...                     judge=JudgeConfig(url="http://127.0.0.1:8000/v1", model="judge"))
    >>> summary = run_sysbench(spec, "runs/sysbench", model, tok)
    >>> summary["metrics"]["CSR"], summary["metrics"]["SSR"]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import decoding
from .._version import __version__
from ..errors import AgdError, JudgeError
from ..models import DTYPE_HELP, dtype_name, load_model
from .judge import Judge, JudgeConfig, parse_verdicts
from .methods import method_choices, parse_set, resolve_method
from .records import RunStore
from .runner import resolve_for_model

__all__ = ["Turn", "Dialogue", "read_sysbench", "JudgeConfig", "Judge", "JudgeError", "parse_verdicts",
           "sysbench_metrics", "decode", "SysBenchSpec", "run_sysbench", "add_arguments", "cmd_sysbench"]



@dataclass
class Turn:
    """One user turn: its message, the reference answer, the alignment label and the checklist."""

    user: str
    reference: str | None
    alignment: str | None
    criteria: list[str]


@dataclass
class Dialogue:
    id: str
    system: str
    turns: list[Turn]


def _criteria(raw) -> list[str] | None:
    def text(c):
        if isinstance(c, str):
            return c
        if isinstance(c, dict):
            for k in ("criteria_content", "content", "criterion", "text"):
                if isinstance(c.get(k), str):
                    return c[k]
        return None

    if isinstance(raw, dict):
        keys = sorted(raw, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
        raw = [raw[k] for k in keys]
    if not isinstance(raw, list) or not raw:
        return None
    out = [text(c) for c in raw]
    return out if all(isinstance(c, str) and c.strip() for c in out) else None


def _dialogue(i: int, d) -> Dialogue:
    where = f"dialogue {i}"
    if not isinstance(d, dict):
        raise AgdError(f"{where}: not a JSON object")
    msgs, infos = d.get("messages"), d.get("prompt_infos")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise AgdError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if msgs[0]["role"] != "system":
        raise AgdError(f"{where}: the first message must be the system message")
    turns_raw, j = [], 1
    while j < len(msgs):
        if msgs[j]["role"] != "user":
            raise AgdError(f"{where}: messages[{j}] should be a user turn, found role {msgs[j]['role']!r}")
        ref = msgs[j + 1]["content"] if j + 1 < len(msgs) and msgs[j + 1]["role"] == "assistant" else None
        turns_raw.append((msgs[j]["content"], ref))
        j += 2 if ref is not None else 1
    if not turns_raw:
        raise AgdError(f"{where}: no user turn")
    if not isinstance(infos, list) or len(infos) != len(turns_raw):
        raise AgdError(f"{where}: 'prompt_infos' must be a list with one entry per user turn ({len(turns_raw)})")
    turns = []
    for t, ((user, ref), info) in enumerate(zip(turns_raw, infos), 1):
        crit = _criteria(info.get("criteria")) if isinstance(info, dict) else None
        if crit is None:
            raise AgdError(f"{where}, turn {t}: 'criteria' must be a non-empty list or object of criterion texts")
        alignment = info.get("alignment")
        turns.append(Turn(user, ref, None if alignment is None else str(alignment), crit))
    ident = d.get("id", d.get("system_id", i))
    return Dialogue(str(ident), msgs[0]["content"], turns)


def read_sysbench(path: str | Path) -> tuple[list[Dialogue], str]:
    """The dialogues of a SysBench-format file and the file's sha256; every dialogue checked first.

    Example:
        >>> dialogues, sha = read_sysbench("tests/data/sysbench_sample.json")
        >>> len(dialogues), len(dialogues[0].turns), dialogues[0].turns[0].criteria[0]
        (3, 5, 'The reply is written in English.')
    """
    path = Path(path)
    if not path.is_file():
        raise AgdError(f"No such SysBench file: {path} (get it from github.com/PKU-Baichuan-MLSystemLab/SysBench, "
                       "datas/system_benchmark_eval_datas.json)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AgdError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(data, list) or not data:
        raise AgdError(f"{path}: expected a non-empty JSON list of dialogues")
    dialogues = [_dialogue(i, d) for i, d in enumerate(data)]
    ids = [d.id for d in dialogues]
    if len(set(ids)) != len(ids):
        raise AgdError(f"{path}: duplicate dialogue ids")
    return dialogues, hashlib.sha256(raw).hexdigest()


# --- metrics -------------------------------------------------------------------------------------------------

def sysbench_metrics(records: list[dict]) -> dict:
    """CSR, ISR and SSR of judged turn records (``dialogue``, ``turn``, ``n_turns``, ``verdicts``), and counts.

    Verdicts are True / False / None (unparsable: counted as not satisfied, and reported). SSR is
    taken over the dialogues whose every turn is judged. Records with a judge error are not judged.

    Example:
        >>> recs = [{"dialogue": "a", "turn": 1, "n_turns": 2, "verdicts": [True, True]},
        ...         {"dialogue": "a", "turn": 2, "n_turns": 2, "verdicts": [True, None]}]
        >>> m = sysbench_metrics(recs); m["CSR"], m["ISR"], m["SSR"], m["unparsable"]
        (0.75, 0.5, 0.5, 1)
    """
    judged = [r for r in records if r.get("verdicts") is not None]
    n_crit = sum(len(r["verdicts"]) for r in judged)
    ok_turn = {(r["dialogue"], r["turn"]): all(v is True for v in r["verdicts"]) for r in judged}
    by_dialogue: dict[str, dict] = {}
    for r in judged:
        by_dialogue.setdefault(r["dialogue"], {"n": r["n_turns"], "turns": set()})["turns"].add(r["turn"])
    ssr = []
    for d, info in by_dialogue.items():
        if info["turns"] != set(range(1, info["n"] + 1)):
            continue
        run = 0
        while run < info["n"] and ok_turn[(d, run + 1)]:
            run += 1
        ssr.append(run / info["n"])
    by_alignment: dict[str, list[bool]] = {}
    for r in judged:
        by_alignment.setdefault(str(r.get("alignment")), []).append(ok_turn[(r["dialogue"], r["turn"])])
    return {
        "CSR": sum(v is True for r in judged for v in r["verdicts"]) / n_crit if n_crit else None,
        "ISR": sum(ok_turn.values()) / len(ok_turn) if ok_turn else None,
        "SSR": sum(ssr) / len(ssr) if ssr else None,
        "ISR_by_alignment": {k: sum(v) / len(v) for k, v in sorted(by_alignment.items())},
        "turns": len(judged), "criteria": n_crit, "dialogues_complete": len(ssr),
        "unparsable": sum(v is None for r in judged for v in r["verdicts"]),
        "judge_errors": sum(1 for r in records if r.get("verdicts") is None),
    }


# --- decoding and the run ------------------------------------------------------------------------------------

def decode(model, tokenizer, conversations: list[list[dict]], gen_kwargs: dict) -> list:
    """Replies (``GenerationResult``) to several conversations, decoded as one batch: the one place
    this module decodes."""
    return decoding.generate(model, tokenizer, list(conversations), batch_size=len(conversations), **gen_kwargs)


@dataclass
class SysBenchSpec:
    """Everything that defines a SysBench run (recorded in ``run.json``)."""

    data: str
    method: str
    judge: JudgeConfig
    gt_history: bool = False
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "cpu"
    max_new_tokens: int = 512
    limit: int | None = None      # first N dialogues
    roi: str | None = None        # default: the system message
    extra: dict = field(default_factory=dict)
    calibration: str | None = None
    batch_size: int = 8           # dialogues decoded side by side (turn by turn)


def _latest(store) -> dict[str, dict]:
    """Records by id, the last line winning (a turn re-judged after a judge error is appended again)."""
    out: dict[str, dict] = {}
    if store.records_file.is_file():
        for line in store.records_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = r
    return out


def _history(d: Dialogue, t: int, done: dict[str, dict], gt: bool) -> list[dict]:
    msgs = []
    for k, turn in enumerate(d.turns[:t], 1):
        reply = turn.reference if gt else done[f"{d.id}:{k}"]["response"]
        msgs += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": reply}]
    return msgs


def run_sysbench(spec: SysBenchSpec, out_dir: str | Path, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run ``spec`` into ``out_dir/<method>/`` (resuming what is there) and return the summary.

    Raises :class:`JudgeError` when the judge fails; the records written so far stay, and the same
    call resumes.
    """
    dialogues, sha = read_sysbench(spec.data)
    if spec.limit is not None:
        if spec.limit < 1:
            raise AgdError(f"--limit must be at least 1, got {spec.limit}")
        dialogues = dialogues[:spec.limit]
    if spec.gt_history and any(t.reference is None for d in dialogues for t in d.turns[:-1]):
        raise AgdError("--gt-history needs a reference answer after every user turn but the last")
    gen = resolve_method(spec.method, roi=spec.roi or "system", extra=spec.extra, max_new_tokens=spec.max_new_tokens)
    judge = Judge(spec.judge)
    judge.ping()
    if model is None:
        model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    identity, gen = resolve_for_model(model, gen, spec.calibration)
    call = {k: v for k, v in gen.items() if k != "entropy_threshold_source"}
    settings = {"task": "sysbench", "data": {"name": Path(spec.data).name, "sha256": sha}, "method": spec.method,
                "generate": call, "model": identity, "dtype": dtype_name(model.dtype),
                "gt_history": spec.gt_history,
                "judge": {"model": spec.judge.model,
                          "template_sha256": hashlib.sha256(judge.template.encode()).hexdigest()}}
    info = {"spec": dataclasses.asdict(spec),
            "agdecode": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "judge_template": judge.template}
    store = RunStore(Path(out_dir) / spec.method.replace("/", "_"))
    store.open(settings, info)  # the judge's URL may change between resumptions; its model and prompt may not
    done = _latest(store)
    total = sum(len(d.turns) for d in dialogues)
    bar = None
    if progress:
        finished = sum(1 for r in done.values() if r.get("verdicts") is not None)
        bar = tqdm(total=total, initial=min(finished, total), unit="turn", desc=f"sysbench:{spec.method}",
                   dynamic_ncols=True)

    def judge_and_store(d: Dialogue, t: int, rec: dict) -> None:
        turn = d.turns[t]
        t0 = time.perf_counter()
        try:
            verdicts, raw = judge.check(d.system, _history(d, t, done, spec.gt_history), turn.user,
                                        rec["response"], turn.criteria)
            rec.update(verdicts=verdicts, judge={"raw": raw, "unparsable": sum(v is None for v in verdicts),
                                                 "seconds": time.perf_counter() - t0, "error": None})
        except JudgeError as e:
            rec.update(verdicts=None, judge={"raw": None, "error": str(e), "seconds": time.perf_counter() - t0})
            store.append(rec)
            done[rec["id"]] = rec
            raise
        store.append(rec)
        done[rec["id"]] = rec
        if bar is not None:
            bar.update(1)

    try:
        for c in range(0, len(dialogues), spec.batch_size):
            chunk = dialogues[c:c + spec.batch_size]
            for t in range(max(len(d.turns) for d in chunk)):
                todo = [d for d in chunk if t < len(d.turns) and done.get(f"{d.id}:{t + 1}", {}).get("verdicts") is None]
                # A reply generated before the judge failed is judged now, not decoded again.
                for d in [d for d in todo if f"{d.id}:{t + 1}" in done]:
                    judge_and_store(d, t, done[f"{d.id}:{t + 1}"])
                fresh = [d for d in todo if f"{d.id}:{t + 1}" not in done]
                if not fresh:
                    continue
                convs = [[{"role": "system", "content": d.system}, *_history(d, t, done, spec.gt_history),
                          {"role": "user", "content": d.turns[t].user}] for d in fresh]
                for d, res in zip(fresh, decode(model, tokenizer, convs, call)):
                    turn = d.turns[t]
                    rec = {"id": f"{d.id}:{t + 1}", "dialogue": d.id, "turn": t + 1, "n_turns": len(d.turns),
                           "alignment": turn.alignment, "response": res.text.strip(), "criteria": turn.criteria,
                           "trace": {"steps": len(res.steps), "guided": res.guided_steps,
                                     "overrides": len(res.overrides), "prompt_tokens": len(res.prompt_ids)},
                           "timing": {"generate_s": res.seconds}, "config": res.config}
                    judge_and_store(d, t, rec)
    except JudgeError as e:
        raise JudgeError(f"{e}. The {len(done)} turn records so far are in {store.records_file}; run the same "
                         "command again to resume (replies already generated are judged then, not decoded again).") from e
    finally:
        if bar is not None:
            bar.close()
        ids = {f"{d.id}:{k}" for d in dialogues for k in range(1, len(d.turns) + 1)}
        summary = {"task": "sysbench", "method": spec.method, "data": Path(spec.data).name,
                   "gt_history": spec.gt_history, "judge_model": spec.judge.model,
                   "metrics": sysbench_metrics([r for i, r in done.items() if i in ids])}
        summary["complete"] = summary["metrics"]["turns"] == len(ids)
        (store.path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# --- command line --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``agd eval sysbench``."""
    p.add_argument("--data", required=True, help="SysBench-format JSON file (a list of dialogues; see "
                   "github.com/PKU-Baichuan-MLSystemLab/SysBench, datas/system_benchmark_eval_datas.json)")
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="model name to send to the judge")
    p.add_argument("--judge-template", default=None, metavar="FILE",
                   help="judge prompt template ($system, $history, $user, $response, $criteria, $n) "
                        "(default: the shipped data/sysbench_judge.txt)")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    p.add_argument("--judge-retries", type=int, default=2, help="retries of a failed judge request (default 2)")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (default OPENAI_API_KEY; none needed locally)")
    p.add_argument("--gt-history", action="store_true",
                   help="history = the reference answers (default: the model's own earlier replies)")
    p.add_argument("--method", action="append", default=None, metavar="NAME[,NAME...]",
                   help=f"decoding method(s): {', '.join(method_choices())}; NAME@ROI sets the ROI (default: greedy,agd)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="maximum tokens per reply (default 512)")
    p.add_argument("--limit", type=int, default=None, help="only the first N dialogues")
    p.add_argument("--batch-size", type=int, default=8, help="dialogues decoded together, turn by turn (default 8)")
    p.add_argument("--roi", default=None, help="ROI of the AGD methods (default: system)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="any further generate() argument")
    p.add_argument("--calibration", default=None, metavar="FILE", help="calibration file for the *-auto methods")
    p.add_argument("--out", default=None, help="output directory (default runs/sysbench-DATA[-gt]); one folder per method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sysbench)


def cmd_sysbench(args) -> int:
    methods = [m.strip() for arg in (args.method or ["greedy,agd"]) for m in arg.split(",") if m.strip()]
    judge = JudgeConfig(url=args.judge_url, model=args.judge_model, template=args.judge_template,
                        timeout=args.judge_timeout, retries=args.judge_retries, api_key_env=args.judge_api_key_env)
    out = Path(args.out or f"runs/sysbench-{Path(args.data).stem}{'-gt' if args.gt_history else ''}")
    specs = [SysBenchSpec(data=args.data, method=m, judge=judge, gt_history=args.gt_history, model=args.model,
                          dtype=args.dtype, device=args.device, max_new_tokens=args.max_new_tokens, limit=args.limit,
                          roi=args.roi, extra=parse_set(args.set), calibration=args.calibration,
                          batch_size=args.batch_size) for m in methods]
    # Refuse a bad file, method or template before loading the model.
    read_sysbench(args.data)
    judge.template_text()
    for s in specs:
        resolve_method(s.method, roi=s.roi or "system", extra=s.extra, max_new_tokens=s.max_new_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    try:
        for spec in specs:
            m = run_sysbench(spec, out, model, tok, progress=not args.no_progress)["metrics"]
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{spec.method}: CSR {fmt(m['CSR'])}, ISR {fmt(m['ISR'])}, SSR {fmt(m['SSR'])} "
                  f"({m['turns']} turns, {m['criteria']} criteria, {m['unparsable']} unparsable verdicts)")
    except KeyboardInterrupt:
        return 130
    print(f"records in {out}/<method>/records.jsonl")
    return 0
