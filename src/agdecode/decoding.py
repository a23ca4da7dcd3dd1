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
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
from torch import nn

from .baselines import BASELINES, describe_vector, make_source, validate_settings
from .baselines.sampling import Sampler
from .engines import ATTRIBUTIONS, ENGINES, make_engine
from .engines.reverse import CachedForward
from .errors import AgdError
from .roi import ROI, Prompt, Region, parse_rois, render_prompt, resolve_region
from .trace import Candidate, GenerationResult, Step

__all__ = ["AGDConfig", "generate", "generate_ids", "compare", "entropy", "NonFiniteLogitsError", "METHODS"]

METHODS = ("agd", "greedy") + BASELINES
PAPER_ENTROPY_THRESHOLD = 1.734  # nats; the paper's 80th percentile on IHEval, for its models


class NonFiniteLogitsError(FloatingPointError, AgdError):
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
    entropy_threshold: float | str | None = None  # nats; "auto" = the model's calibration (agdecode.calibrate)
    attribution: str = "lrp"
    engine: str = ENGINES[0]
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # as in transformers: end-of-sequence does not stop generation before this
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
        if t is not None and t != "auto" and (isinstance(t, bool) or not isinstance(t, (int, float))
                                              or math.isnan(t) or t < 0):
            raise ValueError(f"entropy_threshold must be None, a number >= 0 (nats) or 'auto', got {t!r}")
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        parse_rois(self.roi)  # roi=5, roi=[], a bad ROI string: refused before any compute
        validate_settings(self)
        return self

    def roi_list(self) -> list:
        return list(self.roi) if isinstance(self.roi, (list, tuple)) else [self.roi]

    def to_dict(self) -> dict:
        d = asdict(replace(self, steer_vector=None))  # a tensor would not survive JSON
        d["steer_vector"] = describe_vector(self.steer_vector)
        d["roi"] = [str(r) if isinstance(r, ROI) else str(r).strip() for r in self.roi_list()]
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
    if tokenizer is not None and tokenizer.eos_token_id is not None:
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
    documents: Sequence[dict] | None = None,
    roi: str | ROI | Sequence = "system",
    method: str = "agd",
    k: int = 5,
    min_prob: float = 0.05,
    entropy_threshold: float | str | None = None,
    attribution: str = "lrp",
    engine: str | None = None,
    max_new_tokens: int = 128,
    streamer=None,
    config: AGDConfig | None = None,
    **settings,
) -> GenerationResult:
    """Generate a reply with Attribution-Guided Decoding (or greedy, with ``method="greedy"``).

    ``roi`` is a ROI or ROI expression (see :mod:`agdecode.roi`: ``"system"``, ``"context"``,
    ``"document:2"``, ``"heads:in-context"``, ``"context - user"``, ...) or a list of them: the
    first decides, all are scored and recorded in the trace. ``documents``
    (``[{"title", "text"}, ...]``) are rendered into the last user message (``roi="context"``).
    ``entropy_threshold`` (nats) enables the gate of AGD_e (the paper uses 1.734); ``"auto"`` takes
    this model's calibrated value (``agd calibrate``, :mod:`agdecode.calibrate`). ``streamer``
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
    if config.entropy_threshold == "auto":  # resolved per model, so a calibration is never used for another
        from .calibrate import calibrated_threshold

        config = replace(config, entropy_threshold=calibrated_threshold(model))
    config.validate()
    prompt = render_prompt(tokenizer, messages, documents=documents)
    _check_length(model, prompt, config.max_new_tokens)
    if config.method == "agd":
        regions = [resolve_region(r, prompt, model) for r in config.roi_list()]
        source = None
    else:
        regions = []
        source = make_source(config, model, tokenizer, prompt, messages=messages, documents=documents)
    return generate_ids(model, prompt.input_ids, regions, config, tokenizer=tokenizer, streamer=streamer,
                        source=source, prompt=prompt)


def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    rois: Sequence[Region] | dict[str, torch.Tensor],
    config: AGDConfig,
    tokenizer=None,
    streamer=None,
    source=None,
    prompt: Prompt | None = None,
) -> GenerationResult:
    """The decoding loop on token ids, for callers that build prompts and ROIs themselves.

    ``rois`` are resolved regions or ``{name: token mask (T,)}``; ``source`` is a baseline's
    logits source (else greedy or AGD per ``config.method``). Without a tokenizer the trace
    holds no token strings. Used by ``agd bench`` on random-init models.

    Example:
        >>> mask = torch.zeros(ids.shape[1], dtype=torch.bool); mask[:10] = True
        >>> out = generate_ids(model, ids, {"roi": mask}, AGDConfig(max_new_tokens=16))
    """
    config.validate()
    if isinstance(rois, dict):
        rois = [Region(n, m.float()) for n, m in rois.items()]
    if config.method == "agd":
        heads = None
        if any(r.heads is not None for r in rois):
            shape = next(r.heads.shape for r in rois if r.heads is not None)
            heads = torch.stack([r.heads if r.heads is not None else torch.zeros(shape) for r in rois])
        eng = make_engine(config.engine, model, torch.stack([r.tokens for r in rois]), config.attribution, heads)
    else:
        eng = source if source is not None else CachedForward(model)
    eos = _eos_ids(model, tokenizer)
    roi_names = [r.name for r in rois]
    decode = tokenizer.decode if tokenizer is not None else (lambda ids, **kw: "")
    ids = input_ids[0].tolist()

    start = time.perf_counter()
    with eng:
        steps, out_ids, relevance = _decode(eng, input_ids, config, decode, roi_names, eos, streamer)
    return GenerationResult(
        text=decode(out_ids, skip_special_tokens=True),
        token_ids=out_ids,
        tokens=[decode([t]) for t in out_ids],
        prompt=prompt.text if prompt is not None else decode(ids),
        prompt_ids=ids,
        prompt_tokens=[decode([t]) for t in ids],
        roi_positions={r.name: r.tokens.nonzero().flatten().tolist() for r in rois},
        steps=steps,
        config=config.to_dict(),
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        seconds=time.perf_counter() - start,
        extra={**({"relevance": relevance} if relevance else {}),
               **({"method": eng.describe()} if hasattr(eng, "describe") else {}),
               **({"roi_heads": {r.name: r.heads.nonzero().tolist() for r in rois if r.heads is not None}}
                  if any(r.heads is not None for r in rois) else {})},
    )


def _decode(eng, input_ids: torch.Tensor, config: AGDConfig, decode, roi_names: list[str], eos: set[int], streamer):
    """The loop itself: one engine, one sequence."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    steps, out_ids, relevance = [], [], {}
    sampler = Sampler(config.temperature, config.top_p, config.seed) if config.method == "sample" else None
    logits = eng.prefill(input_ids)
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
                Candidate(int(t), decode([int(t)]), float(p),
                          {n: float(scores[r, j]) for r, n in enumerate(roi_names)}
                          if scores is not None and j < len(cands) else None)
                for j, (p, t) in enumerate(zip(top_p, top_i))
            ], info=info))
        out_ids.append(chosen)
        if streamer is not None:
            streamer.put(torch.tensor([chosen]))
        if chosen in eos and len(out_ids) >= config.min_new_tokens:
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
