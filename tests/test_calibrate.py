"""Entropy-gate calibration (``agd calibrate``, ``entropy_threshold="auto"``) on tiny random models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import agdecode
from agdecode.calibrate import (CalibrationError, calibrate, calibrated_threshold, calibration_path, load_calibration,
                                model_identity, save_calibration)
from agdecode.cli import main
from conftest import make_tiny

CONVS = [[{"role": "system", "content": s}, {"role": "user", "content": u}]
         for s, u in [("Be brief.", "Tell me about cats."), ("Answer in French.", "What is rain?"),
                      ("Use no commas.", "Describe a forest.")]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def two_models(tokenizer):
    return make_tiny("llama", len(tokenizer), seed=0), make_tiny("llama", len(tokenizer), seed=1), tokenizer


def test_calibration_is_deterministic_and_is_numpys_percentile(two_models, cache):
    model, _, tok = two_models
    rec, h = calibrate(model, tok, CONVS, percentile=80, max_new_tokens=6)
    again, h2 = calibrate(model, tok, CONVS, percentile=80, max_new_tokens=6)
    assert np.array_equal(h, h2) and {k: v for k, v in rec.items() if k != "seconds"} == \
        {k: v for k, v in again.items() if k != "seconds"}
    # The recorded entropies are those of plain greedy runs, and the threshold is their 80th percentile.
    steps = [s.entropy for m in CONVS
             for s in agdecode.generate(model, tok, m, method="greedy", max_new_tokens=6).steps]
    # (batched decoding pads the prompts: entropies agree with one-at-a-time runs to float precision)
    assert np.allclose(h, steps, rtol=1e-5) and rec["threshold"] == pytest.approx(float(np.percentile(steps, 80)))
    assert rec["threshold"] == float(np.percentile(h, 80))
    assert rec["n_steps"] == len(steps) == sum(rec["histogram"]["counts"])
    assert rec["fraction_guided"]["calibrated"] == pytest.approx(np.mean(np.array(steps) >= rec["threshold"]))
    assert rec["model"] == model_identity(model) and rec["data"]["n_items"] == 3


def test_auto_without_calibration_names_the_command(two_models, cache):
    model, _, tok = two_models
    with pytest.raises(CalibrationError, match=r"No entropy calibration .*Run `agd calibrate --model"):
        agdecode.generate(model, tok, CONVS[0], entropy_threshold="auto", max_new_tokens=2)


def test_auto_uses_the_models_own_calibration(two_models, cache):
    model, _, tok = two_models
    rec, _ = calibrate(model, tok, CONVS[:1], max_new_tokens=4)
    path = save_calibration(rec)
    assert path == calibration_path(model) and path.parent == cache / "calibration"
    out = agdecode.generate(model, tok, CONVS[0], entropy_threshold="auto", max_new_tokens=3, min_prob=0.0)
    assert out.config["entropy_threshold"] == rec["threshold"] == calibrated_threshold(model)
    assert all((s.reason == "gate") == (s.entropy < rec["threshold"]) for s in out.steps)
    assert agdecode.generate(model, tok, CONVS[0], entropy_threshold=1.734, max_new_tokens=1).config[
        "entropy_threshold"] == 1.734  # a number still works


def test_a_calibration_for_another_model_is_refused(two_models, cache):
    a, b, tok = two_models
    assert model_identity(a)["fingerprint"] != model_identity(b)["fingerprint"]
    path = save_calibration(calibrate(a, tok, CONVS[:1], max_new_tokens=3)[0])
    calibration_path(b).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, calibration_path(b))  # planted where b's would be
    with pytest.raises(CalibrationError, match="made for another model"):
        calibrated_threshold(b)
    with pytest.raises(CalibrationError, match="made for another model"):
        load_calibration(b, path)
    with pytest.raises(CalibrationError, match="made for another model"):
        agdecode.generate(b, tok, CONVS[0], entropy_threshold="auto", max_new_tokens=1)


def test_identity_survives_bf16_and_moving_the_folder(two_models, tmp_path):
    model, _, tok = two_models
    model.save_pretrained(tmp_path / "m1")
    tok.save_pretrained(tmp_path / "m1")
    ident = model_identity(model)
    moved = model_identity(agdecode.load_model(str(tmp_path / "m1"), dtype="bfloat16")[0])
    assert moved["fingerprint"] == ident["fingerprint"] and moved["name_or_path"] != ident["name_or_path"]


def test_cli_calibrate_and_auto(two_models, tmp_path, cache, capsys):
    model, _, tok = two_models
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": q, "answers": ["x"]}) + "\n"
                            for i, q in enumerate(["what is rain", "who are you"])))
    png = tmp_path / "hist.png"
    assert main(["calibrate", "--model", str(d), "--data", str(data), "--max-new-tokens", "4", "--percentile", "50",
                 "--no-progress", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "50th percentile of 8 greedy-step entropies" in out and png.stat().st_size > 5000
    assert main(["generate", "Hi", "--system", "Be brief.", "--model", str(d), "--entropy-threshold", "auto",
                 "--max-new-tokens", "2"]) == 0
    assert main(["generate", "Hi", "--model", str(d), "--entropy-threshold", "high"]) == 2
