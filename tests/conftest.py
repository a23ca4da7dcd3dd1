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
# Architectures with reference AttnLRP relevances from upstream LXT (tests/data/attnlrp-golden/).
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "gpt2"]
# Every supported architecture: the tiny-model fixture runs each test on all of them.
TINY_ARCHS = ARCHS + ["mistral", "phi3", "olmo2", "granite", "smollm3"]


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32) and its tokenizer."""
    import agdecode

    return agdecode.load_model("smollm2", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    """A real chat tokenizer (SmolLM2's) for the tiny models."""
    return smollm2[1]


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import (Gemma3TextConfig, GPT2Config, GraniteConfig, LlamaConfig, MistralConfig, Olmo2Config,
                              Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16, **common)
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "phi3":
        return Phi3Config(pad_token_id=0, **common)
    if arch == "olmo2":
        return Olmo2Config(pad_token_id=0, eos_token_id=None, **common)
    if arch == "granite":  # multipliers away from 1, so each one matters
        return GraniteConfig(**{**dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                       logits_scaling=4.0), **common})
    if arch == "smollm3":  # layer 1 without rotary embeddings
        return SmolLM3Config(pad_token_id=0, bos_token_id=None, eos_token_id=None, **{"no_rope_layers": [1, 0], **common})
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                          initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                          **overrides)
    raise KeyError(arch)


def make_tiny(arch: str, vocab_size: int, seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), attn_implementation=attn)
    # Non-trivial norm weights and biases (initialised to ones and zeros), so every rule matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny(request, tokenizer):
    """(arch, tiny random model with the SmolLM2 vocabulary, tokenizer) for each architecture."""
    return request.param, make_tiny(request.param, len(tokenizer)), tokenizer


@pytest.fixture
def messages():
    return [{"role": "system", "content": "Always answer in French."},
            {"role": "user", "content": "Tell me about cats."}]


def save_tiny(tokenizer, folder, arch: str = "llama"):
    """A tiny random model of ``arch`` with the SmolLM2 tokenizer, saved as a model folder (for CLI tests)."""
    model = make_tiny(arch, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
