"""``agd bench`` end to end on a tiny random-init model (the GPU path uses the same code)."""
from __future__ import annotations

import json

from agdecode.cli import main


def test_bench_writes_json_and_markdown_with_ratios(tmp_path, capsys):
    rc = main(["bench", "--random-init", "tiny-llama", "--lengths", "40", "--new-tokens", "4",
               "--reverse-tokens", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "tiny-llama-cpu.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["model"] == "random-init:tiny-llama"
    got = {(r["mode"], r["length"]) for r in data["results"]}
    assert got == {(m, n) for m in ("greedy", "agd-reverse", "agd-forward", "agd_e-forward") for n in (40,)}
    for r in data["results"]:
        assert r["s_per_token"] > 0 and r["peak_mib"] > 0
        if r["mode"] in ("agd-forward", "agd-reverse"):
            assert r["guided_steps"] == r["new_tokens"]  # min_prob=0: every step attributed
    table = (tmp_path / "tiny-llama-cpu.md").read_text()
    assert "forward speed-up over reverse" in table and "| 40 | agd-forward |" in table
    assert "x greedy" in capsys.readouterr().out
