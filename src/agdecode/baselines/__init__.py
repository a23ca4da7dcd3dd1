"""The baselines AGD is measured against, as logits sources behind one small protocol.

Each baseline follows one sequence as it grows, like :class:`~agdecode.engines.reverse.CachedForward`:
``prefill(input_ids)`` and ``step(token_id)`` return the method's next-token scores ``(V,)``, which
the decoding loop takes the argmax of (or samples, for ``sample``); ``info()`` says what the method
computed at the current step (stored in the trace), ``describe()`` its fixed settings.

==========  ==========================================================================  =========================
method      next-token scores                                                           module
==========  ==========================================================================  =========================
``greedy``  the model's logits                                                          ``engines.reverse``
``sample``  the model's logits, temperature + top-p, sampled with a seeded generator    :mod:`.sampling`
``cad``     ``(1 + alpha) * logits(full prompt) - alpha * logits(prompt without ROI)``  :mod:`.cad`
``dola``    ``log p_final - log p_premature`` over the final layer's relative top       :mod:`.dola`
``steer``   the model's logits with ``w * v`` added to the residual stream at layer L   :mod:`.steering`
==========  ==========================================================================  =========================
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..engines.reverse import CachedForward
from ..errors import AgdError
from ..roi import Prompt

__all__ = ["BASELINES", "BaselineError", "LogitsSource", "make_source", "validate_settings",
           "DOLA_REPETITION_PENALTY"]

BASELINES = ("cad", "dola", "steer", "sample")
DOLA_REPETITION_PENALTY = 1.2  # what the DoLa authors recommend (and HF used) with DoLa


class BaselineError(AgdError):
    """A baseline setting that does not fit the model (a layer out of range, a vector for another model)."""


class LogitsSource(Protocol):
    """What the decoding loop needs from a baseline."""

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start on a prompt ``(1, T)``; return next-token scores ``(V,)``."""

    def step(self, token_id: int) -> torch.Tensor:
        """Append one token; return the next-token scores ``(V,)``."""

    def info(self) -> dict:
        """What the method computed for the current scores (JSON-serialisable)."""

    def describe(self) -> dict:
        """The method's settings as resolved for this model (JSON-serialisable)."""


def _number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Settings that only one method reads: passing them with another method is almost certainly a
# mistake (e.g. --steer-vector without --method steer) that would otherwise go unnoticed.
_ONLY_FOR = {"repetition_penalty": "dola", "steer_vector": "steer", "steer_layer": "steer"}


def validate_settings(cfg) -> None:
    """Check the baseline fields of an :class:`~agdecode.AGDConfig` (the model-independent part).

    Example:
        >>> validate_settings(AGDConfig(method="cad", cad_alpha=-1))
        Traceback (most recent call last):
        ValueError: cad_alpha must be a number >= 0 ...
    """
    if not _number(cfg.cad_alpha) or cfg.cad_alpha < 0:
        raise ValueError(f"cad_alpha must be a number >= 0 (0 = no contrast; Shi et al. use 0.5 or 1.0), "
                         f"got {cfg.cad_alpha!r}")
    layers = cfg.dola_layers
    if not (layers in ("low", "high") or (isinstance(layers, (list, tuple)) and layers and all(map(_int, layers)))):
        raise ValueError(f"dola_layers must be 'low', 'high' or a non-empty list of layer indices, got {layers!r}")
    if cfg.repetition_penalty is not None and (not _number(cfg.repetition_penalty) or cfg.repetition_penalty <= 0):
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 = none), got {cfg.repetition_penalty!r}")
    if cfg.steer_layer is not None and (not _int(cfg.steer_layer) or cfg.steer_layer < 0):
        raise ValueError(f"steer_layer must be None or an integer >= 0, got {cfg.steer_layer!r}")
    if not _number(cfg.steer_weight):
        raise ValueError(f"steer_weight must be a finite number, got {cfg.steer_weight!r}")
    if cfg.method == "steer" and cfg.steer_vector is None:
        raise ValueError("method='steer' needs steer_vector: a file saved by `agd steer fit` (or "
                         "agdecode.baselines.steering.fit_steering_vector), a SteeringVector or a tensor")
    if not _number(cfg.temperature) or cfg.temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {cfg.temperature!r}")
    if not _number(cfg.top_p) or not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p!r}")
    if not _int(cfg.seed):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    for name, method in _ONLY_FOR.items():
        if getattr(cfg, name) is not None and cfg.method != method:
            raise ValueError(f"{name} is only used by method={method!r}, but method={cfg.method!r}")


def describe_vector(spec) -> str | None:
    """A JSON-friendly description of a ``steer_vector`` setting (for the trace's config)."""
    if spec is None or isinstance(spec, (str, Path)):
        return None if spec is None else str(spec)
    if isinstance(spec, torch.Tensor):
        return f"tensor{tuple(spec.shape)}"
    return repr(spec)


def make_source(config, model: nn.Module, tokenizer, prompt: Prompt, messages: list[dict] | None = None,
                documents: list[dict] | None = None) -> LogitsSource | CachedForward:
    """The logits source for ``config.method`` (any method but ``agd``) on ``prompt``.

    ``messages`` and ``documents`` are what ``prompt`` was rendered from; CAD needs them to render
    the prompt without a ``"context"``/``"document:N"`` ROI (without them it drops the ROI's tokens).

    Example:
        >>> src = make_source(AGDConfig(method="dola"), model, tok, render_prompt(tok, messages))
        >>> scores = src.prefill(prompt.input_ids); src.info()["premature_layer"]
    """
    method = config.method
    if method in ("greedy", "sample"):
        return CachedForward(model)
    if method == "cad":
        from .cad import CADSource, context_free_prompt

        negative = context_free_prompt(tokenizer, prompt, config.roi_list()[0], messages, documents)
        return CADSource(model, negative, config.cad_alpha)
    if method == "dola":
        from .dola import DoLaSource

        penalty = DOLA_REPETITION_PENALTY if config.repetition_penalty is None else config.repetition_penalty
        return DoLaSource(model, config.dola_layers, penalty)
    if method == "steer":
        from .steering import SteeringSource, as_steering_vector

        return SteeringSource(model, as_steering_vector(config.steer_vector), config.steer_layer, config.steer_weight)
    raise ValueError(f"no logits source for method {method!r}")
