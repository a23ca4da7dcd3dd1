"""Shared fixtures: tiny random models of every supported architecture, and the real default model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run fastest on one thread (measured: the suite takes half the time); it also keeps
# the suite from fighting other processes on a small machine.
torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / "data" / "attnlrp-golden"
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32) and its tokenizer."""
    import agdecode

    return agdecode.load_model("smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    """A real chat tokenizer (SmolLM2's) for the tiny models."""
    return smollm2[1]


def tiny_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16, **common)
    raise KeyError(arch)


def make_tiny(arch: str, vocab_size: int, seed: int = 0, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), attn_implementation=attn)
    # Non-trivial norm weights, so every rule matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tokenizer):
    """(arch, tiny random model with the SmolLM2 vocabulary, tokenizer) for each architecture."""
    return request.param, make_tiny(request.param, len(tokenizer)), tokenizer


@pytest.fixture
def messages():
    return [{"role": "system", "content": "Always answer in French."},
            {"role": "user", "content": "Tell me about cats."}]
