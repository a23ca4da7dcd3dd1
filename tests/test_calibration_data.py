"""The default calibration set is disjoint from the evaluated items, and the built-in model's shipped
calibration makes ``entropy_threshold="auto"`` work without calibrating first."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agdecode.calibrate import DEFAULT_DATA, CalibrationError, load_calibration, shipped_calibration_path
from agdecode.eval.datasets import load_items
from conftest import make_tiny

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "agdecode" / "data" / "calibration"


def _user(item):
    return " ".join(m["content"] for m in item["messages"] if m["role"] == "user").strip().lower()


def test_calibration_set_shares_no_item_or_prompt_with_the_evaluated_rules():
    calib = load_items(DEFAULT_DATA, "rules").items
    assert DEFAULT_DATA == "rules-calibration" and 100 <= len(calib) <= 200
    assert all(any(m["role"] == "system" and m["content"] for m in it["messages"]) for it in calib)
    for name in ("rules", "rules-reference"):
        ev = load_items(name, "rules").items
        assert not {it["id"] for it in calib} & {it["id"] for it in ev}
        ev_tasks = {it["task"].strip().lower() for it in ev}
        # No evaluated task is (part of) a calibration prompt, and no prompt text is shared.
        assert not any(t in _user(c) for t in ev_tasks for c in calib)
        assert not {_user(c) for c in calib} & {_user(e) for e in ev}
        assert not {json.dumps(c["messages"]) for c in calib} & {json.dumps(e["messages"]) for e in ev}


def test_the_calibrate_command_defaults_to_the_disjoint_set():
    import argparse

    from agdecode.eval.cli import register_calibrate

    parser = argparse.ArgumentParser()
    register_calibrate(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["calibrate"]).data == DEFAULT_DATA


def test_shipped_calibrations_were_made_on_the_disjoint_set():
    files = sorted(SHIPPED.glob("*.json"))
    assert files
    for f in files:
        rec = json.loads(f.read_text())
        assert rec["data"]["name"] == DEFAULT_DATA and rec["n_steps"] > 1000
        assert f.name == f"{rec['model']['model_type']}-{rec['model']['fingerprint'][:16]}.json"


def test_no_shipped_calibration_for_another_model(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path))
    model = make_tiny("llama", len(tokenizer))
    assert not shipped_calibration_path(model).exists()
    with pytest.raises(CalibrationError, match="No entropy calibration"):
        load_calibration(model)


@pytest.mark.slow
def test_auto_resolves_on_the_built_in_model_with_an_empty_cache(smollm2, tmp_path, monkeypatch):
    import agdecode

    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "empty"))
    model, tok = smollm2
    rec = load_calibration(model)
    assert shipped_calibration_path(model).is_file() and rec["data"]["name"] == DEFAULT_DATA
    out = agdecode.generate(model, tok, [{"role": "system", "content": "Answer in French."},
                                         {"role": "user", "content": "Hi."}],
                            method="agd", entropy_threshold="auto", max_new_tokens=2)
    assert out.config["entropy_threshold"] == rec["threshold"]
    # The user's own calibration, once made, wins over the shipped one.
    own = dict(rec, threshold=rec["threshold"] + 0.5)
    from agdecode.calibrate import calibration_path, save_calibration

    save_calibration(own)
    assert calibration_path(model).is_file() and load_calibration(model)["threshold"] == own["threshold"]
