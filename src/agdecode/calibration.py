"""Where entropy-gate calibrations live, and reading / writing them (the store; ``agd calibrate``
runs them: :mod:`agdecode.calibrate`).

A calibration record holds the chosen percentile of greedy-step entropies (``threshold``, nats),
the model's identity, the data used and the histogram. ``entropy_threshold="auto"`` reads the
user cache first, then the package's shipped file for the built-in model; a record is only ever
used for the model it was made with.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from torch import nn

from .errors import CalibrationError
from .identity import model_identity, same_model
from .models import cache_dir

__all__ = ["calibration_path", "shipped_calibration_path", "save_calibration", "load_calibration",
           "calibrated_threshold", "CalibrationError"]


def _model_hint(model: nn.Module) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return "smollm2" if name.rstrip("/").endswith("smollm2-135m-instruct-fp32") else (name or "<model folder>")


def calibration_path(model: nn.Module) -> Path:
    """Where the calibration of ``model`` lives: ``<cache_dir>/calibration/<type>-<fingerprint>.json``.

    Example:
        >>> calibration_path(model).name
        'llama-3f9c0a51d2e4a7b1.json'
    """
    ident = model_identity(model)
    return cache_dir() / "calibration" / f"{ident['model_type']}-{ident['fingerprint'][:16]}.json"


def shipped_calibration_path(model: nn.Module) -> Path:
    """Where the package's own calibration of ``model`` would be: ``agdecode/data/calibration/<type>-<fp>.json``.

    Only the built-in model has one; for any other model the path does not exist.

    Example:
        >>> shipped_calibration_path(model).is_file()   # the built-in SmolLM2
        True
    """
    return Path(str(resources.files("agdecode") / "data" / "calibration")) / calibration_path(model).name


def save_calibration(record: dict, path: str | Path | None = None) -> Path:
    """Write a calibration record (default: the model's :func:`calibration_path`), atomically.

    Example:
        >>> save_calibration(record)
        PosixPath('/root/.cache/agdecode/calibration/llama-3f9c0a51d2e4a7b1.json')
    """
    if path is None:
        m = record["model"]
        path = cache_dir() / "calibration" / f"{m['model_type']}-{m['fingerprint'][:16]}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def load_calibration(model: nn.Module, path: str | Path | None = None) -> dict:
    """The calibration record of ``model`` (from ``path``, else the user cache, else the package's shipped
    file for the built-in model); refuses one made for another model.

    Example:
        >>> load_calibration(model)["threshold"]
        3.49
    """
    explicit = path is not None
    path = Path(path) if explicit else calibration_path(model)
    if not explicit and not path.is_file() and shipped_calibration_path(model).is_file():
        path = shipped_calibration_path(model)  # the user's own calibration wins; else the package's
    if not path.is_file():
        raise CalibrationError(
            f"No entropy calibration for this model ({_model_hint(model)}) at {path}. "
            f"Run `agd calibrate --model {_model_hint(model)}` first, or pass a number such as "
            "entropy_threshold=1.734 (the paper's value).")
    record = json.loads(path.read_text())
    mine, theirs = model_identity(model), record.get("model", {})
    if not same_model(theirs, model):
        raise CalibrationError(
            f"The calibration {path} was made for another model ({theirs.get('model_type')} "
            f"{theirs.get('name_or_path')!r}, fingerprint {str(theirs.get('fingerprint'))[:12]}), not for this "
            f"one ({mine['model_type']} {mine['name_or_path']!r}, fingerprint {mine['fingerprint'][:12]}). "
            f"Run `agd calibrate --model {_model_hint(model)}`.")
    return record


def calibrated_threshold(model: nn.Module, path: str | Path | None = None) -> float:
    """The calibrated entropy threshold (nats) of ``model``: what ``entropy_threshold="auto"`` uses.

    Example:
        >>> agdecode.generate(model, tok, messages, entropy_threshold="auto")  # uses this value
    """
    return float(load_calibration(model, path)["threshold"])
