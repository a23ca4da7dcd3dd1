"""The AGD decoding loop (Komorowski et al., 2025, Alg. 1) over a batch of conversations.

Per step and sequence: next-token distribution p (after any logits processors); if an entropy
threshold is set and H(p) < threshold, emit the greedy token (AGD_e); otherwise the candidates are
the top-k tokens with p >= min_prob, each is scored by the signed sum of its logit's relevance over
the ROI, and the best one is emitted.

The loop knows neither how logits nor how scores are computed: a :class:`~agdecode.sources.Source`
(an attribution engine or a baseline) gives both, and a chain of small *policies* picks each row's
token (greedy, entropy gate, attribution choice, sampling). Sequences join while others decode and
leave as soon as they finish (end-of-sequence, a stop string or criterion, their token budget),
freeing their cache rows: :class:`Decoder` is that loop, :func:`generate` the API on top.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Sequence

import torch
from torch import nn

from .baselines import BASELINES, DOLA_REPETITION_PENALTY, baseline_row, describe_vector, make_source, validate_settings
from .baselines.sampling import Sampler
from .engines import ATTRIBUTIONS, ENGINES, make_engine
from .errors import AgdError
from .models import dtype_name, input_device
from .roi import ROI, Prompt, Region, parse_rois, render_prompt, resolve_region
from .sources import Row, Source
from .trace import Candidate, GenerationResult, Step

__all__ = ["AGDConfig", "Decoder", "Job", "make_jobs", "resolve_config", "run", "generate", "generate_ids", "compare", "entropy", "NonFiniteLogitsError",
           "METHODS"]

METHODS = ("agd", "greedy") + BASELINES
PAPER_ENTROPY_THRESHOLD = 1.734  # nats; the paper's 80th percentile on IHEval, for its models
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class NonFiniteLogitsError(FloatingPointError, AgdError):
    """The model produced NaN or infinite logits."""


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
        if self.method not in METHODS:
            raise AgdError(f"method must be one of {METHODS}, got {self.method!r}")
        if not _int(self.k) or self.k < 1:
            raise AgdError(f"k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)) \
                or not 0.0 <= self.min_prob <= 1.0:
            raise AgdError(f"min_prob must be in [0, 1], got {self.min_prob!r}")
        t = self.entropy_threshold
        if t is not None and t != "auto" and (isinstance(t, bool) or not isinstance(t, (int, float))
                                              or math.isnan(t) or t < 0):
            raise AgdError(f"entropy_threshold must be None, a number >= 0 (nats) or 'auto', got {t!r}")
        if self.attribution not in ATTRIBUTIONS:
            raise AgdError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if self.engine not in ENGINES:
            raise AgdError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not _int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise AgdError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise AgdError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not _int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise AgdError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if self.bad_words_ids is not None and not (
                isinstance(self.bad_words_ids, (list, tuple)) and self.bad_words_ids and all(
                    isinstance(s, (list, tuple)) and s and all(_int(i) and i >= 0 for i in s)
                    for s in self.bad_words_ids)):
            raise AgdError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, "
                           f"got {self.bad_words_ids!r}")
        if self.stop_strings is not None and not (
                isinstance(self.stop_strings, (list, tuple)) and self.stop_strings
                and all(isinstance(s, str) and s for s in self.stop_strings)):
            raise AgdError(f"stop_strings must be a non-empty list of non-empty strings, got {self.stop_strings!r}")
        if not _int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            got = f"an integer of {self.seed.bit_length()} bits" if _int(self.seed) else repr(self.seed)[:80]
            raise AgdError(f"seed must be an integer from -2**63 to 2**64 - 1, got {got}")
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


_FIELDS = {f.name for f in fields(AGDConfig)}


def entropy(logits: torch.Tensor) -> float | torch.Tensor:
    """Shannon entropy in nats of ``softmax(logits)`` over the last dimension: a float for ``(V,)``,
    a tensor ``(B,)`` for ``(B, V)``.

    Example:
        >>> entropy(torch.zeros(4))   # log(4)
        1.3862943611198906
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Masked tokens (-inf, e.g. DoLa's) contribute 0 log 0 = 0, not NaN.
    h = -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)
    return float(h) if logits.dim() == 1 else h


# --- policies: each decides the rows still undecided, in order -------------------------------------

@dataclass
class View:
    """What the policies see of one step: the processed next-token distribution of every live row."""

    logits: torch.Tensor    # (B, V) after the logits processors
    top_p: torch.Tensor     # (B, k) probabilities of the top-k tokens, descending
    top_i: torch.Tensor     # (B, k) their ids
    entropy: torch.Tensor   # (B,) nats
    jobs: list              # the live jobs, in row order


@dataclass
class Choice:
    """The next token of every live row, filled in by the policies."""

    chosen: torch.Tensor                      # (B,) token ids, -1 = undecided
    reasons: list[str | None]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> ROI scores (R, n_candidates)
    info: dict[int, dict] = field(default_factory=dict)            # row -> what a policy computed

    def undecided(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]

    def set(self, rows: list[int], tokens: torch.Tensor, reason: str) -> None:
        for i, t in zip(rows, tokens.reshape(-1).tolist()):
            self.chosen[i], self.reasons[i] = t, reason


class Greedy:
    """The most probable token (of the model, or of a baseline's scores: then ``reason`` is its name)."""

    def __init__(self, reason: str = "greedy"):
        self.reason = reason

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = choice.undecided()
        choice.set(rows, v.top_i[rows, 0], self.reason)


class EntropyGate:
    """AGD_e: below ``threshold`` nats the model is sure enough; emit its greedy token."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = [i for i in choice.undecided() if v.entropy[i] < self.threshold]
        choice.set(rows, v.top_i[rows, 0], "gate")


class AttributionChoice:
    """The candidate (top-k, p >= min_prob) whose logit depends most on the first ROI."""

    def __init__(self, min_prob: float):
        self.min_prob = min_prob

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = choice.undecided()
        n = dict(zip(rows, (v.top_p[rows] >= self.min_prob).sum(1).tolist()))  # candidates: a prefix of top-k
        for reason, few in (("no-candidate", 0), ("single", 1)):
            these = [i for i in rows if n[i] == few]
            choice.set(these, v.top_i[these, 0], reason)
        guided = [i for i in rows if n[i] > 1]
        if not guided:
            return
        scores = src.scores(v.top_i[guided], torch.tensor(guided)).float().cpu()    # (n, R, k)
        for i, s in zip(guided, scores):
            s = s[:, : n[i]]
            # Candidates are sorted by probability and argmax returns the first maximum: ties go
            # to the more probable token.
            best = int(s[0].argmax())
            choice.chosen[i], choice.reasons[i], choice.scores[i] = int(v.top_i[i, best]), "attribution", s


class Sample:
    """Temperature + top-p sampling, one seeded generator per job (a job samples as it would alone)."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.settings = (temperature, top_p, seed)

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        for i in choice.undecided():
            job = v.jobs[i]
            if job.sampler is None:  # the generator lives with its job: a new job starts from the seed
                job.sampler = Sampler(*self.settings)
            sampler = job.sampler
            choice.chosen[i], choice.reasons[i] = sampler(v.logits[i]), "sample"
            choice.info[i] = sampler.info()


def policies(config: AGDConfig) -> list:
    """The policy chain of a method: what decides each row's next token, in order."""
    if config.method == "agd":
        gate = [] if config.entropy_threshold is None else [EntropyGate(config.entropy_threshold)]
        return gate + [AttributionChoice(config.min_prob)]
    if config.method == "sample":
        return [Sample(config.temperature, config.top_p, config.seed)]
    return [Greedy(config.method)]  # greedy, or a baseline whose source already applied the method


def logits_processors(config: AGDConfig, extra=None):
    """transformers' processors for the config's shortcuts, then the caller's ``logits_processor``."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)

    procs = LogitsProcessorList()
    penalty = config.repetition_penalty
    if penalty is None and config.method == "dola":
        penalty = DOLA_REPETITION_PENALTY
    if penalty is not None and penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if config.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        # eos_token_id only matters for banning sequences that contain it; -1 matches no token.
        procs.append(NoBadWordsLogitsProcessor([list(s) for s in config.bad_words_ids], eos_token_id=-1))
    procs.extend(extra or [])
    return procs


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Job:
    """One conversation being decoded: what the source needs (``row``), how to report it, its state."""

    row: Row
    rois: list[Region] = field(default_factory=list)
    prompt: Prompt | None = None
    max_new_tokens: int = 128
    stopping: list = field(default_factory=list)       # transformers StoppingCriteria, called per row
    on_token: Callable[[int], None] | None = None      # called with each emitted token id (streaming)
    steps: list[Step] = field(default_factory=list)
    out_ids: list[int] = field(default_factory=list)
    relevance: dict[int, list[float]] = field(default_factory=dict)
    finish_reason: str | None = None                   # "stop" (EOS / stop string / criterion), "length", "cancelled"
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    sampler: Sampler | None = None                     # method "sample": this job's seeded generator


class Decoder:
    """The decoding loop over a changing batch: ``add`` jobs at any step boundary, ``step`` until empty.

    ``generate`` uses it with a fixed list of conversations; a server adds requests as they arrive.
    Sources patch the model only during each call, so decoders with other settings can take turns
    on one model, step by step. ``eos_ids`` (default: the model's and tokenizer's) end a sequence.

    Example:
        >>> with Decoder(model, tok, AGDConfig(max_new_tokens=32)) as dec:
        ...     dec.add([job1, job2])
        ...     while dec.jobs:
        ...         finished = dec.step()          # jobs that ended this step
    """

    def __init__(self, model: nn.Module, tokenizer, config: AGDConfig, source: Source | None = None,
                 logits_processor=None, n_rois: int = 1, heads: bool = False, eos_ids: set[int] | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.source = source if source is not None else (
            make_engine(config.engine, model, n_rois, config.attribution, heads) if config.method == "agd"
            else make_source(config, model))
        self.policies = policies(config)
        self.processors = logits_processors(config, logits_processor)
        self.eos = _eos_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
        self.decode = tokenizer.decode if tokenizer is not None else (lambda ids, **kw: "")
        self.jobs: list[Job] = []
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the live jobs

    def __enter__(self) -> "Decoder":
        self.source.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.source.__exit__(*exc)

    def add(self, jobs: Sequence[Job]) -> None:
        """Prefill ``jobs`` and let them join the batch at this step boundary."""
        logits = self.source.prefill([j.row for j in jobs])
        self.logits = logits if self.logits is None or not self.jobs else torch.cat([self.logits, logits])
        self.jobs += list(jobs)

    def step(self) -> list[Job]:
        """Emit one token for every live job; return the jobs that finished (and left the batch)."""
        jobs, logits = self.jobs, self._process(self.logits)                   # (B, V)
        bad = ~(logits.isfinite().any(-1)) | logits.isnan().any(-1) | logits.isposinf().any(-1)
        if bad.any():  # -inf is a legitimate mask (DoLa); NaN, +inf or nothing finite is a broken model
            raise NonFiniteLogitsError(f"The model produced NaN/inf logits at step {len(jobs[int(bad.nonzero()[0])].steps)}; "
                                       "check the model weights and dtype (fp16 overflows are a common cause).")
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(self.config.k, dim=-1)                         # (B, k)
        view = View(logits, top_p, top_i, entropy(logits), jobs)
        choice = Choice(torch.full((len(jobs),), -1, dtype=torch.long), [None] * len(jobs))
        for policy in self.policies:
            policy(view, choice, self.source)
        for i, job in enumerate(jobs):
            self._record(i, job, choice, top_p[i], top_i[i], float(view.entropy[i]))
        done = [self._finished(j, probs[i : i + 1]) for i, j in enumerate(jobs)]
        live = [i for i, d in enumerate(done) if not d]
        if len(live) < len(jobs):
            self.source.keep(torch.tensor(live, dtype=torch.long))
        self.jobs = [jobs[i] for i in live]
        if self.jobs:
            self.logits = self.source.step(choice.chosen[live])
        return [j for j, d in zip(jobs, done) if d]

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits processors, per row on that row's own tokens (padding never counts as a repeat)."""
        if not self.processors:
            return logits
        out = logits.float().clone()
        for i, job in enumerate(self.jobs):
            ids = torch.cat([job.row.input_ids, torch.tensor(job.out_ids, dtype=torch.long)])[None]
            out[i] = self.processors(ids.to(logits.device), out[i : i + 1])[0]
        return out

    def _record(self, i: int, job: Job, choice: Choice, top_p, top_i, h: float) -> None:
        chosen, scores = int(choice.chosen[i]), choice.scores.get(i)
        names = [r.name for r in job.rois]
        if choice.reasons[i] == "attribution":
            rel = self.source.relevance(i, int((top_i == chosen).nonzero()[0]))
            if rel is not None:
                job.relevance[len(job.steps)] = rel
        job.steps.append(Step(
            index=len(job.steps), entropy=h, reason=choice.reasons[i], greedy_id=int(top_i[0]), chosen_id=chosen,
            candidates=[Candidate(int(t), self.decode([int(t)]), float(p),
                                  {n: float(scores[r, j]) for r, n in enumerate(names)}
                                  if scores is not None and j < scores.shape[1] else None)
                        for j, (p, t) in enumerate(zip(top_p, top_i))],
            info=choice.info.get(i, self.source.info(i))))
        job.out_ids.append(chosen)
        if job.on_token is not None:
            job.on_token(chosen)

    def _finished(self, job: Job, scores: torch.Tensor) -> bool:
        if job.cancelled:
            job.finish_reason = "cancelled"
        elif job.out_ids[-1] in self.eos and len(job.out_ids) >= self.config.min_new_tokens:
            job.finish_reason = "stop"
        elif job.stopping and self._stop_criteria(job, scores):
            job.finish_reason = "stop"
        elif len(job.out_ids) >= job.max_new_tokens:
            job.finish_reason = "length"
        return job.finish_reason is not None

    @staticmethod
    def _stop_criteria(job: Job, scores: torch.Tensor) -> bool:
        ids = torch.cat([job.row.input_ids.cpu(), torch.tensor(job.out_ids, dtype=torch.long)])[None]
        return any(bool(c(ids, scores.cpu()).any()) for c in job.stopping)

    def result(self, job: Job) -> GenerationResult:
        """A finished job as a :class:`GenerationResult`."""
        decode, ids = self.decode, job.row.input_ids.tolist()
        out_ids = job.out_ids
        heads = {r.name: r.heads.nonzero().tolist() for r in job.rois if r.heads is not None}
        describe = self.source.describe()
        if job.row.negative_ids is not None:  # CAD: what this conversation was contrasted with
            describe = {**(describe or {}), "negative_prompt_ids": job.row.negative_ids.tolist()}
        return GenerationResult(
            text=decode(out_ids, skip_special_tokens=True),
            token_ids=out_ids,
            tokens=[decode([t]) for t in out_ids],
            prompt=job.prompt.text if job.prompt is not None else decode(ids),
            prompt_ids=ids,
            prompt_tokens=[decode([t]) for t in ids],
            roi_positions={r.name: r.tokens.nonzero().flatten().tolist() for r in job.rois},
            steps=job.steps,
            config=self.config.to_dict(),
            model=getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__,
            seconds=time.perf_counter() - job.started,
            extra={**({"relevance": job.relevance} if job.relevance else {}),
                   **({"method": describe} if describe is not None else {}),
                   **({"roi_heads": heads} if heads else {}),
                   "finish_reason": job.finish_reason,
                   "dtype": dtype_name(getattr(self.model, "dtype", ""))},
        )


def run(decoder: Decoder, jobs: Sequence[Job], batch_size: int) -> list[Job]:
    """Decode ``jobs`` with at most ``batch_size`` in the batch; a finished job's place goes to the next."""
    pending, i = list(jobs), 0
    with decoder:
        while i < len(pending) or decoder.jobs:
            free = batch_size - len(decoder.jobs)
            if free > 0 and i < len(pending):
                decoder.add(pending[i : i + free])
                i += free
            decoder.step()
    return list(jobs)


# --- the API -------------------------------------------------------------------------------------

def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _check_length(model: nn.Module, n_prompt: int, max_new_tokens: int, which: str = "The prompt") -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and n_prompt + max_new_tokens > context:
        raise AgdError(f"{which} has {n_prompt} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                       f"the model's context of {context} tokens. Shorten the prompt or lower max_new_tokens.")


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.shape[0] if weight is not None else getattr(model.config, "vocab_size", None)


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


def _conversations(x) -> tuple[bool, list]:
    """(whether ``x`` is one conversation, the list of conversations); a batch is a list of message lists."""
    what = "messages must be a non-empty list of {'role', 'content'} dicts, a string, or a list of such lists"
    if isinstance(x, str):
        return True, [x]
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        raise AgdError(f"{what}; got {x!r:.80}")
    if not all(isinstance(c, (list, tuple)) for c in x):
        return True, [list(x)]  # one conversation; its messages are checked when it is rendered
    for n, c in enumerate(x):
        if len(c) == 0:
            raise AgdError(f"conversation {n}: {what}; got an empty list")
    return False, [list(c) for c in x]


def _default_batch_size(model: nn.Module) -> int:
    return 32 if input_device(model).type == "cuda" else 8


def generate(
    model: nn.Module,
    tokenizer,
    conversations: list[dict] | str | Sequence[list[dict] | str],
    *,
    documents: Sequence[dict] | Sequence[Sequence[dict] | None] | None = None,
    config: AGDConfig | None = None,
    streamer=None,
    logits_processor=None,
    stopping_criteria=None,
    batch_size: int | None = None,
    chat_template_kwargs: dict | None = None,
    **settings,
) -> GenerationResult | list[GenerationResult]:
    """Generate replies with Attribution-Guided Decoding (or greedy, or a baseline), batched.

    ``conversations`` is one conversation (a list of ``{"role", "content"}`` messages, or a raw
    string) or a list of them; a list returns a list of :class:`GenerationResult` in order, one
    conversation a single result. ``documents`` (``[{"title", "text"}, ...]``, or one such list or
    None per conversation) are rendered into the last user message (``roi="context"``).
    ``batch_size`` caps the sequences per forward pass (default 8 on CPU, 32 on CUDA): a finished
    sequence's place goes to the next waiting one.

    Settings are :class:`AGDConfig` fields passed as keywords (they override ``config``'s):
    ``roi`` (``"system"``, ``"context"``, ``"document:2"``, ``"heads:in-context"``,
    ``"context - user"``, ... or a list: the first decides, all are scored), ``k``, ``min_prob``,
    ``entropy_threshold`` (nats, AGD_e; the paper uses 1.734; ``"auto"`` = this model's calibrated
    value), ``attribution``, ``engine``, ``max_new_tokens``, ``method`` (``"agd"``, ``"greedy"``,
    ``"cad"``, ``"dola"``, ``"steer"``, ``"sample"``) and the baselines' settings.

    As in transformers: ``logits_processor`` (a ``LogitsProcessorList``; with AGD it acts before the
    entropy gate and the candidate set are computed), ``stopping_criteria`` (a
    ``StoppingCriteriaList``), ``stop_strings=[...]``, ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``bad_words_ids``; ``streamer`` is any Hugging Face streamer (one
    conversation only). Processors and criteria are called per sequence on its own tokens.
    ``chat_template_kwargs`` go to the chat template (e.g. ``{"enable_thinking": False}`` for Qwen3).

    Example:
        >>> model, tok = agdecode.load_model("smollm2")
        >>> messages = [{"role": "system", "content": "Always answer in French."},
        ...             {"role": "user", "content": "Tell me about cats."}]
        >>> out = agdecode.generate(model, tok, messages, max_new_tokens=40)
        >>> print(out.text, out.overrides)
        >>> outs = agdecode.generate(model, tok, [messages, messages[1:]], entropy_threshold=1.734,
        ...                          repetition_penalty=1.1, stop_strings=["\\n\\n"])
    """
    single, convs = _conversations(conversations)
    docs = _documents_per_conversation(documents, len(convs), single)
    if batch_size is not None and (not _int(batch_size) or batch_size < 1):
        raise AgdError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if streamer is not None and len(convs) > 1:
        raise AgdError("streamer= streams one conversation; pass one, or use Decoder with Job.on_token")
    cfg = resolve_config(model, tokenizer, config, **settings)
    jobs = make_jobs(model, tokenizer, cfg, convs, docs, stopping_criteria, names=not single,
                     chat_template_kwargs=chat_template_kwargs)
    decoder = Decoder(model, tokenizer, cfg, logits_processor=logits_processor, n_rois=len(cfg.roi_list()),
                      heads=any(r.heads is not None for j in jobs for r in j.rois))
    return _results(decoder, jobs, batch_size or _default_batch_size(model), streamer, single)


def _results(decoder: Decoder, jobs: list[Job], batch_size: int, streamer, single: bool):
    """Decode ``jobs`` (streaming the first to ``streamer``); one result, or the list in order."""
    if streamer is not None:
        streamer.put(jobs[0].row.input_ids[None].cpu())
        jobs[0].on_token = lambda t: streamer.put(torch.tensor([t]))
    run(decoder, jobs, batch_size)
    if streamer is not None:
        streamer.end()
    results = [decoder.result(j) for j in jobs]
    return results[0] if single else results


def resolve_config(model: nn.Module, tokenizer, config: AGDConfig | None = None, **settings) -> AGDConfig:
    """The validated config for this model: keywords over ``config``, ``"auto"`` threshold resolved, ``k`` checked.

    Example:
        >>> cfg = resolve_config(model, tok, k=3, entropy_threshold="auto")
    """
    cfg = make_config(config, **settings)
    if cfg.entropy_threshold == "auto":  # resolved per model, so a calibration is never used for another
        from .calibrate import calibrated_threshold

        cfg = replace(cfg, entropy_threshold=calibrated_threshold(model))
    vocab = _vocab_size(model)
    if vocab is not None and cfg.k > vocab:
        raise AgdError(f"k={cfg.k} is larger than the model's vocabulary ({vocab} tokens)")
    if cfg.stop_strings and tokenizer is None:
        raise AgdError("stop_strings need the tokenizer")
    return cfg


def make_jobs(model: nn.Module, tokenizer, cfg: AGDConfig, conversations: Sequence, documents: Sequence | None = None,
              stopping_criteria=None, names: bool = True, chat_template_kwargs: dict | None = None) -> list[Job]:
    """Render, check and resolve every conversation (one :class:`Job` each) before any compute.

    Everything that can fail on the input (templates, ROIs, lengths, CAD's prompt without the ROI)
    fails here, naming the conversation when ``names``.

    Example:
        >>> jobs = make_jobs(model, tok, resolve_config(model, tok), [messages])
        >>> with Decoder(model, tok, cfg) as dec: dec.add(jobs); ...
    """
    documents = [None] * len(conversations) if documents is None else documents
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise AgdError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    prompts = [render_prompt(tokenizer, c, documents=d, chat_template_kwargs=chat_template_kwargs)
               for c, d in zip(conversations, documents)]
    for n, p in enumerate(prompts):
        _check_length(model, len(p), cfg.max_new_tokens, f"Conversation {n}'s prompt" if names else "The prompt")
    if cfg.method == "agd":
        regions = [[resolve_region(r, p, model) for r in cfg.roi_list()] for p in prompts]
        rows = [_engine_row(p.input_ids[0], rs) for p, rs in zip(prompts, regions)]
    else:
        regions = [[] for _ in prompts]
        rows = [baseline_row(cfg, tokenizer, p, messages=c if not isinstance(c, str) else None, documents=d)
                for p, c, d in zip(prompts, conversations, documents)]
    return [Job(row, rs, p, cfg.max_new_tokens, _stopping(cfg, tokenizer, stopping_criteria))
            for row, rs, p in zip(rows, regions, prompts)]


def _documents_per_conversation(documents, n: int, single: bool) -> list:
    if documents is None:
        return [None] * n
    if not isinstance(documents, (list, tuple)):
        raise AgdError(f"documents must be a list of {{'title', 'text'}} dicts (or, for several conversations, "
                       f"one such list or None per conversation), got {type(documents).__name__}")
    if single:
        return [documents]
    if len(documents) != n:
        raise AgdError(f"documents has {len(documents)} entries for {n} conversations: pass one list "
                       "(or None) per conversation")
    return list(documents)


def _stopping(cfg: AGDConfig, tokenizer, stopping_criteria) -> list:
    criteria = list(stopping_criteria or [])
    if cfg.stop_strings:
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria.append(StopStringCriteria(tokenizer, list(cfg.stop_strings)))
    return criteria


def _engine_row(input_ids: torch.Tensor, regions: Sequence[Region]) -> Row:
    """An attribution engine's row: the token weights ``(R, T)`` and head weights ``(R, L, H)`` of the ROIs."""
    heads = None
    if any(r.heads is not None for r in regions):
        shape = next(r.heads.shape for r in regions if r.heads is not None)
        heads = torch.stack([r.heads if r.heads is not None else torch.zeros(shape) for r in regions])
    return Row(input_ids, torch.stack([r.tokens for r in regions]), heads)


def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    rois: Sequence[Region] | dict[str, torch.Tensor],
    config: AGDConfig,
    tokenizer=None,
    streamer=None,
    source: Source | None = None,
    prompt: Prompt | None = None,
    batch_size: int | None = None,
) -> GenerationResult | list[GenerationResult]:
    """The decoding loop on token ids, for callers that build prompts and ROIs themselves.

    ``input_ids`` is ``(T,)``/``(1, T)`` (one result) or a list of ``(T_i,)`` (a list of results);
    ``rois`` are resolved regions or ``{name: token mask (T,)}`` (one set for every sequence, so
    the sequences must have equal length when ``rois`` is given and several are passed);
    ``source`` is any :class:`~agdecode.sources.Source` (else the config's engine or baseline).
    Without a tokenizer the trace holds no token strings. Used by ``agd bench``.

    Example:
        >>> mask = torch.zeros(ids.shape[1], dtype=torch.bool); mask[:10] = True
        >>> out = generate_ids(model, ids, {"roi": mask}, AGDConfig(max_new_tokens=16))
    """
    config.validate()
    single = isinstance(input_ids, torch.Tensor)
    seqs = [input_ids.reshape(-1)] if single else [t.reshape(-1) for t in input_ids]
    if isinstance(rois, dict):
        rois = [Region(n, m.float()) for n, m in rois.items()]
    rows = [_engine_row(s, rois) if config.method == "agd" else Row(s) for s in seqs]
    decoder = Decoder(model, tokenizer, config, source, n_rois=max(1, len(rois)),
                      heads=any(r.heads is not None for r in rois))
    jobs = [Job(row, list(rois), prompt if single else None, config.max_new_tokens) for row in rows]
    return _results(decoder, jobs, batch_size or _default_batch_size(model), streamer, single)


def compare(model: nn.Module, tokenizer, messages: list[dict] | str, **kwargs) -> dict[str, GenerationResult]:
    """Run greedy and AGD on the same prompt; returns ``{"greedy": ..., "agd": ...}``.

    Example:
        >>> both = agdecode.compare(model, tok, messages, max_new_tokens=40)
        >>> both["agd"].overrides
    """
    kwargs.pop("method", None)
    return {m: generate(model, tokenizer, messages, method=m, **kwargs) for m in ("greedy", "agd")}
