"""Continuous batching for the server: one thread owns the model and runs every request's decoding.

Requests arrive from any thread (the HTTP event loop) as :class:`Request` objects holding a checked
:class:`~agdecode.decoding.Job`. At every step boundary the scheduler starts the prefill of waiting
requests, runs one piece of the oldest prefill in progress (a 128-token chunk of the forward engine,
as vLLM's chunked prefill; a whole prompt for other sources), steps the running
:class:`~agdecode.decoding.Decoder` once, and hands each finished job back through its callback. A
request joins the batch when its prefill is done; nothing waits for a full batch, and a burst of
long prompts delays the running requests by one piece per step.

A decoder is one decoding configuration (method, ROI, k, ...). Requests with the same
configuration share its batch; requests with other configurations get decoders of their own, and
the scheduler steps every decoder with live rows once per round, in turn (sources patch the model
only during each call, so they can share it step by step). Admission is first come, first served,
up to ``max_batch`` rows over all decoders; no request waits for another to finish unless every
row is taken.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

from ..config import AGDConfig
from ..decoding import Decoder, Job
from ..prefix_cache import PrefixCache
from ..trace import GenerationResult
from ..errors import AgdError

__all__ = ["DecodingError", "Request", "Scheduler", "config_key"]

log = logging.getLogger("agdecode.serve")


class DecodingError(RuntimeError):
    """Decoding failed after the request was accepted (a server-side problem, not the request's)."""


def config_key(cfg: AGDConfig, heads: bool) -> str:
    """What makes two requests able to share a decoder: every setting except the per-job ones.

    ``max_new_tokens`` and ``stop_strings`` live on each :class:`Job` (its budget and its stopping
    criteria), and so do a sampling request's ``temperature``, ``top_p`` and ``seed`` (its own
    generator, ``Job.sampler``), so requests that differ only in those share a batch.

    Example:
        >>> config_key(AGDConfig(max_new_tokens=5), False) == config_key(AGDConfig(max_new_tokens=9), False)
        True
    """
    d = cfg.to_dict()
    for per_job in ("max_new_tokens", "stop_strings", "temperature", "top_p", "seed"):
        d.pop(per_job)
    return repr(sorted(d.items())) + f" heads={heads}"


@dataclass
class Request:
    """A checked job, its configuration and where its outcome goes (called in the scheduler thread)."""

    id: str
    job: Job
    config: AGDConfig
    done: Callable[[GenerationResult | None, BaseException | None], None]
    heads: bool = False
    key: str = ""
    notes: list[str] = field(default_factory=list)  # what the server decided for this request (agd.note)
    submitted: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0  # compute time of its prefill pieces so far

    def __post_init__(self):
        self.key = self.key or config_key(self.config, self.heads)


class Scheduler:
    """The decoding thread. ``submit`` from anywhere; ``close`` drains what was submitted, then stops.

    ``max_batch`` caps the sequences decoding at once; more requests wait for a free row.
    ``prefix_cache`` (a :class:`~agdecode.prefix_cache.PrefixCache`) lets requests that start alike
    (a shared system prompt, a conversation's earlier turns) reuse each other's prefill.

    Example:
        >>> sched = Scheduler(model, tok, max_batch=16).start()
        >>> sched.submit(Request("r1", job, cfg, done=lambda result, error: print(result.text)))
        >>> sched.close()
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, prefix_cache: PrefixCache | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise AgdError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.prefix_cache = prefix_cache  # shared by every decoder: prompts' prefixes computed once
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._decoders: dict[str, Decoder] = {}  # configuration key -> its open decoder
        self._stacks: dict[str, ExitStack] = {}   # configuration key -> what closes its decoder
        self._live: dict[int, Request] = {}   # id(job) -> request, for every decoding job
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agd-scheduler", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return not self._closing.is_set() and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the batch at the next step boundary it can."""
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        self._inbox.put(request)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish every submitted one, stop the thread."""
        self._closing.set()
        self._inbox.put(None)  # wake an idle loop
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> tuple[int, int]:
        """(sequences decoding, requests waiting for a row), for /metrics (read from any thread)."""
        return self._rows(), self._inbox.qsize() + len(self._waiting)

    def pending(self) -> int:
        """Requests submitted and not finished (waiting or decoding)."""
        return self._inbox.qsize() + len(self._waiting) + len(self._live)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._take(block=not self._live and not self._waiting)
            if self._closing.is_set() and not self._live and not self._waiting and self._inbox.empty():
                break
            try:
                self._admit()
            except Exception as e:  # a bug in admission: fail what is live, never the server
                log.exception("admission failed; failing %d request(s)", len(self._live))
                self._fail_all(DecodingError(f"{type(e).__name__}: {e}"))
            for key, decoder in list(self._decoders.items()):  # one prefill piece and one step each, in turn
                if decoder.pending:
                    self._advance(decoder)
                if not decoder.jobs:
                    continue
                try:
                    self._step(decoder)
                except Exception as e:  # a broken batch fails its own requests, not other decoders'
                    log.exception("decoding failed; failing %d request(s)", len(decoder.jobs))
                    self._fail(key, decoder, DecodingError(f"{type(e).__name__}: {e}"))
            for key in [k for k, d in self._decoders.items() if not d.jobs and not d.pending]:
                self._close_decoder(key)
        for key in list(self._decoders):
            self._close_decoder(key)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _rows(self) -> int:
        """Rows decoding or being prefilled (each holds cache memory), over all decoders."""
        # list(): /metrics reads this from the event loop while the scheduler thread adds decoders.
        return sum(len(d.jobs) + sum(len(jobs) for jobs, _ in list(d.pending)) for d in list(self._decoders.values()))

    def _admit(self) -> None:
        """Start the prefill of waiting requests, first come first served, while fewer than
        ``max_batch`` rows decode or prefill. Each request is prefilled on its own and in pieces,
        between steps (:meth:`_advance`): a failing prompt fails alone, a long one never stalls the batch."""
        while self._waiting and self._rows() < self.max_batch:
            req = self._waiting.popleft()
            if req.job.cancelled:
                self._finish_cancelled(req)
                continue
            if req.key not in self._decoders and not self._open_decoder(req):
                continue
            try:
                self._decoders[req.key].start([req.job])
            except Exception as e:  # its source refuses it (e.g. packed weights): this request fails alone
                log.warning("request %s cannot start: %s", req.id, e)
                req.done(None, e)
                continue
            self._live[id(req.job)] = req
            self.max_rows_seen = max(self.max_rows_seen, self._rows())

    def _advance(self, decoder: Decoder) -> None:
        """One piece of the decoder's oldest started prefill; its request joins the batch when done.
        A request cancelled while it waits for its prefill (its client left) is dropped with it."""
        jobs = decoder.pending[0][0]
        if all(job.cancelled for job in jobs):
            decoder.pending.popleft()  # nothing of it joined the batch: nothing to undo
            for job in jobs:
                req = self._live.pop(id(job), None)
                if req is not None:
                    self._finish_cancelled(req)
            return
        t0 = time.perf_counter()
        try:
            joined = decoder.advance()
        except Exception as e:  # this prompt cannot be prefilled: its request fails, nobody else's
            for job in jobs:
                req = self._live.pop(id(job), None)
                if req is not None:
                    log.warning("request %s failed in prefill: %s", req.id, e)
                    req.done(None, e)
            return
        finally:
            for job in jobs:
                if id(job) in self._live:
                    self._live[id(job)].prefill_s += time.perf_counter() - t0
        for job in joined:
            req = self._live.get(id(job))
            if req is None:
                continue
            log.info("request %s joined the batch (%d rows; waited %.3f s)", req.id, len(decoder.jobs),
                     time.perf_counter() - req.submitted)

    def _open_decoder(self, req: Request) -> bool:
        cfg = req.config
        stack = ExitStack()
        try:
            decoder = stack.enter_context(Decoder(self.model, self.tokenizer, cfg, prefix_cache=self.prefix_cache))
            self._stacks[req.key] = stack
        except Exception as e:
            # This configuration cannot run: fail this request and every waiting one that has it.
            same = [req] + [r for r in self._waiting if r.key == req.key]
            self._waiting = deque(r for r in self._waiting if r.key != req.key)
            for r in same:
                r.done(None, e)
            log.warning("cannot start a decoder for %s: %s", req.id, e)
            return False
        self._decoders[req.key] = decoder
        log.info("decoder started: method=%s (%d decoders)", cfg.method, len(self._decoders))
        return True

    def _close_decoder(self, key: str) -> None:
        self._decoders.pop(key)
        self._stacks.pop(key).close()

    def _step(self, decoder: Decoder) -> None:
        self.steps += 1
        log.debug("step %d: batch of %d rows (%d over all decoders)", self.steps, len(decoder.jobs), self._rows())
        finished = decoder.step()
        for job in finished:
            req = self._live.pop(id(job))
            log.info("request %s finished: %s after %d tokens (%d rows left)", req.id, job.finish_reason,
                     len(job.out_ids), self._rows())
            if job.error is not None:  # this row failed alone; the batch went on without it
                req.done(None, job.error)
                continue
            try:
                result = decoder.result(job)
            except Exception as e:
                req.done(None, e)
            else:
                req.done(result, None)

    def _finish_cancelled(self, req: Request) -> None:
        req.job.finish_reason = "cancelled"
        log.info("request %s finished: cancelled before it started", req.id)
        req.done(None, None)

    def _fail(self, key: str, decoder: Decoder, error: BaseException) -> None:
        """Answer every live request of this configuration after its batch broke mid-step: a row that had
        already finished (the step took it out before failing) gets its result, the others ``error``;
        the decoder is emptied (it closes when the loop sees it empty)."""
        decoder.pending.clear()  # prefills not finished: their requests are answered below
        try:
            decoder.remove(list(decoder.jobs))
        except Exception:
            log.exception("could not free the rows of a failed batch")
        for jid, req in [(j, r) for j, r in self._live.items() if r.key == key]:
            del self._live[jid]
            job = req.job
            if job.error is None and job.finish_reason in ("stop", "length"):
                try:
                    req.done(decoder.result(job), None)
                    continue
                except Exception:
                    pass
            req.done(None, job.error or error)

    def _fail_all(self, error: BaseException) -> None:
        for decoder in self._decoders.values():
            decoder.remove(list(decoder.jobs))
            decoder.pending.clear()
        live, self._live = list(self._live.values()), {}
        for req in live:
            req.done(None, error)

