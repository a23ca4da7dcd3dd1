"""``agd eval report``: bootstrap CIs, paired comparisons against greedy, markdown and PNG (synthetic runs)."""
from __future__ import annotations

import numpy as np
import pytest

from agdecode.cli import main
from agdecode.eval.records import RunStore
from agdecode.eval.report import bootstrap_ci, build_report, paired_vs, sign_test


def _store(root, method, correct, task="rules", dtype="float32"):
    store = RunStore(root / method)
    model = {"model_type": "llama", "name_or_path": "/m/tiny", "fingerprint": "ab" * 32}
    settings = {"task": task, "data": {"name": "toy", "sha256": "x"}, "method": method,
                "generate": {"method": method.split("-")[0]}, "model": model, "dtype": dtype, "seed": 0}
    store.open(settings)
    for i, ok in enumerate(correct):
        scores = ({"prompt_strict": ok, "prompt_loose": ok, "inst_strict": [ok, True], "inst_loose": [ok, True]}
                  if task == "rules" else {"recall": ok, "recall_word": ok})
        store.append({"id": f"i{i}", "response": "r", "scores": scores,
                      "quality": {"logprob": -1.0, "repeat4": 0.0, "words": 10, "tokens": 12},
                      "trace": {"steps": 12, "guided": 3, "overrides": 1, "gated": 0}, "timing": {"generate_s": 0.5}})
    return store


def test_statistics():
    v, lo, hi = bootstrap_ci(np.array([1.0] * 30 + [0.0] * 70), np.ones(100))
    assert v == 0.3 and 0.2 < lo < 0.3 < hi < 0.4
    assert bootstrap_ci(np.array([3.0, 1.0]), np.array([4.0, 2.0]))[0] == pytest.approx(4 / 6)  # ratio of sums
    assert sign_test(9, 1) == pytest.approx(0.021484375) and sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0


def test_paired_comparison_uses_common_items(tmp_path):
    g = {"records": [{"id": f"i{i}", "scores": {"recall": i < 5}} for i in range(10)]}
    a = {"records": [{"id": f"i{i}", "scores": {"recall": i < 8}} for i in range(12)]}
    p = paired_vs(a, g, "recall")
    assert p["n"] == 10 and p["delta"] == pytest.approx(0.3) and (p["wins"], p["losses"]) == (3, 0)
    assert p["lo"] <= 0.3 <= p["hi"]


def test_report_tables_and_plots(tmp_path):
    _store(tmp_path / "runs", "greedy", [i % 2 == 0 for i in range(40)])
    _store(tmp_path / "runs", "agd", [i % 4 != 3 for i in range(40)])
    _store(tmp_path / "runs" / "qa", "greedy", [i < 10 for i in range(20)], task="qa")
    text = build_report([tmp_path / "runs"], tmp_path / "rep")
    assert "## rules / toy" in text and "## qa / toy" in text
    rules = text[text.index("## rules"):]
    assert "| greedy | 40 | 0.500 [" in rules and "(baseline)" in rules
    assert "| agd | 40 | 0.750 [" in rules and "+0.250 [" in rules and "10/0" in rules
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 2 and all((tmp_path / "rep" / p).stat().st_size > 5000 for p in pngs)
    assert (tmp_path / "rep" / "report.md").read_text() == text


def test_report_cli(tmp_path, capsys):
    _store(tmp_path, "greedy", [True, False])
    assert main(["eval", "report", str(tmp_path), "--no-plots"]) == 0
    assert "| greedy | 2 |" in capsys.readouterr().out
    assert main(["eval", "report", str(tmp_path / "missing")]) == 2


def test_runs_in_another_dtype_get_their_own_table(tmp_path):
    # bf16 and fp32 runs of the same method are never compared in one table (nor paired across dtypes).
    _store(tmp_path / "fp32", "greedy", [True, False] * 10)
    _store(tmp_path / "fp32", "agd", [True] * 20)
    _store(tmp_path / "bf16", "greedy", [False] * 20, dtype="bfloat16")
    _store(tmp_path / "bf16", "agd", [True] * 20, dtype="bfloat16")
    text = build_report([tmp_path], tmp_path / "rep", plots=False)
    assert text.count("| greedy | 20 |") == 2 and text.count("| agd | 20 |") == 2
    assert "bfloat16" in text and "+0.500 [" in text and "+1.000 [" in text


def test_planned_pairs_get_their_own_table_with_holm_over_the_primary_metric(tmp_path):
    from agdecode.eval.report import _pairs_table

    def run(method, hits):
        return {"settings": {"method": method}, "records": [
            {"id": f"i{k}", "scores": {"prompt_strict": h, "inst_strict": [h]}, "quality": {"logprob": -1.0 + h}}
            for k, h in enumerate(hits)]}

    runs = [run("agd", [True] * 8 + [False] * 2), run("agd-ixg", [False] * 10), run("agd-gated", [True] * 5 + [False] * 5)]
    table = _pairs_table("rules", runs)
    rows = [line for line in table.splitlines() if line.startswith("| agd")]
    assert [r.split(" | ")[0] for r in rows] == ["| agd - agd-ixg"] * 2 + ["| agd - agd-gated"] * 2
    ixg = rows[0].split(" | ")
    assert ixg[1] == "prompt_strict" and ixg[4] == "8/0" and ixg[5] == "0.008"  # sign test: 2 x 0.5**8
    assert ixg[6] == "0.016"  # Holm over the two prompt_strict tests
    assert rows[1].split(" | ")[6] == "-" and ixg[7].startswith("+0.80")
    assert _pairs_table("rules", runs[:1]) is None
