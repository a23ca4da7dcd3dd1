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

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

from .config import AGDConfig, resolve_config
from .baselines.sampling import Sampler
from .checks import is_int
from .errors import AgdError, NonFiniteLogitsError
from .methods import get_method
from .models import dtype_name, input_device
from .policies import Choice, View
from .prompt import Prompt, render_prompt
from .prefix_cache import PrefixCache
from .roi import Region, resolve_region
from .sources import Row, Source
from .trace import Candidate, GenerationResult, Step

__all__ = ["AGDConfig", "Decoder", "Job", "make_jobs", "resolve_config", "run", "generate", "generate_ids", "compare",
           "entropy", "NonFiniteLogitsError"]

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


def logits_processors(config: AGDConfig, extra=None):
    """transformers' processors for the config's shortcuts, then the caller's ``logits_processor``."""
    procs = LogitsProcessorList()
    penalty = config.repetition_penalty
    if penalty is None:
        penalty = get_method(config.method).repetition_penalty
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
    processors: list = field(default_factory=list)     # this row's own LogitsProcessors, after the decoder's
    on_token: Callable[[int], None] | None = None      # called with each emitted token id (streaming)
    steps: list[Step] = field(default_factory=list)
    out_ids: list[int] = field(default_factory=list)
    relevance: dict[int, list[float]] = field(default_factory=dict)
    finish_reason: str | None = None                   # "stop" (EOS / stop string / criterion), "length", "cancelled",
                                                       # "error" (then ``error`` says why; the other rows go on)
    error: BaseException | None = None
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    sampler: Sampler | None = None                     # method "sample": this job's seeded generator
    # This job's own settings where they differ from its decoder's (a server's requests share a decoder
    # across their token budgets, stop strings and seeds): what its result reports.
    config: AGDConfig | None = None


class Decoder:
    """The decoding loop over a changing batch: ``add`` jobs at any step boundary, ``step`` until empty.

    ``generate`` uses it with a fixed list of conversations; a server adds requests as they arrive.
    Sources patch the model only during each call, so decoders with other settings can take turns
    on one model, step by step. ``eos_ids`` (default: the model's and tokenizer's) end a sequence.
    The source (default: the config's method's) is made at the first ``add``, from the jobs: an
    attribution engine needs the number of ROIs and whether any is a head set; every later job must
    have the same. Use the decoder as a context manager (``with``, or ``contextlib.ExitStack``).

    Example:
        >>> with Decoder(model, tok, AGDConfig(max_new_tokens=32)) as dec:
        ...     dec.add([job1, job2])
        ...     while dec.jobs:
        ...         finished = dec.step()          # jobs that ended this step
    """

    def __init__(self, model: nn.Module, tokenizer, config: AGDConfig, source: Source | None = None,
                 logits_processor=None, eos_ids: set[int] | None = None, prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prefix_cache = prefix_cache
        self.method = get_method(config.method)
        self.source = source
        self.shape: tuple[int, bool] | None = None  # (ROIs per row, head ROIs?) the source was made for
        self.policies = self.method.policies(config)
        self.processors = logits_processors(config, logits_processor)
        self.eos = _eos_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
        self.decode = tokenizer.decode if tokenizer is not None else (lambda ids, **kw: "")
        self.jobs: list[Job] = []
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the live jobs
        self.pending: deque[tuple[list[Job], Iterator]] = deque()  # started prefills (start/advance), oldest first
        self._open = False

    def __enter__(self) -> "Decoder":
        self._open = True
        if self.source is not None:
            self.source.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._open = False
        self.jobs, self.logits = [], None
        self.pending.clear()
        if self.source is not None:
            self.source.__exit__(*exc)

    @staticmethod
    def _shape(job: Job) -> tuple[int, bool]:
        w = job.row.token_weights
        return (1 if w is None else w.shape[0]), job.row.head_weights is not None

    def _ensure_source(self, jobs: Sequence[Job]) -> None:
        shapes = {self._shape(j) for j in jobs} | ({self.shape} if self.shape is not None else set())
        if len(shapes) > 1:
            raise AgdError(f"one decoder decodes rows of one ROI layout; got (ROIs, head ROI) = {sorted(shapes)}")
        if self.shape is None:
            self.shape = shapes.pop()
        if self.source is None:
            source = self.method.source(self.config, self.model, *self.shape)
            if self.prefix_cache is not None:
                source.use_prefix_cache(self.prefix_cache)
            if self._open:
                source.__enter__()  # may refuse the model (e.g. packed weights): then nothing is open
            self.source = source

    def add(self, jobs: Sequence[Job]) -> None:
        """Prefill ``jobs`` and let them join the batch at this step boundary."""
        self._ensure_source(jobs)
        try:
            logits = self.source.prefill([j.row for j in jobs])
        except BaseException:
            self._undo_prefill()
            raise
        self._join(jobs, logits)

    def start(self, jobs: Sequence[Job]) -> None:
        """Begin prefilling ``jobs`` in pieces (:meth:`advance`); they join the batch when it is done.

        A server's way to admit long prompts: between two pieces (a prefill chunk of the forward
        engine; a whole prompt for other sources) the live jobs keep decoding, so a burst of long
        prompts delays running requests by one piece per step, not by all their prefills."""
        self._ensure_source(jobs)
        self.pending.append((list(jobs), self.source.prefill_iter([j.row for j in jobs])))

    def advance(self) -> list[Job]:
        """Run the next piece of the oldest started prefill; return its jobs once they have joined
        (else ``[]``). If the prefill fails, it is dropped and the error raised: those jobs never joined."""
        if not self.pending:
            return []
        jobs, prefill = self.pending[0]
        try:
            next(prefill)
            return []
        except StopIteration as done:
            logits = done.value
        except BaseException:
            self.pending.popleft()
            self._undo_prefill()
            raise
        self.pending.popleft()
        self._join(jobs, logits)
        return jobs

    def _undo_prefill(self) -> None:
        # A prefill that failed part-way may have appended some of its rows: keep exactly the live
        # ones, so the batch stays as it was (a server then answers or retries the others alone).
        with contextlib.suppress(Exception):  # nothing was added (no cache yet): nothing to undo
            self.source.keep(torch.arange(len(self.jobs)))

    def _join(self, jobs: Sequence[Job], logits: torch.Tensor) -> None:
        self.logits = logits if self.logits is None or not self.jobs else torch.cat([self.logits, logits])
        self.jobs += list(jobs)

    def step(self) -> list[Job]:
        """Emit one token for every live job; return the jobs that finished (and left the batch).

        A row whose logits are broken (NaN, +inf, nothing finite) or whose own processor raises
        finishes with ``finish_reason="error"`` and ``job.error``; the other rows go on unchanged."""
        logits = self._process(self.logits)                                     # (B, V)
        logits = self._hold_eos(logits)
        bad = ~(logits.isfinite().any(-1)) | logits.isnan().any(-1) | logits.isposinf().any(-1)
        for i in bad.nonzero().flatten().tolist():  # -inf is a legitimate mask (DoLa); NaN/+inf a broken model
            self.jobs[i].error = self.jobs[i].error or NonFiniteLogitsError(
                f"The model produced NaN/inf logits at step {len(self.jobs[i].steps)}; check the model "
                "weights and dtype (fp16 overflows are a common cause).")
        failed = [j for j in self.jobs if j.error is not None]
        if failed:
            keep = [i for i, j in enumerate(self.jobs) if j.error is None]
            self.remove(failed)
            logits = logits[keep]
            for j in failed:
                j.finish_reason = "error"
            if not self.jobs:
                return failed
        jobs = self.jobs
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
        return failed + [j for j, d in zip(jobs, done) if d]

    def _hold_eos(self, logits: torch.Tensor) -> torch.Tensor:
        """min_new_tokens, as in transformers: end-of-sequence cannot be chosen before it."""
        n, eos = self.config.min_new_tokens, [t for t in self.eos if 0 <= t < logits.shape[-1]]
        short = [i for i, j in enumerate(self.jobs) if len(j.out_ids) < n] if n and eos else []
        if not short:
            return logits
        logits = logits.clone() if logits is self.logits else logits  # the source's own tensor stays as it was
        logits[torch.tensor(short)[:, None], torch.tensor(eos)[None, :]] = float("-inf")
        return logits

    def remove(self, jobs: Sequence[Job]) -> None:
        """Take ``jobs`` out of the batch between steps (failed, cancelled from outside), freeing their rows."""
        gone = {id(j) for j in jobs}
        keep = [i for i, j in enumerate(self.jobs) if id(j) not in gone]
        if len(keep) == len(self.jobs):
            return
        self.logits = self.logits[keep] if self.logits is not None and keep else None
        self.jobs = [self.jobs[i] for i in keep]
        if self.source is not None:
            self.source.keep(torch.tensor(keep, dtype=torch.long))

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits processors, per row on that row's own tokens (padding never counts as a repeat):
        the decoder's, then the row's own."""
        if not self.processors and not any(j.processors for j in self.jobs):
            return logits
        out = logits.float().clone()
        for i, job in enumerate(self.jobs):
            ids = torch.cat([job.row.input_ids, torch.tensor(job.out_ids, dtype=torch.long)])[None].to(logits.device)
            try:
                for proc in (*self.processors, *job.processors):
                    out[i] = proc(ids, out[i : i + 1])[0]
            except Exception as e:  # this row's processor failed: this row ends, the batch goes on
                job.error = e
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
            config=(job.config or self.config).to_dict(),
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
    for job in jobs:
        if job.error is not None:  # the other rows finished; the first failure is the caller's answer
            raise job.error
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


def as_conversations(x) -> tuple[bool, list]:
    """(whether ``x`` is one conversation, the list of conversations); a batch is a list of message lists
    and raw prompt strings.

    Example:
        >>> as_conversations([{"role": "user", "content": "Hi"}])
        (True, [[{'role': 'user', 'content': 'Hi'}]])
    """
    what = "messages must be a non-empty list of {'role', 'content'} dicts, a string, or a list of such lists"
    if isinstance(x, str):
        return True, [x]
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        raise AgdError(f"{what}; got {x!r:.80}")
    if not all(isinstance(c, (list, tuple, str)) for c in x):
        return True, [list(x)]  # one conversation; its messages are checked when it is rendered
    for n, c in enumerate(x):
        if not isinstance(c, str) and len(c) == 0:
            raise AgdError(f"conversation {n}: {what}; got an empty list")
    return False, [c if isinstance(c, str) else list(c) for c in x]  # a batch: conversations and raw prompts


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
    prefix_cache: PrefixCache | bool | None = None,
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
    ``prefix_cache``: conversations that start alike (one system prompt, earlier turns) have that
    prefix's keys and values (and AGD's tangents) computed once (forward engine; exact, bit for bit):
    by default within this call; pass a :class:`PrefixCache` to share it across calls, False for none.

    Example:
        >>> model, tok = agdecode.load_model("smollm2")
        >>> messages = [{"role": "system", "content": "Always answer in French."},
        ...             {"role": "user", "content": "Tell me about cats."}]
        >>> out = agdecode.generate(model, tok, messages, max_new_tokens=40)
        >>> print(out.text, out.overrides)
        >>> outs = agdecode.generate(model, tok, [messages, messages[1:]], entropy_threshold=1.734,
        ...                          repetition_penalty=1.1, stop_strings=["\\n\\n"])
    """
    single, convs = as_conversations(conversations)
    docs = _documents_per_conversation(documents, len(convs), single)
    _check_protocols(logits_processor, stopping_criteria, streamer)
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise AgdError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if streamer is not None and len(convs) > 1:
        raise AgdError("streamer= streams one conversation; pass one, or use Decoder with Job.on_token")
    cfg = resolve_config(model, tokenizer, config, **settings)
    jobs = make_jobs(model, tokenizer, cfg, convs, docs, stopping_criteria, names=not single,
                     chat_template_kwargs=chat_template_kwargs)
    if prefix_cache is None or prefix_cache is True:
        prefix_cache = PrefixCache() if len(convs) > 1 or prefix_cache else None
    elif prefix_cache is False:
        prefix_cache = None
    elif not isinstance(prefix_cache, PrefixCache):
        raise AgdError(f"prefix_cache must be a PrefixCache, True or False, got {type(prefix_cache).__name__}")
    decoder = Decoder(model, tokenizer, cfg, logits_processor=logits_processor, prefix_cache=prefix_cache)
    return _results(decoder, jobs, batch_size or _default_batch_size(model), streamer, single)


def _check_protocols(logits_processor, stopping_criteria, streamer) -> None:
    """transformers' objects where generate() expects them (a wrong one fails here, not mid-decode)."""
    for name, value in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
        if value is not None and not (isinstance(value, (list, tuple)) and all(callable(v) for v in value)):
            raise AgdError(f"{name} must be a list of callables (e.g. a transformers {''.join(p.title() for p in name.split('_'))}"
                           f"List), got {type(value).__name__} {value!r:.60}")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise AgdError(f"streamer must have put() and end() (e.g. transformers' TextStreamer), got {type(streamer).__name__}")


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


def make_jobs(model: nn.Module, tokenizer, cfg: AGDConfig, conversations: Sequence, documents: Sequence | None = None,
              stopping_criteria=None, names: bool = True, chat_template_kwargs: dict | None = None,
              regions: Sequence[Region] | None = None, prompt: Prompt | None = None) -> list[Job]:
    """The one job builder: every conversation (or token id sequence) checked and resolved into a
    :class:`Job` before any compute. Used by ``generate``, ``generate_ids``, ``agdecode.hf``, the
    server, ``agd bench`` and ``agd eval``.

    A conversation is a list of ``{"role", "content"}`` messages or a raw string (rendered with the
    tokenizer's chat template); it may also be a 1-D tensor of token ids, whose ROIs are then the
    already resolved ``regions`` (one set for every id sequence; ``prompt`` describes them when
    there is one). Everything that can fail on the input (templates, ROIs, lengths, CAD's prompt
    without the ROI) fails here, naming the conversation when ``names``.

    Example:
        >>> cfg = resolve_config(model, tok)
        >>> jobs = make_jobs(model, tok, cfg, [messages])
        >>> with Decoder(model, tok, cfg) as dec: dec.add(jobs); ...
    """
    method = get_method(cfg.method)
    documents = [None] * len(conversations) if documents is None else documents
    if len(documents) != len(conversations):
        raise AgdError(f"documents has {len(documents)} entries for {len(conversations)} conversations: pass one "
                       "list (or None) per conversation")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise AgdError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    jobs = []
    for n, (conv, docs) in enumerate(zip(conversations, documents)):
        which = f"Conversation {n}'s prompt" if names else "The prompt"
        if isinstance(conv, torch.Tensor):  # token ids, ROIs resolved by the caller
            p, ids, rs, conv = prompt, conv.reshape(-1), list(regions or []), None
        else:
            p = render_prompt(tokenizer, conv, documents=docs, chat_template_kwargs=chat_template_kwargs)
            ids, conv = p.input_ids[0], conv if not isinstance(conv, str) else None
            if method.guided and cfg.roi is None:
                raise AgdError(f"method {cfg.method!r} needs a ROI: set roi= (e.g. 'system'), or pass token ids "
                               "with their ROI regions")
            rs = [resolve_region(r, p, model) for r in cfg.roi_list()] if method.guided else []
        _check_length(model, len(ids), cfg.max_new_tokens, which)
        if method.guided and not rs:
            raise AgdError(f"method {cfg.method!r} scores candidates over ROIs: pass regions with the token ids")
        row = method.row(cfg, tokenizer, p, ids, rs, messages=conv, documents=docs)
        jobs.append(Job(row, rs, p, cfg.max_new_tokens, _stopping(cfg, tokenizer, stopping_criteria)))
    return jobs


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
        # start-up: stopping_criteria imports the tokenizers library (~10 ms), not paid by `import agdecode`
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria.append(StopStringCriteria(tokenizer, list(cfg.stop_strings)))
    return criteria


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
    jobs = make_jobs(model, tokenizer, config, seqs, regions=list(rois), prompt=prompt if single else None)
    decoder = Decoder(model, tokenizer, config, source)
    return _results(decoder, jobs, batch_size or _default_batch_size(model), streamer, single)


def compare(model: nn.Module, tokenizer, messages: list[dict] | str, **kwargs) -> dict[str, GenerationResult]:
    """Run greedy and AGD on the same prompt; returns ``{"greedy": ..., "agd": ...}``.

    Example:
        >>> both = agdecode.compare(model, tok, messages, max_new_tokens=40)
        >>> both["agd"].overrides
    """
    kwargs.pop("method", None)
    return {m: generate(model, tokenizer, messages, method=m, **kwargs) for m in ("greedy", "agd")}
