"""Runs of ``agd eval`` on a tiny random model: records, resumption after a kill, settings, errors."""
from __future__ import annotations

import json

import pytest
import torch

import agdecode.decoding
from agdecode.eval.records import RunMismatchError
from agdecode.eval.runner import EvalSpec, run_eval
from conftest import make_tiny

QA = [{"id": f"q{i}", "question": q, "answers": a} for i, (q, a) in enumerate([
    ("capital of france", ["Paris"]), ("who wrote hamlet", ["Shakespeare"]), ("largest planet", ["Jupiter"]),
    ("boiling point of water in celsius", ["100"]), ("author of emma", ["Jane Austen"])])]


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


@pytest.fixture
def qa_file(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(it) + "\n" for it in QA))
    return f


def _spec(data, method="greedy", **kw):
    return EvalSpec(task="qa", data=str(data), method=method, max_new_tokens=3, **kw)


def _records(d):
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]


def _deterministic(summary):
    return {k: summary[k] for k in ("n", "n_errors", "metrics", "quality", "trace")}


def test_run_records_every_item_with_scores_quality_trace_and_timing(tiny_llama, qa_file, tmp_path):
    model, tok = tiny_llama
    s = run_eval(_spec(qa_file, "agd", roi="user"), tmp_path / "out", model, tok, progress=False)
    recs = _records(tmp_path / "out" / "agd")
    assert [r["id"] for r in recs] == [it["id"] for it in QA] and s["n"] == 5 and s["complete"]
    r = recs[0]
    assert set(r["scores"]) == {"recall", "recall_word"} and r["quality"]["tokens"] == r["trace"]["steps"]
    assert r["quality"]["logprob"] < 0 and "timing" not in r and r["config"]["roi"] == ["user"]
    timing = json.loads((tmp_path / "out" / "agd" / "timings.jsonl").read_text().splitlines()[0])
    assert timing["id"] == r["id"] and timing["generate_s"] > 0
    assert r["trace"]["steps"] == 3 and sum(r["trace"]["reasons"].values()) == 3
    run = json.loads((tmp_path / "out" / "agd" / "run.json").read_text())
    assert run["settings"]["generate"] == {"method": "agd", "max_new_tokens": 3, "attribution": "lrp", "roi": "user"}
    assert run["settings"]["model"]["model_type"] == "llama" and run["info"]["data"]["n_items"] == 5
    assert run["settings"]["dtype"] == "float32"  # as the model runs, not the spec's "auto"
    prov = run["info"]["provenance"]  # the code and packages behind the figures
    assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool) and prov["torch"]


def test_a_run_is_not_resumed_in_another_dtype(tiny_llama, qa_file, tmp_path):
    model, tok = tiny_llama
    run_eval(_spec(qa_file, limit=2), tmp_path / "out", model, tok, progress=False)
    with pytest.raises(RunMismatchError, match="differences: dtype"):
        run_eval(_spec(qa_file, limit=3), tmp_path / "out", model.to(torch.bfloat16), tok, progress=False)
    model.to(torch.float32)
    assert len(_records(tmp_path / "out" / "greedy")) == 2


def test_killed_and_resumed_run_equals_an_unbroken_one(tiny_llama, qa_file, tmp_path, monkeypatch):
    model, tok = tiny_llama
    unbroken = run_eval(_spec(qa_file), tmp_path / "a", model, tok, progress=False)

    real, calls = agdecode.decoding.generate, []

    def dies_on_second_chunk(*a, **kw):  # Ctrl-C while the second chunk of items is being generated
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(agdecode.decoding, "generate", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):  # batch 1: chunks of 4 items
        run_eval(_spec(qa_file, batch_size=1), tmp_path / "b", model, tok, progress=False)
    monkeypatch.setattr(agdecode.decoding, "generate", real)
    assert len(_records(tmp_path / "b" / "greedy")) == 4
    assert json.loads((tmp_path / "b" / "greedy" / "summary.json").read_text())["complete"] is False
    # A kill in the middle of writing the next record leaves a torn line: it is dropped on resume.
    with open(tmp_path / "b" / "greedy" / "records.jsonl", "a") as f:
        f.write('{"id": "q4", "response": "half a rec')
    resumed = run_eval(_spec(qa_file), tmp_path / "b", model, tok, progress=False)
    ids = [r["id"] for r in _records(tmp_path / "b" / "greedy")]
    assert sorted(ids) == sorted(it["id"] for it in QA) and len(ids) == len(set(ids))
    assert _deterministic(resumed) == _deterministic(unbroken)
    # Resuming a finished run does nothing.
    again = run_eval(_spec(qa_file), tmp_path / "b", model, tok, progress=False)
    assert _deterministic(again) == _deterministic(unbroken)
    assert len(_records(tmp_path / "b" / "greedy")) == 5


def test_batched_run_equals_one_item_at_a_time(tiny_llama, qa_file, tmp_path):
    model, tok = tiny_llama
    one = run_eval(_spec(qa_file, "agd", roi="user", batch_size=1), tmp_path / "a", model, tok, progress=False)
    three = run_eval(_spec(qa_file, "agd", roi="user", batch_size=3), tmp_path / "b", model, tok, progress=False)
    assert _deterministic(one) == _deterministic(three)
    a, b = _records(tmp_path / "a" / "agd"), _records(tmp_path / "b" / "agd")
    assert [r["response"] for r in a] == [r["response"] for r in b]


def test_limit_extends_a_run_and_other_settings_are_refused(tiny_llama, qa_file, tmp_path):
    model, tok = tiny_llama
    run_eval(_spec(qa_file, limit=2), tmp_path, model, tok, progress=False)
    assert run_eval(_spec(qa_file, limit=4), tmp_path, model, tok, progress=False)["n"] == 4
    with pytest.raises(RunMismatchError, match="other settings .*seed"):
        run_eval(_spec(qa_file, seed=1), tmp_path, model, tok, progress=False)


def test_too_long_prompts_become_error_records_not_zeros(tiny_llama, tmp_path):
    model, tok = tiny_llama  # context 512 tokens
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps(QA[0]) + "\n" + json.dumps({**QA[1], "question": "why " * 600}) + "\n")
    s = run_eval(_spec(f), tmp_path / "out", model, tok, progress=False)
    assert s["n"] == 1 and s["n_errors"] == 1
    err = [r for r in _records(tmp_path / "out" / "greedy") if r.get("error")]
    assert err[0]["id"] == "q1" and "context" in err[0]["error"]


def test_open_book_items_pass_documents_and_rules_are_scored(tiny_llama, tmp_path):
    model, tok = tiny_llama
    f = tmp_path / "ob.jsonl"
    f.write_text(json.dumps({**QA[0], "documents": [{"title": "France", "text": "Paris is the capital."}]}) + "\n")
    run_eval(_spec(f, limit=1), tmp_path / "out", model, tok, progress=False)
    f.write_text(json.dumps(QA[0]) + "\n")
    run_eval(_spec(f), tmp_path / "closed", model, tok, progress=False)
    (open_book,), (closed,) = _records(tmp_path / "out" / "greedy"), _records(tmp_path / "closed" / "greedy")
    assert open_book["trace"]["prompt_tokens"] >= closed["trace"]["prompt_tokens"] + 8  # the document is in the prompt
    s = run_eval(EvalSpec(task="rules", data="rules", method="greedy", max_new_tokens=2, limit=2),
                 tmp_path / "rules", model, tok, progress=False)
    assert s["n"] == 2 and set(s["metrics"]) == {"prompt_strict", "prompt_loose", "inst_strict", "inst_loose"}


def test_cli_runs_reports_and_checks_calibration_first(tiny_llama, qa_file, tmp_path, monkeypatch, capsys):
    from agdecode.cli import main

    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_llama
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    base = ["eval", "qa", "--data", str(qa_file), "--model", str(d), "--max-new-tokens", "2", "--no-progress",
            "--threads", "1", "--out", str(tmp_path / "runs")]
    assert main(base + ["--method", "greedy,agd-gated-auto"]) == 2
    assert "agd calibrate --model" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(base + ["--method", "greedy", "--method", "agd@user", "--limit", "3", "--set", "k=2"]) == 0
    out = capsys.readouterr().out
    assert "greedy: n=3" in out and "agd@user: n=3" in out
    assert json.loads((tmp_path / "runs" / "agd@user" / "run.json").read_text())["settings"]["generate"]["k"] == 2
    assert main(["eval", "report", str(tmp_path / "runs")]) == 0
    assert "| agd@user | 3 |" in capsys.readouterr().out and (tmp_path / "runs" / "report.md").is_file()


def test_resumed_run_with_a_smaller_limit_or_foreign_records_counts_only_the_asked_items(tiny_llama, qa_file,
                                                                                         tmp_path, capsys):
    model, tok = tiny_llama
    assert run_eval(_spec(qa_file, limit=4), tmp_path, model, tok, progress=False)["n"] == 4
    assert run_eval(_spec(qa_file, limit=2), tmp_path, model, tok, progress=False)["n"] == 2
    foreign = {**_records(tmp_path / "greedy")[0], "id": "not-in-the-data"}
    with open(tmp_path / "greedy" / "records.jsonl", "a") as f:
        f.write(json.dumps(foreign) + "\n")
    s = run_eval(_spec(qa_file), tmp_path, model, tok, progress=False)
    assert s["n"] == 5 and s["n_errors"] == 0
    assert "1 record(s) of items not asked" in capsys.readouterr().err


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_a_limit_that_is_not_a_positive_count_is_refused(qa_file, limit):
    from agdecode import AgdError

    with pytest.raises(AgdError, match="must be a positive number of items"):
        run_eval(_spec(qa_file, limit=limit), "/nonexistent/never-written", progress=False)


def test_scorer_errors_are_reported_on_the_console(tiny_llama, tmp_path, monkeypatch, capsys):
    from agdecode.cli import main
    from agdecode.eval import scoring

    model, tok = tiny_llama
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)

    def broken(instruction_id, kwargs, prompt, response):  # a checker bug, as an unknown kwarg would cause
        raise TypeError("build_description() got an unexpected keyword argument 'nope'")

    monkeypatch.setattr(scoring, "_check", broken)
    assert main(["eval", "rules", "--method", "greedy", "--model", str(d), "--max-new-tokens", "2", "--limit", "2",
                 "--no-progress", "--out", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "warning: greedy: the rule checker raised on 2 item(s)" in err


def test_failed_items_run_again_on_resume_and_run_json_says_how_it_was_resumed(tiny_llama, qa_file, tmp_path,
                                                                               monkeypatch):
    from agdecode import decoding

    model, tok = tiny_llama
    real = decoding.generate

    def flaky(model, tokenizer, conversations, **kw):  # fails on q2 (a missing head file, say), the rest run
        convs = conversations if isinstance(conversations[0], list) else [conversations]
        if any("largest planet" in m["content"] for c in convs for m in c):
            raise ValueError("head file not found")
        return real(model, tokenizer, conversations, **kw)

    monkeypatch.setattr(decoding, "generate", flaky)
    s = run_eval(_spec(qa_file, limit=4), tmp_path / "out", model, tok, progress=False)
    assert (s["n"], s["n_errors"]) == (3, 1)
    monkeypatch.setattr(decoding, "generate", real)  # fixed: the failed item runs again, the others do not
    s = run_eval(_spec(qa_file), tmp_path / "out", model, tok, progress=False)
    assert (s["n"], s["n_errors"]) == (5, 0)
    recs = _records(tmp_path / "out" / "greedy")
    assert [r["id"] for r in recs].count("q2") == 2 and len(recs) == 6
    info = json.loads((tmp_path / "out" / "greedy" / "run.json").read_text())["info"]
    assert info["spec"]["limit"] is None and info["history"][0]["spec"]["limit"] == 4
