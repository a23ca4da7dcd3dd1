"""The baselines AGD is measured against, as logits sources behind one small protocol.

Each baseline is a :class:`~agdecode.sources.Source` over a batch of sequences, like the attribution
engines: ``prefill(rows)`` and ``step(token_ids)`` return the method's next-token scores ``(B, V)``,
which the decoding loop takes the argmax of (or samples, for ``sample``); ``info(i)`` says what the
method computed for sequence ``i`` at the current step (stored in the trace), ``describe()`` its
fixed settings.

==========  ==========================================================================  =========================
method      next-token scores                                                           module
==========  ==========================================================================  =========================
``greedy``  the model's logits                                                          ``sources``         
``sample``  the model's logits, temperature + top-p, sampled with a seeded generator    :mod:`.sampling`
``cad``     ``(1 + alpha) * logits(full prompt) - alpha * logits(prompt without ROI)``  :mod:`.cad`
``dola``    ``log p_final - log p_premature`` over the final layer's relative top       :mod:`.dola`
``steer``   the model's logits with ``w * v`` added to the residual stream at layer L   :mod:`.steering`
==========  ==========================================================================  =========================
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checks import is_int, is_number
from ..errors import AgdError, BaselineError


__all__ = ["BaselineError", "validate_settings", "describe_vector"]


def validate_settings(cfg) -> None:
    """Check the baseline fields of an :class:`~agdecode.AGDConfig` (the model-independent part; what
    a method needs of them, e.g. steer's vector, its :class:`~agdecode.methods.DecodingMethod` checks).

    Example:
        >>> validate_settings(AGDConfig(method="cad", cad_alpha=-1))
        Traceback (most recent call last):
        agdecode.errors.AgdError: cad_alpha must be a number >= 0 ...
    """
    if not is_number(cfg.cad_alpha) or cfg.cad_alpha < 0:
        raise AgdError(f"cad_alpha must be a number >= 0 (0 = no contrast; Shi et al. use 0.5 or 1.0), "
                         f"got {cfg.cad_alpha!r}")
    layers = cfg.dola_layers
    if not (layers in ("low", "high") or (isinstance(layers, (list, tuple)) and layers and all(map(is_int, layers)))):
        raise AgdError(f"dola_layers must be 'low', 'high' or a non-empty list of layer indices, got {layers!r}")
    if cfg.repetition_penalty is not None and (not is_number(cfg.repetition_penalty) or cfg.repetition_penalty <= 0):
        raise AgdError(f"repetition_penalty must be a number > 0 (1.0 = none), got {cfg.repetition_penalty!r}")
    if cfg.steer_layer is not None and (not is_int(cfg.steer_layer) or cfg.steer_layer < 0):
        raise AgdError(f"steer_layer must be None or an integer >= 0, got {cfg.steer_layer!r}")
    if not is_number(cfg.steer_weight):
        raise AgdError(f"steer_weight must be a finite number, got {cfg.steer_weight!r}")
    if not is_number(cfg.temperature) or cfg.temperature <= 0:
        raise AgdError(f"temperature must be a number > 0, got {cfg.temperature!r}")
    if not is_number(cfg.top_p) or not 0 < cfg.top_p <= 1:
        raise AgdError(f"top_p must be in (0, 1], got {cfg.top_p!r}")
    if not is_int(cfg.seed):
        raise AgdError(f"seed must be an integer, got {cfg.seed!r}")


def describe_vector(spec) -> str | None:
    """A JSON-friendly description of a ``steer_vector`` setting (for the trace's config)."""
    if spec is None or isinstance(spec, (str, Path)):
        return None if spec is None else str(spec)
    if isinstance(spec, torch.Tensor):
        return f"tensor{tuple(spec.shape)}"
    return repr(spec)
