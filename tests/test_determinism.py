"""Two identical eval runs write byte-identical records; the timings, which differ, live beside them."""
from __future__ import annotations

import json

import pytest

from agdecode.eval.runner import EvalSpec, run_eval
from conftest import make_tiny

QA = [{"id": f"q{i}", "question": q, "answers": a} for i, (q, a) in enumerate([
    ("capital of france", ["Paris"]), ("who wrote hamlet", ["Shakespeare"]), ("largest planet", ["Jupiter"])])]


@pytest.fixture
def qa_file(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(it) + "\n" for it in QA))
    return f


def _run_twice(tmp_path, spec, model, tok):
    for out in ("a", "b"):
        run_eval(spec, tmp_path / out, model, tok, progress=False)
    d = spec.method
    return [(tmp_path / out / d / "records.jsonl").read_bytes() for out in "ab"], tmp_path / "a" / d


@pytest.mark.parametrize("method", ["greedy", "agd"])
def test_identical_runs_write_identical_records(tokenizer, qa_file, tmp_path, method):
    model = make_tiny("llama", len(tokenizer))
    spec = EvalSpec(task="qa", data=str(qa_file), method=method, max_new_tokens=8, roi="user")
    (a, b), run = _run_twice(tmp_path, spec, model, tokenizer)
    assert a == b and a.count(b"\n") == 3
    recs = [json.loads(line) for line in a.splitlines()]
    assert all("timing" not in r for r in recs)
    # The timings are kept, one line per item, beside the records.
    timings = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
    assert [t["id"] for t in timings] == ["q0", "q1", "q2"] and all(t["generate_s"] > 0 for t in timings)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["timing"]["n_timed"] == 3 and summary["timing"]["generate_s_total"] > 0


def _floats_close(a, b, rel=1e-5) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_floats_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_floats_close(x, y, rel) for x, y in zip(a, b))
    return a == b


def test_resume_keeps_one_record_and_one_timing_per_item(tokenizer, qa_file, tmp_path):
    model = make_tiny("llama", len(tokenizer))
    spec = EvalSpec(task="qa", data=str(qa_file), method="greedy", max_new_tokens=4, limit=2)
    run_eval(spec, tmp_path / "out", model, tokenizer, progress=False)
    run_eval(EvalSpec(task="qa", data=str(qa_file), method="greedy", max_new_tokens=4, limit=3),
             tmp_path / "out", model, tokenizer, progress=False)
    run_eval(EvalSpec(task="qa", data=str(qa_file), method="greedy", max_new_tokens=4),
             tmp_path / "ref", model, tokenizer, progress=False)
    d = tmp_path / "out" / "greedy"
    # Batches of other sizes pad the prompts differently: the same tokens and texts, floats equal to
    # float precision (identical runs, with identical batches, are byte-identical: the test above).
    got = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "greedy" / "records.jsonl").read_text().splitlines()]
    assert _floats_close(got, ref)
    assert [json.loads(x)["id"] for x in (d / "timings.jsonl").read_text().splitlines()] == ["q0", "q1", "q2"]


@pytest.mark.slow
def test_identical_runs_on_the_default_model(smollm2, tmp_path):
    model, tok = smollm2
    spec = EvalSpec(task="rules", data="rules", method="agd", max_new_tokens=8, limit=3)
    (a, b), _ = _run_twice(tmp_path, spec, model, tok)
    assert a == b and a.count(b"\n") == 3
