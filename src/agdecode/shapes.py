"""Randomly initialised models of real architectures and sizes, for speed and memory measurements.

Speed and memory do not depend on weight values, so a GPU machine without weights (or network) can
still measure AGD at real scale: ``agd bench --device cuda --random-init llama-3.1-8b``.
"""
from __future__ import annotations

import torch
from torch import nn
from .errors import AgdError

__all__ = ["SHAPES", "TINY", "random_model", "tiny_config"]

# Published configurations (hidden size, layers, heads, KV heads, MLP width, vocabulary).
SHAPES: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=1000),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
    "gemma-3-4b": dict(model_type="gemma3_text", hidden_size=2560, num_hidden_layers=34, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, intermediate_size=10240, vocab_size=262208,
                       sliding_window=1024, query_pre_attn_scalar=256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32768, rope_theta=1000000.0,
                       sliding_window=None),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, pad_token_id=32000),
    "olmo-2-7b": dict(model_type="olmo2", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=100352, rope_theta=500000.0),
    "granite-3-8b": dict(model_type="granite", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=12800, vocab_size=49155, embedding_multiplier=12.0,
                         residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=16.0,
                         rope_theta=10000000.0, tie_word_embeddings=True),
    "smollm3-3b": dict(model_type="smollm3", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=11008, vocab_size=128256, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, tie_word_embeddings=True),
}

# Tiny shapes of every supported architecture (2 layers, width 64), for tests: what each
# architecture needs beyond the common ones (head sizes, sliding windows, multipliers away from 1 so
# each matters, a layer without rotary embeddings). :func:`tiny_config` builds them.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY: dict[str, dict] = {
    "llama": dict(model_type="llama", **_TINY),
    "qwen2": dict(model_type="qwen2", **_TINY),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_TINY),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention"], **_TINY),
    "mistral": dict(model_type="mistral", **_TINY),
    "phi3": dict(model_type="phi3", pad_token_id=0, **_TINY),
    "olmo2": dict(model_type="olmo2", pad_token_id=0, eos_token_id=None, **_TINY),
    "granite": dict(model_type="granite", embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                    logits_scaling=4.0, **_TINY),
    "smollm3": dict(model_type="smollm3", pad_token_id=0, bos_token_id=None, eos_token_id=None,
                    no_rope_layers=[1, 0], **_TINY),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None),
}


def tiny_config(arch: str, vocab_size: int, **overrides):
    """The transformers config of a tiny ``arch`` model (tests): 2 layers, width 64, context 512.

    Example:
        >>> tiny_config("qwen3", 1000).head_dim
        16
    """
    from transformers import AutoConfig  # start-up: ~0.3 s; `agd --help` imports this module (agd bench's shapes)

    if arch not in TINY:
        raise AgdError(f"Unknown tiny architecture {arch!r}; known: {', '.join(TINY)}")
    spec = dict(TINY[arch])
    positions = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    common = {"vocab_size": vocab_size, positions: 512, "initializer_range": 0.2, "tie_word_embeddings": False}
    return AutoConfig.for_model(spec.pop("model_type"), **{**common, **spec, **overrides})


def random_model(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_position_embeddings: int = 8192) -> nn.Module:
    """Build a randomly initialised model of a named shape directly on ``device``.

    Example:
        >>> model = random_model("llama-3.1-8b", device="cuda", dtype=torch.bfloat16)
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # start-up: ~0.3 s, as in tiny_config

    if shape not in SHAPES:
        raise AgdError(f"Unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max_position_embeddings, **spec)
    device = torch.device(device)
    # Seeded for repeatable weights, inside fork_rng so the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with device:  # initialise on the device: an 8B model initialised on CPU takes minutes
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config._name_or_path = f"random-init:{shape}"
    return model.eval()
