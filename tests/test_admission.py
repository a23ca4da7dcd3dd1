"""Admission in pieces (Decoder.start / advance): a long prompt joins a running batch chunk by chunk,
the running rows decode in between, and every output is what a plain generate() gives."""
from __future__ import annotations

import pytest

import agdecode
from agdecode.decoding import Decoder, make_jobs, resolve_config
from agdecode.errors import AgdError
from conftest import make_tiny
from test_batching import _close_scores
from test_prefix_cache import SYSTEM

SHORT = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Tell me about cats."}]
LONG = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I pack light?"}]
KW = dict(max_new_tokens=30, k=3, min_prob=0.0)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


def _jobs(model, tok, cfg, *convs):
    return make_jobs(model, tok, cfg, list(convs), names=True)


@pytest.mark.parametrize("method", ["agd", "greedy", "cad"])
def test_a_long_prompt_joins_while_the_batch_decodes_and_nothing_changes(llama, method):
    model, tok = llama
    kw = KW if method == "agd" else {"max_new_tokens": 30}
    cfg = resolve_config(model, tok, method=method, **kw)
    running, joining = _jobs(model, tok, cfg, SHORT, LONG)
    n_long = len(joining.row.input_ids)
    assert n_long > 2 * 128  # three prefill chunks of the forward engine
    with Decoder(model, tok, cfg, prefix_cache=None) as dec:
        dec.start([running])
        assert dec.advance() == [running] and dec.jobs == [running]
        dec.step()
        dec.start([joining])
        pieces, steps_while_pending = 0, 0
        while dec.pending:
            pieces += 1
            joined = dec.advance()
            if not joined:  # the long prompt is not in yet: the running row still gets its token
                before = len(running.out_ids)
                dec.step()
                steps_while_pending += len(running.out_ids) - before
        assert dec.jobs == [running, joining]
        # The forward engine pauses between its 128-token chunks; other sources take a prompt at once.
        assert pieces == ((n_long + 127) // 128 if method == "agd" else 1)
        assert steps_while_pending == pieces - 1
        while dec.jobs:
            dec.step()
        results = [dec.result(j) for j in (running, joining)]
    # As any batch: the same tokens as each alone, scores equal up to the rounding of batched steps.
    for conv, got in zip((SHORT, LONG), results):
        ref = agdecode.generate(model, tok, conv, method=method, prefix_cache=False, **kw)
        assert got.token_ids == ref.token_ids
        _close_scores(got, ref, rel=1e-5)


def test_a_prefill_that_fails_part_way_leaves_the_batch_as_it_was(llama, monkeypatch):
    from agdecode.engines.forward import ForwardEngine

    model, tok = llama
    cfg = resolve_config(model, tok, **KW)
    running, joining = _jobs(model, tok, cfg, SHORT, LONG)
    with Decoder(model, tok, cfg) as dec:
        dec.start([running])
        dec.advance()
        dec.step()
        real = ForwardEngine._prefill

        def breaks_after_one_chunk(self, rows, context):
            gen = real(self, rows, context)
            yield next(gen)
            raise AgdError("the second chunk failed")

        monkeypatch.setattr(ForwardEngine, "_prefill", breaks_after_one_chunk)
        dec.start([joining])
        assert dec.advance() == []
        dec.step()  # the running row decodes between the two pieces
        with pytest.raises(AgdError, match="second chunk"):
            dec.advance()
        assert not dec.pending and dec.jobs == [running]
        monkeypatch.setattr(ForwardEngine, "_prefill", real)
        while dec.jobs:
            dec.step()
        got = dec.result(running)
    assert got.token_ids == agdecode.generate(model, tok, SHORT, prefix_cache=False, **KW).token_ids
