"""Shared fixtures: tiny random models of every supported architecture, and the real default model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from agdecode.shapes import tiny_config  # noqa: F401 (tests import it from here)

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random llama with the SmolLM2 tokenizer, saved once as a model folder (CLI tests)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(tokenizer, d)
    return d


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
