"""Running one method over one item set: generate, score, record; resumable, locally or on Ray.

Example:
    >>> spec = EvalSpec(task="rules", data="rules", method="agd-gated", limit=10, max_new_tokens=48)
    >>> summary = run_eval(spec, "runs/pilot/rules")   # -> runs/pilot/rules/agd-gated/{run,summary}.json, records.jsonl
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .. import decoding
from .datasets import qa_messages, render_documents
from .methods import resolve_method
from .records import RunStore, summarize
from .scoring import quality, response_logprob, score_qa, score_rules

__all__ = ["EvalSpec", "evaluate_item", "prepare", "run_eval", "item_seed"]


@dataclass
class EvalSpec:
    """Everything that defines a run (all of it recorded in ``run.json``)."""

    task: str                       # "rules" | "qa"
    data: str                       # a built-in set name or a JSONL file
    method: str                     # a preset of eval.methods, optionally NAME@ROI
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens: int = 128
    seed: int = 0
    limit: int | None = None
    roi: str | None = None          # None: the task's default (rules: system; qa: context or user)
    extra: dict = field(default_factory=dict)   # --set KEY=VALUE
    on_error: str = "fail"          # malformed input lines: "fail" or "skip"
    calibration: str | None = None  # calibration file for entropy_threshold="auto" (default: the cache)


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed that does not depend on order, sharding or resumption.

    Example:
        >>> item_seed(0, "rules-000") == item_seed(0, "rules-000")
        True
    """
    return (seed * 1_000_003 + zlib.crc32(item_id.encode())) % 2**31


def _supports_documents() -> bool:
    return "documents" in inspect.signature(decoding.generate).parameters


def default_roi(task: str, items: list[dict]) -> str:
    """The ROI AGD attends to by default: the rules (system message), the documents, or the question."""
    if task == "rules":
        return "system"
    return "context" if any(it.get("documents") for it in items) else "user"


def _prompt(task: str, item: dict) -> tuple[list[dict], dict]:
    if task == "rules":
        return item["messages"], {}
    messages, docs = qa_messages(item), item.get("documents")
    if not docs:
        return messages, {}
    if _supports_documents():
        return messages, {"documents": docs}
    # This generate() cannot take documents yet: put them in the user message as it would.
    return messages[:-1] + [{"role": "user", "content": render_documents(docs, messages[-1]["content"])}], {}


def evaluate_item(model, tokenizer, task: str, item: dict, gen_kwargs: dict, seed: int = 0) -> dict:
    """Generate a response for one item, score it and return its record.

    A ``ValueError`` from generation (a prompt too long for the model, an empty ROI) becomes an
    error record, reported in the summary; anything else propagates.

    Example:
        >>> rec = evaluate_item(model, tok, "qa", {"id": "1", "question": "capital of france", "answers": ["Paris"]},
        ...                     {"method": "greedy", "max_new_tokens": 16})
        >>> rec["scores"]["recall"]
    """
    s = item_seed(seed, item["id"])
    kw = dict(gen_kwargs)
    if kw.get("method") == "sample":
        kw.setdefault("seed", s)
    messages, extra = _prompt(task, item)
    torch.manual_seed(s)
    t0 = time.perf_counter()
    try:
        res = decoding.generate(model, tokenizer, messages, **kw, **extra)
    except ValueError as e:
        return {"id": item["id"], "error": f"{type(e).__name__}: {e}", "seed": s}
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
        "timing": {"generate_s": res.seconds, "total_s": time.perf_counter() - t0, "score_s": time.perf_counter() - t1},
        "seed": s, "config": res.config,
    }


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(decoding.AGDConfig)}


def resolve_for_model(model, gen_kwargs: dict, calibration: str | None = None) -> tuple[dict, dict]:
    """Model-dependent settings: the model's identity and ``entropy_threshold="auto"`` as a number."""
    from ..calibrate import calibrated_threshold, model_identity

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
    from .datasets import load_items

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
    decoding.AGDConfig(**probe).validate()
    return data, gen


def _settings(spec: EvalSpec, data, gen: dict, identity: dict) -> dict:
    return {"task": spec.task, "data": {"name": data.name, "sha256": data.sha256}, "method": spec.method,
            "generate": {k: v for k, v in gen.items() if k != "entropy_threshold_source"},
            "model": identity, "dtype": spec.dtype, "seed": spec.seed}


def _local_records(model, tok, spec: EvalSpec, todo: list[dict], gen: dict) -> Iterator[dict]:
    call = {k: v for k, v in gen.items() if k != "entropy_threshold_source"}
    for item in todo:
        yield evaluate_item(model, tok, spec.task, item, call, spec.seed)


def run_eval(spec: EvalSpec, out_dir: str | Path, model=None, tokenizer=None, ray: dict | None = None,
             progress: bool = True) -> dict:
    """Run ``spec`` into ``out_dir/<method>/``, resuming what is already there; return the summary.

    ``ray`` (``{"address": ..., "workers": ..., "cpus_per_worker": ...}``) shards the items over Ray
    actors instead of running them here; the files written are the same.
    """
    data, gen = prepare(spec)
    store = RunStore(Path(out_dir) / spec.method.replace("/", "_"))
    if ray is not None:
        from .ray_runner import RayPool

        pool = RayPool(spec, **ray)
        identity, gen = pool.resolve(gen)
    else:
        if model is None:
            from ..models import load_model

            model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
        identity, gen = resolve_for_model(model, gen, spec.calibration)
    from .. import __version__

    info = {"data": data.describe(), "spec": dataclasses.asdict(spec), "agdecode": __version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "ray": ray}
    done = store.open(_settings(spec, data, gen, identity), info)
    todo = [it for it in data.items if it["id"] not in done]
    records: Iterable[dict] = (pool.records(todo, gen) if ray is not None
                               else _local_records(model, tokenizer, spec, todo, gen))
    bar = None
    if progress:
        from tqdm import tqdm

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
        if ray is not None:
            pool.close()
        summary = summarize(store.records(), spec.task, store.timings())
        summary.update(complete=complete, method=spec.method, data=data.name)
        (store.path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
