"""Who a model is: the one place that says whether a calibration, a steering vector or a head set
was made for the model at hand.

Two strengths, for two needs:

- :func:`model_identity` (calibrations, head sets, eval runs): a hash of the config (minus paths, dtype
  and versions) and of the first values of a few weight tensors rounded to bf16. The same weights in
  fp32 or bf16, or moved to another folder, keep it; any other model gets another.
- :func:`steering_identity` (steering vectors): the shapes plus the norms of a few embedding rows,
  compared with a tolerance, so that a vector also fits a GGUF-dequantised copy of its model.

:func:`model_key` is a short readable name (the model folder's name), used to name shipped files;
it is never the check itself.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["model_identity", "model_key", "steering_identity", "same_model"]

_VOLATILE = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version", "quantization_config",
             "_attn_implementation_autoset", "attn_implementation", "_attn_implementation"}
_FINGERPRINT_ROWS = 8


@torch.no_grad()
def model_identity(model: nn.Module) -> dict:
    """Who a model is: its type, where it was loaded from, and a fingerprint of its config and weights.

    Example:
        >>> model_identity(model)["fingerprint"][:12]
        '3f9c0a51d2e4'
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = [p for _, p in model.named_parameters()]
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return {"model_type": getattr(model.config, "model_type", type(model).__name__),
            "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
            "fingerprint": h.hexdigest()}


def same_model(identity: dict, model: nn.Module) -> bool:
    """Whether ``identity`` (a stored :func:`model_identity`) is this model's.

    Example:
        >>> same_model(record["model"], model)
        True
    """
    return isinstance(identity, dict) and identity.get("fingerprint") == model_identity(model)["fingerprint"]


@torch.no_grad()
def steering_identity(model: nn.Module) -> dict:
    """What identifies a model for a steering vector; the fingerprint is the norms of a few embedding rows.

    Example:
        >>> steering_identity(model)["hidden_size"]
        576
    """
    cfg = model.config.get_text_config()
    rows = model.get_input_embeddings().weight[:_FINGERPRINT_ROWS].detach().float()
    return {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size, "fingerprint": [round(float(x), 6) for x in rows.norm(dim=-1)]}


def model_key(model: nn.Module) -> str:
    """A short name for the model (its folder's name), used to name shipped files such as head sets.

    Example:
        >>> model_key(agdecode.load_model("smollm2")[0])
        'smollm2-135m-instruct-fp32'
    """
    return Path(str(getattr(model.config, "_name_or_path", "") or "")).name or type(model).__name__
