"""Head discovery: deterministic, valid output, usable as a head ROI."""
from __future__ import annotations

import json

from agdecode.cli import main
from agdecode.discovery import discover_heads, discovery_items, plot_heads
from agdecode.heads import head_mask


def test_discovery_items_are_counterfactual_and_from_the_reserved_split():
    items = discovery_items(20)
    assert all(it["id"] >= 2000 for it in items)  # evaluation uses lines < 2000
    for it in items:
        assert it["answer"] in it["text"] and it["cf_answer"] in it["cf_text"]
        assert it["cf_answer"].lower() != it["answer"].lower()


def test_discovery_is_deterministic_and_writes_a_valid_file(tiny, tmp_path):
    arch, model, tok = tiny
    a = discover_heads(model, tok, n_items=4, top=3)
    b = discover_heads(model, tok, n_items=4, top=3)
    assert a == b
    n_layers, n_heads = 2, 4
    assert len(a["scores"]["D"]) == n_layers and len(a["scores"]["D"][0]) == n_heads
    assert len(a["top"]["parametric"]) == 3 and len(a["top"]["in-context"]) == 3
    d = a["scores"]["D"]
    assert d[a["top"]["in-context"][0][0]][a["top"]["in-context"][0][1]] == max(max(r) for r in d)
    assert d[a["top"]["parametric"][0][0]][a["top"]["parametric"][0][1]] == min(min(r) for r in d)
    f = tmp_path / "heads.json"
    f.write_text(json.dumps(a))
    assert head_mask(str(f), model).sum() == 3
    assert plot_heads(a, tmp_path / "heads.png").stat().st_size > 1000


def test_cli_discover(tokenizer, tmp_path, capsys):
    from conftest import make_tiny

    d = tmp_path / "m"
    make_tiny("qwen3", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "h.json"
    assert main(["heads", "discover", "--model", str(d), "--n-items", "2", "--top", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["data"]["n_items"] == 2
    assert out.with_suffix(".png").is_file()
    assert "stability" in capsys.readouterr().out
