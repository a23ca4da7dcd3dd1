"""The AGD decoding loop (Komorowski et al., 2025, Alg. 1), independent of the attribution engine.

Per step: next-token distribution p; if an entropy threshold is set and H(p) < threshold, emit the
greedy token (AGD_e); otherwise the candidates are the top-k tokens with p >= min_prob, each is
scored by the signed sum of its logit's relevance over the ROI, and the best one is emitted.

The baselines (CAD, DoLa, steering, sampling; :mod:`agdecode.baselines`) run through the same loop:
their logits source computes the method's scores, the loop takes the argmax (or samples).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from .baselines import BASELINES, describe_vector, make_source, validate_settings
from .baselines.sampling import Sampler
from .engines import ATTRIBUTIONS, ENGINES, make_engine
from .roi import ROI, Prompt, render_prompt, resolve_roi
from .trace import Candidate, GenerationResult, Step

__all__ = ["AGDConfig", "generate", "compare", "entropy", "NonFiniteLogitsError", "METHODS"]

METHODS = ("agd", "greedy") + BASELINES
PAPER_ENTROPY_THRESHOLD = 1.734  # nats; the paper's 80th percentile on IHEval, for its models


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits."""


@dataclass
class AGDConfig:
    """Decoding settings, validated up front (in the manner of ``GenerationConfig.validate``).

    Example:
        >>> AGDConfig(k=5, min_prob=0.05, entropy_threshold=1.734).validate()
    """

    method: str = "agd"
    roi: str | ROI | list = "system"
    k: int = 5
    min_prob: float = 0.05
    entropy_threshold: float | None = None
    attribution: str = "lrp"
    engine: str = ENGINES[0]
    max_new_tokens: int = 128
    # Baselines (agdecode.baselines; README "Baselines"). Each is read by one method only.
    cad_alpha: float = 0.5  # cad: (1 + a) * full - a * without ROI; Shi et al. also use 1.0
    dola_layers: str | list[int] = "high"  # dola: "low", "high" or premature layer indices
    repetition_penalty: float | None = None  # dola: None = 1.2, the DoLa authors' setting
    steer_vector: object = None  # steer: path from `agd steer fit`, SteeringVector or (H,) tensor
    steer_layer: int | None = None  # steer: None = the vector's layer (middle layer for a bare tensor)
    steer_weight: float = 1.0  # steer: 1.0 adds the mean difference once
    temperature: float = 1.0  # sample
    top_p: float = 0.9  # sample: nucleus
    seed: int = 0  # sample

    def validate(self) -> "AGDConfig":
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.min_prob, (int, float)) or not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob!r}")
        t = self.entropy_threshold
        if t is not None and (not isinstance(t, (int, float)) or math.isnan(t) or t < 0):
            raise ValueError(f"entropy_threshold must be None or a number >= 0 (nats), got {t!r}")
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        validate_settings(self)
        return self

    def roi_list(self) -> list:
        return list(self.roi) if isinstance(self.roi, (list, tuple)) else [self.roi]

    def to_dict(self) -> dict:
        d = asdict(replace(self, steer_vector=None))  # a tensor would not survive JSON
        d["steer_vector"] = describe_vector(self.steer_vector)
        d["roi"] = [str(ROI.parse(r)) for r in self.roi_list()]
        return d


def entropy(logits: torch.Tensor) -> float:
    """Shannon entropy in nats of ``softmax(logits)``.

    Example:
        >>> entropy(torch.zeros(4))   # log(4)
        1.3862943611198906
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Masked tokens (-inf, e.g. DoLa's) contribute 0 log 0 = 0, not NaN.
    return float(-torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum())


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _check_length(model: nn.Module, prompt: Prompt, max_new_tokens: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and len(prompt) + max_new_tokens > context:
        raise ValueError(f"The prompt has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                         f"the model's context of {context} tokens. Shorten the prompt or lower max_new_tokens.")


def generate(
    model: nn.Module,
    tokenizer,
    messages: list[dict] | str,
    *,
    roi: str | ROI | Sequence = "system",
    method: str = "agd",
    k: int = 5,
    min_prob: float = 0.05,
    entropy_threshold: float | None = None,
    attribution: str = "lrp",
    engine: str | None = None,
    max_new_tokens: int = 128,
    streamer=None,
    config: AGDConfig | None = None,
    **settings,
) -> GenerationResult:
    """Generate a reply with Attribution-Guided Decoding (or greedy, with ``method="greedy"``).

    ``roi`` may be a list of ROIs: the first decides, all are scored and recorded in the trace.
    ``entropy_threshold`` (nats) enables the gate of AGD_e (the paper uses 1.734). ``streamer``
    is any Hugging Face streamer (``put``/``end``). Pass ``config`` instead of the keywords to
    reuse settings.

    ``method`` is ``"agd"``, ``"greedy"`` or a baseline: ``"cad"``, ``"dola"``, ``"steer"``,
    ``"sample"``; their settings (``cad_alpha``, ``dola_layers``, ``repetition_penalty``,
    ``steer_vector``, ``steer_layer``, ``steer_weight``, ``temperature``, ``top_p``, ``seed``) are
    the :class:`AGDConfig` fields, passed as keywords (they override ``config``'s).

    Example:
        >>> model, tok = agdecode.load_model("smollm2")
        >>> messages = [{"role": "system", "content": "Always answer in French."},
        ...             {"role": "user", "content": "Tell me about cats."}]
        >>> out = agdecode.generate(model, tok, messages, max_new_tokens=40)
        >>> print(out.text, out.overrides)
        >>> cad = agdecode.generate(model, tok, messages, method="cad", cad_alpha=0.5, max_new_tokens=40)
    """
    if config is None:
        config = AGDConfig(method=method, roi=roi, k=k, min_prob=min_prob, entropy_threshold=entropy_threshold,
                           attribution=attribution, engine=engine or ENGINES[0], max_new_tokens=max_new_tokens, **settings)
    elif settings:
        config = replace(config, **settings)
    config.validate()
    prompt = render_prompt(tokenizer, messages)
    _check_length(model, prompt, config.max_new_tokens)
    rois = {str(ROI.parse(r)): resolve_roi(r, prompt) for r in config.roi_list()} if config.method in ("agd", "cad") else {}
    if config.method == "agd":
        eng = make_engine(config.engine, model, torch.stack(list(rois.values())), config.attribution)
    else:
        eng = make_source(config, model, tokenizer, prompt)
    eos = _eos_ids(model, tokenizer)
    roi_names = list(rois)

    start = time.perf_counter()
    with eng:
        steps, out_ids, relevance = _decode(eng, prompt, config, tokenizer, roi_names, eos, streamer)
    return GenerationResult(
        text=tokenizer.decode(out_ids, skip_special_tokens=True),
        token_ids=out_ids,
        tokens=[tokenizer.decode([t]) for t in out_ids],
        prompt=prompt.text,
        prompt_ids=prompt.input_ids[0].tolist(),
        prompt_tokens=[tokenizer.decode([t]) for t in prompt.input_ids[0].tolist()],
        roi_positions={n: m.nonzero().flatten().tolist() for n, m in rois.items()},
        steps=steps,
        config=config.to_dict(),
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        seconds=time.perf_counter() - start,
        extra={**({"relevance": relevance} if relevance else {}),
               **({"method": eng.describe()} if hasattr(eng, "describe") else {})},
    )


def _decode(eng, prompt: Prompt, config: AGDConfig, tokenizer, roi_names: list[str], eos: set[int], streamer):
    """The loop itself: one engine, one sequence."""
    if streamer is not None:
        streamer.put(prompt.input_ids.cpu())
    steps, out_ids, relevance = [], [], {}
    sampler = Sampler(config.temperature, config.top_p, config.seed) if config.method == "sample" else None
    logits = eng.prefill(prompt.input_ids)
    for i in range(config.max_new_tokens):
        # -inf is a legitimate mask (DoLa); NaN, +inf or nothing finite is a broken model.
        if logits.isnan().any() or logits.isposinf().any() or not logits.isfinite().any():
            raise NonFiniteLogitsError(f"The model produced NaN/inf logits at step {i}; check the model weights "
                                       "and dtype (fp16 overflows are a common cause).")
        probs = torch.softmax(logits.float(), dim=-1)
        h = entropy(logits)
        top_p, top_i = probs.topk(config.k)
        greedy_id = int(top_i[0])
        cands = top_i[top_p >= config.min_prob]
        scores, info = None, eng.info() if hasattr(eng, "info") else None
        if config.method == "greedy":
            chosen, reason = greedy_id, "greedy"
        elif sampler is not None:
            chosen, reason = sampler(logits), "sample"
            info = sampler.info()
        elif config.method in BASELINES:  # the source already applied the method: greedy on top
            chosen, reason = greedy_id, config.method
        elif config.entropy_threshold is not None and h < config.entropy_threshold:
            chosen, reason = greedy_id, "gate"
        elif len(cands) == 0:
            chosen, reason = greedy_id, "no-candidate"
        elif len(cands) == 1:
            chosen, reason = int(cands[0]), "single"
        else:
            scores = eng.roi_scores(cands).float().cpu()  # (n_roi, n_cand)
            # Candidates are sorted by probability and argmax returns the first maximum: ties go
            # to the more probable token.
            best = int(scores[0].argmax())
            chosen, reason = int(cands[best]), "attribution"
            if getattr(eng, "last_relevance", None) is not None:  # reverse engine: keep the map for reports
                relevance[i] = eng.last_relevance[best].tolist()
        steps.append(Step(
            index=i, entropy=h, reason=reason, greedy_id=greedy_id, chosen_id=chosen,
            candidates=[
                Candidate(int(t), tokenizer.decode([int(t)]), float(p),
                          {n: float(scores[r, j]) for r, n in enumerate(roi_names)}
                          if scores is not None and j < len(cands) else None)
                for j, (p, t) in enumerate(zip(top_p, top_i))
            ], info=info))
        out_ids.append(chosen)
        if streamer is not None:
            streamer.put(torch.tensor([chosen]))
        if chosen in eos:
            break
        logits = eng.step(chosen)
    if streamer is not None:
        streamer.end()
    return steps, out_ids, relevance


def compare(model: nn.Module, tokenizer, messages: list[dict] | str, **kwargs) -> dict[str, GenerationResult]:
    """Run greedy and AGD on the same prompt; returns ``{"greedy": ..., "agd": ...}``.

    Example:
        >>> both = agdecode.compare(model, tok, messages, max_new_tokens=40)
        >>> both["agd"].overrides
    """
    kwargs.pop("method", None)
    return {m: generate(model, tokenizer, messages, method=m, **kwargs) for m in ("greedy", "agd")}
