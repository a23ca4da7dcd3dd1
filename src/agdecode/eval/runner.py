"""Running one method over one item set: generate, score, record; resumable, locally or on Ray.

Example:
    >>> spec = EvalSpec(task="rules", data="rules", method="agd-gated", limit=10, max_new_tokens=48)
    >>> summary = run_eval(spec, "runs/pilot/rules")   # -> runs/pilot/rules/agd-gated/{run,summary}.json, records.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from .. import decoding
from .._version import __version__
from ..config import AGDConfig
from ..calibrate import calibrated_threshold, model_identity
from ..errors import AgdError
from .datasets import load_items, qa_messages
from ..methods import get_method
from ..models import dtype_name, load_model
from ..provenance import provenance
from .methods import resolve_method
from .records import RunStore, summarize
from .scoring import quality, response_logprob, score_qa, score_rules

__all__ = ["EvalSpec", "check_limit", "evaluate_item", "evaluate_items", "default_batch_size", "prepare", "run_eval",
           "item_seed"]


@dataclass
class EvalSpec:
    """Everything that defines a run (all of it recorded in ``run.json``)."""

    task: str                       # "rules" | "qa"
    data: str                       # a built-in set name or a JSONL file
    method: str                     # a preset of eval.methods, optionally NAME@ROI
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "cpu"
    max_new_tokens: int = 128
    seed: int = 0
    limit: int | None = None
    roi: str | None = None          # None: the task's default (rules: system; qa: context or user)
    extra: dict = field(default_factory=dict)   # --set KEY=VALUE
    on_error: str = "fail"          # malformed input lines: "fail" or "skip"
    calibration: str | None = None  # calibration file for entropy_threshold="auto" (default: the cache)
    batch_size: int | None = None   # sequences per forward pass (None: default_batch_size(device))


def default_batch_size(device: str) -> int:
    """Sequences decoded together: a GPU wants many rows; on a CPU a few already fill the cores."""
    return 32 if str(device).startswith("cuda") else 8


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed that does not depend on order, sharding or resumption.

    Example:
        >>> item_seed(0, "rules-000") == item_seed(0, "rules-000")
        True
    """
    return (seed * 1_000_003 + zlib.crc32(item_id.encode())) % 2**31


def default_roi(task: str, items: list[dict]) -> str:
    """The ROI AGD attends to by default: the rules (system message), the documents, or the question."""
    if task == "rules":
        return "system"
    return "context" if any(it.get("documents") for it in items) else "user"


def _prompt(task: str, item: dict) -> tuple[list[dict], dict]:
    if task == "rules":
        return item["messages"], {}
    docs = item.get("documents")
    return qa_messages(item), ({"documents": docs} if docs else {})


def evaluate_item(model, tokenizer, task: str, item: dict, gen_kwargs: dict, seed: int = 0) -> dict:
    """Generate a response for one item, score it and return its record.

    A ``ValueError`` from generation (a prompt too long for the model, an empty ROI) becomes an
    error record, reported in the summary; anything else propagates.

    Example:
        >>> rec = evaluate_item(model, tok, "qa", {"id": "1", "question": "capital of france", "answers": ["Paris"]},
        ...                     {"method": "greedy", "max_new_tokens": 16})
        >>> rec["scores"]["recall"]
    """
    return next(evaluate_items(model, tokenizer, task, [item], gen_kwargs, seed, batch_size=1))


def evaluate_items(model, tokenizer, task: str, items: list[dict], gen_kwargs: dict, seed: int = 0,
                   batch_size: int = 8) -> Iterator[dict]:
    """Records of ``items``, in order, generated ``batch_size`` at a time.

    Items are handed to ``generate`` in chunks of a few batches (a finished row's place goes to
    the next item of the chunk), and each chunk's records are yielded when it ends, so an
    interrupted run loses at most one chunk. A chunk that fails on its input (one prompt too long
    for the model, an empty ROI) is redone item by item, so only the bad item gets an error record.
    ``sample`` draws with a per-item seed, so it runs item by item.

    Example:
        >>> recs = list(evaluate_items(model, tok, "rules", items, {"method": "agd", "max_new_tokens": 64}))
    """
    per_item = get_method(gen_kwargs.get("method", "agd")).stochastic  # a seed per item: runs item by item
    chunk = 1 if per_item else batch_size * 4
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        t0 = time.perf_counter()
        try:
            results = _generate(model, tokenizer, task, part, gen_kwargs, seed, batch_size)
        except ValueError as e:
            if len(part) == 1:
                yield {"id": part[0]["id"], "error": f"{type(e).__name__}: {e}", "seed": item_seed(seed, part[0]["id"])}
                continue
            yield from (evaluate_item(model, tokenizer, task, it, gen_kwargs, seed) for it in part)
            continue
        per = (time.perf_counter() - t0) / len(part)  # a batch's time, shared by its items
        for item, res in zip(part, results):
            yield _record(model, task, item, res, item_seed(seed, item["id"]), per)


def _generate(model, tokenizer, task: str, items: list[dict], gen_kwargs: dict, seed: int, batch_size: int):
    kw = dict(gen_kwargs)
    if get_method(kw.get("method", "agd")).stochastic:
        kw.setdefault("seed", item_seed(seed, items[0]["id"]))
    prompts = [_prompt(task, it) for it in items]
    docs = [extra.get("documents") for _, extra in prompts]
    return decoding.generate(model, tokenizer, [m for m, _ in prompts], documents=docs, batch_size=batch_size, **kw)


def _record(model, task: str, item: dict, res, s: int, generate_s: float) -> dict:
    t1 = time.perf_counter()
    response = res.text.strip()
    if task == "rules":
        user = [m["content"] for m in item["messages"] if m["role"] == "user"][-1]
        scores = score_rules(item["instruction_id_list"], item["kwargs"], response, prompt=user)
    else:
        scores = score_qa(item["answers"], response)
    logprob = response_logprob(model, res.prompt_ids, res.token_ids)
    reasons: dict[str, int] = {}
    for st in res.steps:
        reasons[st.reason] = reasons.get(st.reason, 0) + 1
    ent = [st.entropy for st in res.steps]
    return {
        "id": item["id"], "response": response, "scores": scores,
        "quality": quality(response, len(res.token_ids), logprob),
        "trace": {"steps": len(res.steps), "guided": res.guided_steps, "overrides": len(res.overrides),
                  "gated": reasons.get("gate", 0), "reasons": reasons,
                  "mean_entropy": sum(ent) / len(ent) if ent else None, "prompt_tokens": len(res.prompt_ids)},
        "timing": {"generate_s": generate_s, "score_s": time.perf_counter() - t1},
        "seed": s, "config": res.config,
    }


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(AGDConfig)}


def resolve_for_model(model, gen_kwargs: dict, calibration: str | None = None) -> tuple[dict, dict]:
    """Model-dependent settings: the model's identity and ``entropy_threshold="auto"`` as a number."""
    kw = dict(gen_kwargs)
    if kw.get("entropy_threshold") == "auto":
        kw["entropy_threshold"] = calibrated_threshold(model, calibration)
        kw["entropy_threshold_source"] = "calibrated"
    return model_identity(model), kw


def prepare(spec: EvalSpec):
    """Items and ``generate`` arguments of a spec, validated before any model is loaded.

    Example:
        >>> items_set, gen_kwargs = prepare(EvalSpec("qa", "nq", "greedy", limit=5))
    """
    check_limit(spec.limit)
    data = load_items(spec.data, spec.task, spec.on_error)
    if spec.limit is not None:
        data.items = data.items[:spec.limit]
    gen = resolve_method(spec.method, roi=spec.roi or default_roi(spec.task, data.items), extra=spec.extra,
                         max_new_tokens=spec.max_new_tokens)
    # Refuse bad settings (a baseline without its vector, a bad k) now, not once per item.
    fields = _config_fields()
    probe = {k: v for k, v in gen.items() if k in fields}
    if probe.get("entropy_threshold") == "auto":
        probe["entropy_threshold"] = 0.0
    try:
        AGDConfig(**probe).validate()
    except AgdError:
        raise
    except ValueError as e:  # the settings' own checks, worded for the API: a bad input of this run
        raise AgdError(f"method {spec.method!r}: {e}") from None
    return data, gen


def check_limit(limit, what: str = "--limit") -> None:
    """A limit on the number of items is None (all) or a positive integer; 0 or -1 would silently mean something else.

    Example:
        >>> check_limit(10); check_limit(None)
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AgdError(f"{what} must be a positive number of items (or left out for all), got {limit!r}.")


def _settings(spec: EvalSpec, data, gen: dict, identity: dict, dtype: str) -> dict:
    # The dtype as resolved ("auto" -> bfloat16 or float32): a run resumed on another machine or
    # with another default must not mix precisions.
    return {"task": spec.task, "data": {"name": data.name, "sha256": data.sha256}, "method": spec.method,
            "generate": {k: v for k, v in gen.items() if k != "entropy_threshold_source"},
            "model": identity, "dtype": dtype, "seed": spec.seed}


def _local_records(model, tok, spec: EvalSpec, todo: list[dict], gen: dict) -> Iterator[dict]:
    call = {k: v for k, v in gen.items() if k != "entropy_threshold_source"}
    yield from evaluate_items(model, tok, spec.task, todo, call, spec.seed, spec.batch_size or default_batch_size(spec.device))


def _asked(store: RunStore, items: list[dict]) -> list[dict]:
    """The records of the asked items only: a resumed run with a smaller --limit, or records of other items
    in the directory, must not change what the summary counts."""
    asked = {it["id"] for it in items}
    records = store.records()
    foreign = sum(r["id"] not in asked for r in records)
    if foreign:
        print(f"note: {store.records_file}: {foreign} record(s) of items not asked for this time (another "
              "--limit or data set) are kept but not counted.", file=sys.stderr)
    return [r for r in records if r["id"] in asked]


def run_eval(spec: EvalSpec, out_dir: str | Path, model=None, tokenizer=None, pool=None,
             progress: bool = True) -> dict:
    """Run ``spec`` into ``out_dir/<method>/``, resuming what is already there; return the summary.

    ``pool`` (a :class:`~agdecode.eval.ray_runner.RayPool` made for ``spec``) shards the items over
    Ray actors instead of running them here; the files written are the same; the pool is closed at the end.

    Example:
        >>> run_eval(spec, "runs/rules")                                   # here
        >>> run_eval(spec, "runs/rules", pool=RayPool(spec, workers=2))    # over Ray actors
    """
    ray = pool is not None
    try:
        data, gen = prepare(spec)
        store = RunStore(Path(out_dir) / spec.method.replace("/", "_"))
        if ray:
            identity, gen = pool.resolve(gen)
        else:
            if model is None:
                model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
            identity, gen = resolve_for_model(model, gen, spec.calibration)
        info = {"data": data.describe(), "spec": dataclasses.asdict(spec), "agdecode": __version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "ray": pool.options if ray else None,
                "provenance": provenance()}
        dtype = pool.dtype() if ray else dtype_name(model.dtype)
        done = store.open(_settings(spec, data, gen, identity, dtype), info)
    except BaseException:
        if ray:  # nothing ran: the actors go now, not at interpreter exit
            pool.close()
        raise
    todo = [it for it in data.items if it["id"] not in done]
    records: Iterable[dict] = (pool.records(todo, gen) if ray
                               else _local_records(model, tokenizer, spec, todo, gen))
    bar = None
    if progress:
        bar = tqdm(total=len(data.items), initial=len(data.items) - len(todo), unit="item",
                   desc=f"{spec.task}:{data.name}:{spec.method}", dynamic_ncols=True)
    complete = False
    try:
        for rec in records:
            store.append(rec)
            if bar is not None:
                bar.update(1)
        complete = True
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(store.records())} records kept in {store.records_file}; "
              "run the same command again to resume.", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        if ray:
            pool.close()
        summary = summarize(_asked(store, data.items), spec.task, store.timings())
        summary.update(complete=complete, method=spec.method, data=data.name)
        (store.path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
