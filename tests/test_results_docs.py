"""docs/results.md's tables are regenerated from the committed records (docs/results/), and the
machinery behind that: Holm-adjusted p-values, deterministic archives, marked tables in a document."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from agdecode.cli import main
from agdecode.eval.records import RunStore
from agdecode.eval.report import (ReportError, archive_runs, holm, load_runs, marked_blocks, markdown_tables,
                                  sign_test, update_doc)

ROOT = Path(__file__).resolve().parent.parent
DOC, RESULTS = ROOT / "docs" / "results.md", ROOT / "docs" / "results"


def test_committed_tables_equal_the_ones_regenerated_from_the_committed_records():
    blocks = marked_blocks(DOC.read_text())
    assert {"rules-rules", "rules-rules-bfloat16", "rules-rules-bfloat16-pairs", "qa-triviaqa-bfloat16", "qa-nq-bfloat16",
            "qa-nq-open-book-bfloat16", "qa-nq-multi-doc-bfloat16", "qa-nq-multi-doc-bfloat16-pairs"} <= set(blocks)
    tables = markdown_tables([RESULTS])
    for name, table in blocks.items():
        assert table == tables[name], f"docs/results.md table {name} is stale: run `agd eval report --update-doc`"
    assert update_doc(DOC, [RESULTS], check=True) == []


def test_committed_records_are_complete_archives():
    runs = load_runs([RESULTS])
    assert runs and all(not Path(r["dir"], "records.jsonl").exists() for r in runs)
    for run in runs:
        folder = Path(run["dir"])
        assert (folder / "records.jsonl.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0: no churn
        assert len(run["records"]) + run["errors"] > 0 and set(run["timings"]) >= {r["id"] for r in run["records"]}


def test_every_committed_run_json_states_the_items_its_records_hold():
    # run.json is rewritten on resume; runs resumed before that carry the correction and the old file.
    import json

    folders = {p.parent for p in ROOT.glob("docs/**/records.jsonl.gz")}
    assert len(folders) > 30
    for folder in folders:
        info = json.loads((folder / "run.json").read_text())["info"]
        with gzip.open(folder / "records.jsonl.gz", "rt") as f:
            n = sum(1 for line in f if line.strip())
        assert info["data"]["n_items"] >= n and info["spec"]["limit"] in (None, info["data"]["n_items"]), folder


def test_holm_matches_the_step_down_definition():
    assert holm([]) == []
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # Step-down stops being monotone-free: a later smaller raw product is lifted to the running max.
    assert holm([0.001, 0.013, 0.014, 0.9]) == pytest.approx([0.004, 0.039, 0.039, 0.9])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def _store(root, method, correct):
    store = RunStore(root / method)
    model = {"model_type": "llama", "name_or_path": "/m/tiny", "fingerprint": "ab" * 32}
    store.open({"task": "qa", "data": {"name": "toy", "sha256": "x"}, "method": method,
                "generate": {"method": method}, "model": model, "dtype": "float32", "seed": 0})
    for i in reversed(range(len(correct))):  # completion order differs from id order (Ray, resume)
        store.append({"id": f"i{i:02d}", "response": "r", "scores": {"recall": correct[i], "recall_word": correct[i]},
                      "quality": {"logprob": -1.0, "repeat4": 0.0, "words": 10, "tokens": 12},
                      "trace": {"steps": 12, "guided": 3, "overrides": 1, "gated": 0}, "timing": {"generate_s": 0.5}})


def _runs(tmp_path):
    _store(tmp_path / "runs", "greedy", [i % 2 == 0 for i in range(30)])
    _store(tmp_path / "runs", "agd", [i % 3 != 2 for i in range(30)])
    _store(tmp_path / "runs", "cad", [i % 2 == 0 or i == 1 for i in range(30)])
    return tmp_path / "runs"


def test_archives_are_deterministic_and_read_like_run_directories(tmp_path):
    runs = _runs(tmp_path)
    a = archive_runs([runs], tmp_path / "a")
    b = archive_runs([runs], tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert {p.name for p in a} == {"greedy", "agd", "cad"} and a[0].parent.name == "qa-toy"
    for pa, pb in zip(a, b):
        for name in ("records.jsonl.gz", "timings.jsonl.gz", "run.json"):
            assert (pa / name).read_bytes() == (pb / name).read_bytes()
    ids = [line[8:13] for line in gzip.decompress((a[0] / "records.jsonl.gz").read_bytes()).splitlines()]
    assert ids == sorted(ids)  # sorted by id, whatever the completion order
    assert markdown_tables([tmp_path / "a"]) == markdown_tables([runs])


def test_tables_carry_raw_and_holm_adjusted_p(tmp_path):
    table = markdown_tables([_runs(tmp_path)])["qa-toy"]
    head, _, greedy, agd, cad = table.splitlines()[:5]
    assert "| p | p (Holm) |" in head and greedy.startswith("| greedy | 30 |")
    # agd wins the odd items outside i % 3 == 2 (10) and loses the even ones inside it (5); cad wins item 1.
    cells = {row.split(" | ")[0][2:]: row.split(" | ") for row in (agd, cad)}
    assert cells["agd"][5] == "10/5" and cells["cad"][5] == "1/0"
    p_raw = {m: float(c[6]) for m, c in cells.items()}
    assert p_raw == pytest.approx({"agd": sign_test(10, 5), "cad": 1.0}, abs=1e-3)
    p_adj = {m: float(c[7]) for m, c in cells.items()}
    assert p_adj == pytest.approx({"agd": min(1.0, 2 * sign_test(10, 5)), "cad": 1.0}, abs=1e-3)


def test_update_doc_rewrites_only_the_marked_tables(tmp_path, capsys):
    runs = _runs(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nbefore\n<!-- table:qa-toy -->\n| old |\n<!-- /table:qa-toy -->\nafter\n")
    assert main(["eval", "report", "--check-doc", str(doc), str(runs)]) == 1
    assert main(["eval", "report", "--update-doc", str(doc), str(runs)]) == 0
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- table:qa-toy -->\n| method | n |") and text.endswith(
        "<!-- /table:qa-toy -->\nafter\n")
    assert marked_blocks(text)["qa-toy"] == markdown_tables([runs])["qa-toy"]
    assert main(["eval", "report", "--check-doc", str(doc), str(runs)]) == 0
    assert update_doc(doc, [runs]) == [] and doc.read_text() == text
    capsys.readouterr()
    assert main(["eval", "report", "--markdown-tables", str(runs)]) == 0
    assert capsys.readouterr().out.startswith("<!-- table:qa-toy -->\n| method |")


def test_update_doc_refuses_a_table_no_record_backs(tmp_path):
    runs = _runs(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table:rules-gone -->\n| old |\n<!-- /table:rules-gone -->\n")
    with pytest.raises(ReportError, match="rules-gone"):
        update_doc(doc, [runs])
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ReportError, match="no table markers"):
        update_doc(tmp_path / "plain.md", [runs])
    assert main(["eval", "report", "--update-doc", str(doc), str(runs)]) == 2


def test_archive_cli(tmp_path, capsys):
    runs = _runs(tmp_path)
    assert main(["eval", "archive", str(runs), "--to", str(tmp_path / "arch")]) == 0
    assert (tmp_path / "arch" / "qa-toy" / "agd" / "records.jsonl.gz").is_file()


def test_the_variant_dev_tuning_table_is_what_its_committed_records_give():
    import importlib.util

    spec = importlib.util.spec_from_file_location("variant_dev", ROOT / "scripts" / "variant_dev.py")
    variant_dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variant_dev)
    doc = (ROOT / "docs" / "variant" / "dev-tuning.md").read_text()
    assert variant_dev.table(ROOT / "docs" / "variant") in doc


def test_the_bf16_against_fp32_tables_are_what_the_precision_records_give(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cmp"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_precision.py"), "docs/precision/rules-float32",
                    "docs/precision/rules-bfloat16", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    doc = DOC.read_text()
    assert len(rows) > 10 and all(row in doc for row in rows)
