"""Decoding methods selectable by name in ``agd eval``, each a preset of ``agdecode.generate`` arguments.

A name may carry a ROI after ``@`` (``agd@context``, ``agd-gated@document:0``), and ``--set KEY=VALUE``
adds any further ``generate`` argument (e.g. a baseline's strength), so every run records exactly
what was decoded with. Unknown names, settings and ROIs are refused with a clear message before anything runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field

from ..config import AGDConfig
from ..decoding import generate
from ..errors import AgdError, MethodUnavailableError
from ..methods import get_method, method_names
from ..roi import parse_rois

__all__ = ["Preset", "PRESETS", "BASELINE", "MethodUnavailableError", "resolve_method", "method_choices"]

from ..config import PAPER_ENTROPY_THRESHOLD as PAPER_TAU  # 1.734 nats, the paper's gate


@dataclass(frozen=True)
class Preset:
    """A named decoding setting: ``generate(method=..., **settings)``."""

    name: str
    method: str
    settings: dict = field(default_factory=dict)
    about: str = ""


BASELINE = "greedy"  # the preset every table compares against

PRESETS: dict[str, Preset] = {m.name: m for m in [
    Preset("greedy", "greedy", {}, "greedy decoding"),
    Preset("agd", "agd", {"attribution": "lrp"}, "AGD, AttnLRP, every step guided"),
    Preset("agd-gated", "agd", {"attribution": "lrp", "entropy_threshold": PAPER_TAU},
           "AGD_e, AttnLRP, the paper's gate tau = 1.734 nats"),
    Preset("agd-gated-auto", "agd", {"attribution": "lrp", "entropy_threshold": "auto"},
           "AGD_e, AttnLRP, the gate calibrated for this model (agd calibrate)"),
    Preset("agd-ixg", "agd", {"attribution": "ixg"}, "AGD, Input x Gradient"),
    Preset("agd-ixg-gated", "agd", {"attribution": "ixg", "entropy_threshold": PAPER_TAU},
           "AGD_e, Input x Gradient, tau = 1.734"),
    Preset("agd-ixg-gated-auto", "agd", {"attribution": "ixg", "entropy_threshold": "auto"},
           "AGD_e, Input x Gradient, calibrated gate"),
    Preset("agd-gated-rel0.25", "agd", {"attribution": "lrp", "entropy_threshold": PAPER_TAU, "min_prob_ratio": 0.25},
           "AGD_e with candidates within 0.25 x the top token's probability (the project's variant, tuned on "
           "rules-calibration)"),
    Preset("greedy-rp1.2", "greedy", {"repetition_penalty": 1.2}, "greedy with a repetition penalty of 1.2"),
    Preset("agd-rp1.1", "agd", {"attribution": "lrp", "repetition_penalty": 1.1},
           "AGD with a repetition penalty of 1.1 (processed logits feed the candidates)"),
    Preset("agd-rp1.2", "agd", {"attribution": "lrp", "repetition_penalty": 1.2},
           "AGD with a repetition penalty of 1.2"),
    Preset("cad", "cad", {}, "context-aware decoding (baseline)"),
    Preset("dola", "dola", {}, "DoLa (baseline)"),
    Preset("steer", "steer", {}, "activation steering (baseline)"),
    Preset("sample", "sample", {}, "sampling (baseline; per-item seed from --seed)"),
]}


def method_choices() -> list[str]:
    """The names ``agd eval --method`` takes: the presets, then any other registered method.

    Example:
        >>> method_choices()[:3]
        ['greedy', 'agd', 'agd-gated']
    """
    return list(PRESETS) + [m for m in method_names() if m not in PRESETS]


def _generate_params() -> set[str]:
    named = {n for n, p in inspect.signature(generate).parameters.items() if p.kind != p.VAR_KEYWORD}
    return named | {f.name for f in dataclasses.fields(AGDConfig)}  # **settings go to AGDConfig


def resolve_method(name: str, roi: str | None = None, extra: dict | None = None, max_new_tokens: int = 128) -> dict:
    """The ``generate`` keyword arguments of method ``name`` (``NAME`` or ``NAME@ROI``), checked up front.

    ``roi`` is the task's default ROI (used by AGD presets unless the name gives one); ``extra``
    holds ``--set`` overrides. Raises :class:`MethodUnavailableError` for an unknown name or setting,
    :class:`~agdecode.roi.ROIError` for a ROI that does not parse. An ``entropy_threshold`` of ``"auto"`` is resolved later, against the model.

    Example:
        >>> resolve_method("agd-gated@user", roi="system")
        {'method': 'agd', 'max_new_tokens': 128, 'attribution': 'lrp', 'entropy_threshold': 1.734, 'roi': 'user'}
    """
    base, _, roi_override = name.partition("@")
    preset = PRESETS.get(base) or (Preset(base, base) if base in method_names() else None)
    if preset is None:  # a registered method (agdecode.methods) is a preset of itself
        raise MethodUnavailableError(f"Unknown method {base!r}; choose from {', '.join(method_choices())} "
                                     "(optionally NAME@ROI, e.g. agd@context).")
    kw = {"method": preset.method, "max_new_tokens": max_new_tokens, **preset.settings}
    if get_method(preset.method).uses_roi and (roi_override or roi):
        kw["roi"] = roi_override or roi
    elif roi_override:
        kw["roi"] = roi_override
    kw.update(extra or {})
    params = _generate_params()
    missing = sorted(k for k in kw if k not in params)
    if missing:
        raise MethodUnavailableError(f"generate() has no argument(s) {missing} (given for method {name!r}); "
                                     f"its arguments are {', '.join(sorted(params))}.")
    if "roi" in kw:
        parse_rois(kw["roi"])  # the ROI grammar's own parser: a bad ROI stops the run before the model loads
    return kw


def parse_set(pairs: list[str] | None) -> dict:
    """``["k=3", "roi=user"]`` -> ``{"k": 3, "roi": "user"}`` (values read as JSON where they parse).

    Example:
        >>> parse_set(["k=3", "engine=reverse"])
        {'k': 3, 'engine': 'reverse'}
    """
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise AgdError(f"--set expects KEY=VALUE, got {p!r}")
        try:
            out[key.strip()] = json.loads(value)
        except (ValueError, RecursionError):  # not JSON (a 5,000-digit number, deep nesting too): the text itself
            out[key.strip()] = value
    return out
