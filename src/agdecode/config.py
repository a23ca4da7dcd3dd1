"""Generation settings: :class:`AGDConfig`, checked up front, and its resolution for a model.

Every setting of a generation (the method, the ROI, AGD's k / min_prob / gate, the baselines'
settings, budgets and stop strings) is a field here, validated before any model compute
(:meth:`AGDConfig.validate`); :func:`resolve_config` adds what depends on the model (an ``"auto"``
threshold from its calibration, ``k`` within its vocabulary).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from .baselines import describe_vector, validate_settings
from .calibration import calibrated_threshold
from .checks import is_int
from .engines import ATTRIBUTIONS, ENGINES
from .errors import AgdError
from .methods import get_method, method_names
from .roi import ROI, parse_rois

__all__ = ["AGDConfig", "make_config", "resolve_config", "PAPER_ENTROPY_THRESHOLD", "SEED_RANGE", "MAX_STOP_STRINGS"]

PAPER_ENTROPY_THRESHOLD = 1.734  # nats; the paper's 80th percentile on IHEval, for its models
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP_STRINGS = 128


@dataclass
class AGDConfig:
    """Decoding settings, validated up front (in the manner of ``GenerationConfig.validate``).

    Example:
        >>> AGDConfig(k=5, min_prob=0.05, entropy_threshold=1.734).validate()
    """

    method: str = "agd"
    roi: str | ROI | list | None = "system"  # None: the ROI regions come with the jobs (token ids + regions)
    k: int = 5
    min_prob: float = 0.05
    min_prob_ratio: float = 0.0  # candidates also need p >= ratio * p(top token) (the project's variant; 0 = paper)
    entropy_threshold: float | str | None = None  # nats; "auto" = the model's calibration (agdecode.calibrate)
    attribution: str = "lrp"
    engine: str = ENGINES[0]
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # as in transformers: end-of-sequence cannot be chosen before this many tokens
    # Logits processing and stopping, as in transformers' generate; every method, AGD included.
    repetition_penalty: float | None = None  # None = 1.0, or 1.2 with dola (the DoLa authors' setting)
    no_repeat_ngram_size: int = 0
    bad_words_ids: list | None = None  # token id sequences that must not be generated
    stop_strings: list | None = None   # stop a row once its text ends with one of these (kept in the output)
    # Baselines (agdecode.baselines; README "Baselines"). Each is read by one method only.
    cad_alpha: float = 0.5  # cad: (1 + a) * full - a * without ROI; Shi et al. also use 1.0
    dola_layers: str | list[int] = "high"  # dola: "low", "high" or premature layer indices
    steer_vector: object = None  # steer: path from `agd steer fit`, SteeringVector or (H,) tensor
    steer_layer: int | None = None  # steer: None = the vector's layer (middle layer for a bare tensor)
    steer_weight: float = 1.0  # steer: 1.0 adds the mean difference once
    temperature: float = 1.0  # sample
    top_p: float = 0.9  # sample: nucleus
    seed: int = 0  # sample

    def validate(self) -> "AGDConfig":
        method = get_method(self.method)  # MethodError (an AgdError) for an unknown name
        if not is_int(self.k) or self.k < 1:
            raise AgdError(f"k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)) \
                or not 0.0 <= self.min_prob <= 1.0:
            raise AgdError(f"min_prob must be in [0, 1], got {self.min_prob!r}")
        r = self.min_prob_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise AgdError(f"min_prob_ratio must be in [0, 1], got {r!r}")
        t = self.entropy_threshold
        if t is not None and t != "auto" and (isinstance(t, bool) or not isinstance(t, (int, float))
                                              or math.isnan(t) or t < 0):
            raise AgdError(f"entropy_threshold must be None, a number >= 0 (nats) or 'auto', got {t!r}")
        if self.attribution not in ATTRIBUTIONS:
            raise AgdError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if self.engine not in ENGINES:
            raise AgdError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise AgdError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise AgdError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise AgdError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if self.bad_words_ids is not None and not (
                isinstance(self.bad_words_ids, (list, tuple)) and self.bad_words_ids and all(
                    isinstance(s, (list, tuple)) and s and all(is_int(i) and i >= 0 for i in s)
                    for s in self.bad_words_ids)):
            raise AgdError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, "
                           f"got {self.bad_words_ids!r}")
        if self.stop_strings is not None and not (
                isinstance(self.stop_strings, (list, tuple)) and self.stop_strings
                and all(isinstance(s, str) and s for s in self.stop_strings)):
            raise AgdError(f"stop_strings must be a non-empty list of non-empty strings, got {self.stop_strings!r:.80}")
        if self.stop_strings is not None and len(self.stop_strings) > MAX_STOP_STRINGS:
            # transformers' StopStringCriteria precomputes tables per string (~24 ms each on a CPU).
            raise AgdError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}")
        if not is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            got = f"an integer of {self.seed.bit_length()} bits" if is_int(self.seed) else repr(self.seed)[:80]
            raise AgdError(f"seed must be an integer from -2**63 to 2**64 - 1, got {got}")
        if self.roi is not None:
            parse_rois(self.roi)  # roi=5, roi=[], a bad ROI string: refused before any compute
        validate_settings(self)
        for other in method_names():  # a setting only another method reads is a mistake worth a word
            for name in get_method(other).owns if other != self.method else ():
                if getattr(self, name) is not None:
                    raise AgdError(f"{name} is only used by method={other!r}, but method={self.method!r}")
        method.validate(self)
        return self

    def roi_list(self) -> list:
        if self.roi is None:
            return []
        return list(self.roi) if isinstance(self.roi, (list, tuple)) else [self.roi]

    def to_dict(self) -> dict:
        d = asdict(replace(self, steer_vector=None))  # a tensor would not survive JSON
        d["steer_vector"] = describe_vector(self.steer_vector)
        d["roi"] = [str(r) if isinstance(r, ROI) else str(r).strip() for r in self.roi_list()]
        return d


_FIELDS = {f.name for f in fields(AGDConfig)}


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    # A torch.ao quantised Linear has weight() as a method and out_features as its row count.
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    return getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None)


def make_config(config: AGDConfig | None = None, **settings) -> AGDConfig:
    """``config`` (or the defaults) with ``settings`` (AGDConfig field names) overriding it, validated.

    Example:
        >>> make_config(AGDConfig(k=3), max_new_tokens=7).k, make_config(k=2).max_new_tokens
        (3, 128)
    """
    unknown = sorted(set(settings) - _FIELDS)
    if unknown:
        raise AgdError(f"unknown generation setting(s) {', '.join(map(repr, unknown))}; "
                       f"valid: {', '.join(sorted(_FIELDS))}")
    if config is not None and not isinstance(config, AGDConfig):
        raise AgdError(f"config must be an AGDConfig, got {type(config).__name__}")
    if settings.get("engine", "") is None:  # engine=None = the default engine
        settings["engine"] = ENGINES[0]
    return replace(config or AGDConfig(), **settings).validate()


def resolve_config(model: nn.Module, tokenizer, config: AGDConfig | None = None, **settings) -> AGDConfig:
    """The validated config for this model: keywords over ``config``, ``"auto"`` threshold resolved, ``k`` checked.

    Example:
        >>> cfg = resolve_config(model, tok, k=3, entropy_threshold="auto")
    """
    cfg = make_config(config, **settings)
    if cfg.entropy_threshold == "auto":  # resolved per model, so a calibration is never used for another
        cfg = replace(cfg, entropy_threshold=calibrated_threshold(model))
    vocab = _vocab_size(model)
    if vocab is not None and cfg.k > vocab:
        raise AgdError(f"k={cfg.k} is larger than the model's vocabulary ({vocab} tokens)")
    if cfg.stop_strings and tokenizer is None:
        raise AgdError("stop_strings need the tokenizer")
    return cfg
