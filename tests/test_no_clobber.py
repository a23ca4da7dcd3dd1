"""Nothing the user has is lost: outputs are created or appended to, never rewritten, unless they are the
project's own (a trace, a report, a steering vector, or a resumable output of the same input and settings)."""
from __future__ import annotations

import json

import pytest

from agdecode.cli import main

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture
def inputs(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"id": f"c{i}", "messages": CONV}) + "\n" for i in range(3)))
    return f


def _gen(model_dir, inputs, out, *extra):
    return ["generate", "--model", str(model_dir), "--dtype", "float32", "--input", str(inputs), "--output", str(out),
            "--max-new-tokens", "2", "--k", "3", "--min-prob", "0", *extra]


def _refused(capsys, argv, match: str, *kept) -> None:
    """Exit 2, one stderr line matching ``match``, and every path in ``kept`` byte-identical."""
    before = {p: p.read_bytes() for p in kept}
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("agd: error:") and match in err[0], err
    assert {p: p.read_bytes() for p in kept} == before


def test_an_output_file_that_is_not_ours_is_never_rewritten(model_dir, inputs, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nmore notes\n")
    _refused(capsys, _gen(model_dir, inputs, notes), "was not written by `agd generate --input`", notes)


def test_resume_refuses_another_input_or_other_settings_and_keeps_the_file(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(_gen(model_dir, inputs, out)) == 0
    sidecar = tmp_path / "out.jsonl.agd.json"
    assert len(out.read_text().splitlines()) == 3 and sidecar.is_file()
    assert main(_gen(model_dir, inputs, out)) == 0  # the same run again: nothing to do, nothing changed
    assert len(out.read_text().splitlines()) == 3
    _refused(capsys, _gen(model_dir, inputs, out, "--k", "4"), "with other settings (k)", out, sidecar)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "c0", "messages": CONV[1:]}) + "\n")
    _refused(capsys, _gen(model_dir, other, out), "from other input conversations", out, sidecar)


def test_a_foreign_line_inside_an_output_is_refused_and_a_torn_last_line_is_redone(model_dir, inputs, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out.jsonl"
    assert main(_gen(model_dir, inputs, out)) == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\nmy own remark\n" + lines[1] + "\n")
    _refused(capsys, _gen(model_dir, inputs, out), "line 2: not a result of this input", out)
    out.write_text(lines[0] + "\n" + lines[1][:20])  # an interrupted run
    assert main(_gen(model_dir, inputs, out)) == 0
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["c0", "c1", "c2"]
    assert "incomplete last line" in capsys.readouterr().err


@pytest.mark.parametrize("cid", [None, {"a": 1}, True, ""], ids=["null", "object", "bool", "empty"])
def test_input_ids_must_be_strings_or_integers(model_dir, tmp_path, capsys, cid):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"id": cid, "messages": CONV}) + "\n")
    _refused(capsys, _gen(model_dir, f, tmp_path / "o.jsonl"), "'id' must be a non-empty string or an integer", f)


def test_json_trace_never_overwrites_a_foreign_file_or_an_empty_name(model_dir, tmp_path, capsys):
    base = ["generate", "Hi", "--system", "Be brief.", "--model", str(model_dir), "--max-new-tokens", "2"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    _refused(capsys, base + ["--json", str(notes)], "exists and was not written by agd", notes)
    _refused(capsys, base + ["--json", ""], "--json needs a file name")
    trace = tmp_path / "t.json"
    assert main(base + ["--json", str(trace)]) == 0
    assert main(base + ["--json", str(trace)]) == 0  # our own trace: re-running rewrites it


def test_report_never_overwrites_its_input_or_a_foreign_page(model_dir, tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["generate", "Hi", "--system", "Be brief.", "--model", str(model_dir), "--max-new-tokens", "2",
                 "--json", str(trace)]) == 0
    _refused(capsys, ["report", str(trace), "-o", str(trace)], "is also the input", trace)
    as_html = tmp_path / "t2.html"
    as_html.write_bytes(trace.read_bytes())
    _refused(capsys, ["report", str(as_html)], "is also the input", as_html)
    page = tmp_path / "page.html"
    page.write_text("<html>my page</html>")
    _refused(capsys, ["report", str(trace), "-o", str(page)], "was not written by agd", page)
    ours = tmp_path / "ours.html"
    assert main(["report", str(trace), "-o", str(ours)]) == 0
    assert main(["report", str(trace), "-o", str(ours)]) == 0  # our own report: rewritten


def test_steer_fit_never_overwrites_a_foreign_json_beside_the_vector(model_dir, tmp_path, capsys):
    meta = tmp_path / "v.json"
    meta.write_text('{"my": "settings"}')
    _refused(capsys, ["steer", "fit", "--model", str(model_dir), "--instruction", "Be brief.", "--prompt", "Hi",
                      "--out", str(tmp_path / "v.safetensors")], "exists and was not written by agd", meta)
