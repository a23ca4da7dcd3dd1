"""The ``agd`` command line on a tiny model folder."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agdecode.cli import main


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_generate_compare_writes_both_traces(model_dir, tmp_path, capsys):
    out = tmp_path / "trace.json"
    rc = main(["generate", "Hello", "--system", "Be brief.", "--model", str(model_dir), "--compare", "--min-prob", "0", "--k", "3",
               "--max-new-tokens", "4", "--json", str(out)])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "greedy" in shown and "AGD (lrp, ROI system, k=3" in shown
    data = json.loads(out.read_text())
    assert set(data) == {"greedy", "agd"}
    assert len(data["agd"]["steps"]) == 4 and data["agd"]["config"]["k"] == 3
    marked = sum(s["overridden"] for s in data["agd"]["steps"])
    assert shown.count("[") >= marked  # every overridden token is bracketed
    for trace in data.values():  # the code, packages and machine behind each trace
        prov = trace["extra"]["provenance"]
        assert {"git", "torch", "transformers", "cpu", "threads"} <= set(prov) and "commit" in prov["git"]
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0  # still a trace the report reads


def test_help_explains_every_knob():
    res = subprocess.run([sys.executable, "-m", "agdecode", "generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ["--system", "--model", "--k", "--min-prob", "--entropy-threshold", "--attribution",
                 "--max-new-tokens", "--compare", "--json", "--roi", "--engine"]:
        assert flag in res.stdout
