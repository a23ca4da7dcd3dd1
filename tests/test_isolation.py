"""One failing request never fails its neighbours: in the decoding loop, and in the server's scheduler."""
from __future__ import annotations

import threading

import pytest
import torch

import agdecode
from agdecode.decoding import Decoder, NonFiniteLogitsError, make_jobs, resolve_config, run
from agdecode.serve.scheduler import Request, Scheduler
from conftest import make_tiny

CONVS = [[{"role": "system", "content": f"Rule {i}: answer briefly."}, {"role": "user", "content": f"Tell me {i}."}]
         for i in range(3)]
SETTINGS = dict(k=3, min_prob=0.0, max_new_tokens=6)


class FailsAt:
    """A logits processor that raises at one step: a row whose own code breaks."""

    def __init__(self, step: int, error=RuntimeError("this row's processor broke")):
        self.step, self.error, self.calls = step, error, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.step:
            raise self.error
        return scores


class NaNAt(FailsAt):
    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores * float("nan") if self.calls > self.step else scores


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny("llama", len(tokenizer))


@pytest.mark.parametrize("breaker", [FailsAt(2), NaNAt(2)], ids=["exception", "nan"])
def test_a_failing_row_ends_alone_and_the_others_are_unchanged(model, tokenizer, breaker):
    want = agdecode.generate(model, tokenizer, CONVS, **SETTINGS)
    cfg = resolve_config(model, tokenizer, **SETTINGS)
    jobs = make_jobs(model, tokenizer, cfg, CONVS)
    breaker.calls = 0
    jobs[1].processors = [breaker]
    with pytest.raises((RuntimeError, NonFiniteLogitsError)):
        run(Decoder(model, tokenizer, cfg), jobs, batch_size=3)  # generate's answer: the failure
    assert jobs[1].finish_reason == "error" and len(jobs[1].out_ids) == 2 and jobs[1].error is not None
    for i in (0, 2):
        assert jobs[i].out_ids == want[i].token_ids and jobs[i].finish_reason == "length"


def _serve(model, tokenizer, jobs_and_cfgs):
    """Submit the jobs at once to a scheduler; return each one's (result, error)."""
    sched = Scheduler(model, tokenizer, max_batch=8)
    out, done = {}, threading.Event()

    def finish(i):
        def cb(result, error):
            out[i] = (result, error)
            if len(out) == len(jobs_and_cfgs):
                done.set()
        return cb

    for i, (job, cfg) in enumerate(jobs_and_cfgs):
        sched._inbox.put(Request(f"r{i}", job, cfg, done=finish(i)))  # all waiting before the thread starts
    sched.start()
    assert done.wait(120)
    sched.close(30)
    return out


def test_the_scheduler_fails_only_the_request_whose_row_breaks(model, tokenizer):
    want = agdecode.generate(model, tokenizer, CONVS, **SETTINGS)
    cfg = resolve_config(model, tokenizer, **SETTINGS)
    jobs = make_jobs(model, tokenizer, cfg, CONVS)
    jobs[1].processors = [FailsAt(3)]
    out = _serve(model, tokenizer, [(j, cfg) for j in jobs])
    assert out[1][0] is None and "processor broke" in str(out[1][1])
    for i in (0, 2):
        assert out[i][1] is None and out[i][0].token_ids == want[i].token_ids


def test_a_request_that_fails_in_prefill_fails_alone(model, tokenizer):
    want = agdecode.generate(model, tokenizer, CONVS, **SETTINGS)
    cfg = resolve_config(model, tokenizer, **SETTINGS)
    jobs = make_jobs(model, tokenizer, cfg, CONVS)
    bad = jobs[1].row.input_ids.clone()
    bad[-1] = 10**6  # beyond the vocabulary: the embedding lookup raises inside the prefill
    jobs[1].row.input_ids = bad
    out = _serve(model, tokenizer, [(j, cfg) for j in jobs])
    assert out[1][0] is None and out[1][1] is not None
    for i in (0, 2):
        assert out[i][1] is None and out[i][0].token_ids == want[i].token_ids
    assert torch.equal(jobs[0].row.input_ids, make_jobs(model, tokenizer, cfg, CONVS[:1])[0].row.input_ids)


def test_min_new_tokens_holds_end_of_sequence_back(model, tokenizer):
    first = agdecode.generate(model, tokenizer, CONVS[0], method="greedy", max_new_tokens=1).token_ids[0]
    cfg = resolve_config(model, tokenizer, method="greedy", max_new_tokens=4, min_new_tokens=3)
    jobs = make_jobs(model, tokenizer, cfg, CONVS[:1])
    run(Decoder(model, tokenizer, cfg, eos_ids={first}), jobs, 1)  # its first choice is "end of sequence"
    assert first not in jobs[0].out_ids[:3] and len(jobs[0].out_ids) >= 3


def test_a_batch_that_breaks_after_a_row_finished_still_answers_that_row(model, tokenizer):
    from agdecode.methods import DecodingMethod, register_method, unregister_method
    from agdecode.sources import CachedForward

    class Breaks(CachedForward):
        def step(self, token_ids):
            raise MemoryError("out of memory in the step after row 0 finished")

    class BreakingGreedy(DecodingMethod):
        name = "breaks-test"

        def source(self, cfg, model, n_rois, heads):
            return Breaks(model)

    register_method(BreakingGreedy)
    try:
        cfg = resolve_config(model, tokenizer, method="breaks-test", max_new_tokens=4)
        jobs = make_jobs(model, tokenizer, cfg, CONVS[:2])
        jobs[0].max_new_tokens = 1  # finishes at the first step, the one that then breaks
        out = _serve(model, tokenizer, [(j, cfg) for j in jobs])
    finally:
        unregister_method("breaks-test")
    assert out[0][1] is None and len(out[0][0].token_ids) == 1
    assert out[1][0] is None and "out of memory" in str(out[1][1])


def test_a_request_whose_source_cannot_start_fails_alone(model, tokenizer):
    # Its decoder opens, but the source refuses the request when it is made (e.g. packed weights):
    # that request gets the error; a greedy request beside it is answered as usual.
    from agdecode.errors import QuantizedWeightsError
    from agdecode.methods import DecodingMethod, register_method, unregister_method

    class Refuses(DecodingMethod):
        name = "refuses-test"

        def source(self, cfg, model, n_rois, heads):
            raise QuantizedWeightsError("packed LM head")

    register_method(Refuses)
    try:
        greedy = resolve_config(model, tokenizer, method="greedy", max_new_tokens=4)
        refused = resolve_config(model, tokenizer, method="refuses-test", max_new_tokens=4)
        jobs = [make_jobs(model, tokenizer, cfg, CONVS[:1])[0] for cfg in (greedy, refused)]
        out = _serve(model, tokenizer, [(jobs[0], greedy), (jobs[1], refused)])
    finally:
        unregister_method("refuses-test")
    want = agdecode.generate(model, tokenizer, CONVS[0], method="greedy", max_new_tokens=4)
    assert out[0][1] is None and out[0][0].token_ids == want.token_ids
    assert out[1][0] is None and "packed LM head" in str(out[1][1])


def test_a_request_cancelled_while_its_prompt_waits_for_prefill_is_dropped_unprefilled(model, tokenizer):
    from test_prefix_cache import SYSTEM

    cfg = resolve_config(model, tokenizer, **SETTINGS)
    long_job = make_jobs(model, tokenizer, cfg, [[{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": "Hi"}]])[0]
    emitted = []
    long_job.on_token = emitted.append
    sched = Scheduler(model, tokenizer, max_batch=8)
    got = {}
    done = threading.Event()
    sched._inbox.put(Request("r0", long_job, cfg, done=lambda r, e: (got.update(result=r, error=e), done.set())))
    sched._take(block=False)
    sched._admit()  # its prefill is started (three chunks), nothing of it run yet
    sched._advance(next(iter(sched._decoders.values())))  # one chunk
    long_job.cancelled = True  # the client leaves
    sched.start()
    assert done.wait(60)
    sched.close(30)
    assert got == {"result": None, "error": None} and long_job.finish_reason == "cancelled" and emitted == []
