"""Calibrating the entropy gate of AGD_e for a model: ``entropy_threshold="auto"``.

The paper's tau = 1.734 nats is the 80th percentile of the token-level entropy of greedy generations
on IHEval with *its* models; smaller models are less certain (SmolLM2-135M's 80th percentile on the
calibration set is 3.49 nats), so 1.734 would guide far more than 20 % of their steps. ``agd calibrate``
greedy-decodes a calibration set, records the entropy of every generated step, and stores the chosen
percentile with the model's identity, the data used and the entropy histogram as a small JSON file
in the user cache. A calibration is only ever used for the model it was made with.

The default calibration set is ``rules-calibration`` (IFEval prompts with rules in the system
message, no prompt shared with the evaluated ``rules`` items), so a gate is never tuned on the items
it is evaluated on. The package ships the calibration of the built-in model (``data/calibration/``):
``entropy_threshold="auto"`` looks in the user cache first, then among the shipped files, and a file
is only ever found by, and checked against, the model's own fingerprint.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from .calibration import (CalibrationError, calibrated_threshold, calibration_path, load_calibration,  # noqa: F401
                          save_calibration, shipped_calibration_path)  # re-exported: agdecode.calibrate keeps them
from .config import PAPER_ENTROPY_THRESHOLD
from .decoding import generate
from .identity import model_identity
from .models import dtype_name, input_device
from .errors import AgdError
from .report.style import PALETTE, method_color, new_figure, rc_params, save_png

__all__ = ["model_identity", "calibrate", "calibration_path", "shipped_calibration_path", "save_calibration",
           "load_calibration", "calibrated_threshold", "CalibrationError", "BIN_WIDTH", "DEFAULT_DATA"]

BIN_WIDTH = 0.05  # nats per histogram bin
DEFAULT_DATA = "rules-calibration"  # disjoint from the evaluated "rules" items


def calibrate(model: nn.Module, tokenizer, conversations: list[list[dict]], *, percentile: float = 80.0,
              max_new_tokens: int = 128, data: dict | None = None, progress: bool = False,
              batch_size: int | None = None) -> tuple[dict, np.ndarray]:
    """Greedy-decode ``conversations`` and take the ``percentile`` of the per-step entropies (nats).

    Returns the calibration record (threshold, model identity, data, histogram, fractions of steps
    guided under it and under the paper's 1.734) and the array of all recorded entropies.

    Example:
        >>> record, h = calibrate(model, tok, [it["messages"] for it in items], max_new_tokens=64)
        >>> record["threshold"] == float(np.percentile(h, 80))
        True
    """

    if not 0 <= percentile <= 100:
        raise AgdError(f"percentile must be in [0, 100], got {percentile!r}")
    if not conversations:
        raise AgdError("the calibration set is empty")
    entropies, start = [], time.perf_counter()
    batch_size = batch_size or (32 if input_device(model).type == "cuda" else 8)
    chunks = [conversations[i:i + 4 * batch_size] for i in range(0, len(conversations), 4 * batch_size)]
    bar = None
    if progress:
        bar = tqdm(total=len(conversations), desc="calibrating", unit="item")
    for chunk in chunks:
        for res in generate(model, tokenizer, chunk, method="greedy", max_new_tokens=max_new_tokens,
                            batch_size=batch_size):
            entropies += [s.entropy for s in res.steps]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    h = np.asarray(entropies, dtype=np.float64)
    threshold = float(np.percentile(h, percentile))
    edges_max = BIN_WIDTH * (int(h.max() / BIN_WIDTH) + 1)
    counts, _ = np.histogram(h, bins=int(round(edges_max / BIN_WIDTH)), range=(0.0, edges_max))
    record = {
        "version": 1,
        "model": model_identity(model),
        "dtype": dtype_name(next(model.parameters()).dtype),
        "data": {**(data or {}), "n_items": len(conversations)},
        "max_new_tokens": max_new_tokens,
        "percentile": percentile,
        "threshold": threshold,
        "n_steps": int(h.size),
        "fraction_guided": {"calibrated": float((h >= threshold).mean()),
                            "paper_1.734": float((h >= PAPER_ENTROPY_THRESHOLD).mean())},
        "entropy_summary": {"mean": float(h.mean()), "median": float(np.median(h)), "max": float(h.max())},
        "histogram": {"bin_width": BIN_WIDTH, "start": 0.0, "counts": counts.tolist()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return record, h


def plot_histogram(record: dict, path: str | Path, title: str | None = None) -> Path:
    """The entropy histogram of a calibration as PNG, with its percentile and the paper's 1.734 marked.

    Example:
        >>> plot_histogram(load_calibration(model), "docs/entropy-smollm2.png")
    """
    import matplotlib  # optional: pip install 'agdecode[plots]'

    hist = record["histogram"]
    counts = np.asarray(hist["counts"], dtype=float)
    edges = hist["start"] + hist["bin_width"] * np.arange(len(counts) + 1)
    frac = record["fraction_guided"]
    with matplotlib.rc_context(rc_params()):
        fig = new_figure()
        ax = fig.subplots()
        ax.stairs(counts / counts.sum() / hist["bin_width"], edges, fill=True, color=method_color("greedy"), alpha=0.6)
        ax.axvline(record["threshold"], color=PALETTE["threshold"], lw=1.6,
                   label=f"{record['percentile']:g}th percentile = {record['threshold']:.2f} nats "
                         f"({100 * frac['calibrated']:.0f} % of steps at or above)")
        ax.axvline(1.734, color=PALETTE["agd"], lw=1.6, ls="--",
                   label=f"paper's tau = 1.734 nats ({100 * frac['paper_1.734']:.0f} % of steps at or above)")
        ax.set_xlabel("next-token entropy (nats)")
        ax.set_ylabel("density of generated steps")
        m = record["model"]
        name = m.get("cli_name") or Path(m.get("name_or_path") or m["model_type"]).name
        ax.set_title(title or f"Greedy-step entropy, {name} ({record['n_steps']} steps, "
                              f"{record['data'].get('n_items')} items of {record['data'].get('name', '?')})")
        ax.legend(loc="upper right", frameon=True, framealpha=0.95, edgecolor="none")
        return save_png(fig, path)
