"""Prefix reuse (agdecode.prefix_cache): exact, bit for bit, against prefills that compute everything."""
from __future__ import annotations

import pytest
import torch

import agdecode
from agdecode import PrefixCache
from agdecode.errors import AgdError
from conftest import TINY_ARCHS, make_tiny

# A system prompt of several prefill chunks (128 tokens on a CPU), shared by every conversation.
SYSTEM = "You are a travel assistant. " + " ".join(
    f"Rule {i}: never name competitor {i}; answer politely in one short paragraph." for i in range(18))
QUESTIONS = ["What is the capital of France?", "Suggest a weekend trip.", "How do I pack light?"]
KW = dict(max_new_tokens=6, k=3, min_prob=0.0, engine="forward")


def convs(system: str = SYSTEM) -> list[list[dict]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in QUESTIONS]


def same(a, b) -> None:
    """Two results are the same generation: tokens, every candidate's scores and probabilities."""
    assert a.token_ids == b.token_ids
    for sa, sb in zip(a.steps, b.steps):
        assert [(c.token_id, c.prob, c.scores) for c in sa.candidates] == \
               [(c.token_id, c.prob, c.scores) for c in sb.candidates]


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_shared_system_prompt_is_computed_once_and_changes_nothing(arch, tokenizer):
    model = make_tiny(arch, len(tokenizer))
    plain = agdecode.generate(model, tokenizer, convs(), prefix_cache=False, **KW)
    cache = PrefixCache()
    reused = agdecode.generate(model, tokenizer, convs(), prefix_cache=cache, **KW)
    for a, b in zip(plain, reused):
        same(a, b)
    stats = cache.stats()
    assert stats["hits"] == 2 and stats["misses"] == 1 and stats["tokens_reused"] >= 2 * 256, stats


def test_later_calls_and_later_turns_reuse_it(llama):
    model, tok = llama
    cache = PrefixCache()
    first = agdecode.generate(model, tok, convs()[0], prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 0 and len(cache) == 1
    # The next turn of the same conversation re-sends the first: its prefix is reused.
    turn2 = convs()[0] + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And Spain?"}]
    again = agdecode.generate(model, tok, turn2, prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 1
    same(again, agdecode.generate(model, tok, turn2, prefix_cache=False, **KW))


@pytest.mark.parametrize("roi", ["user", "heads:0.1,1.0", ["system", "user"]])
def test_a_prefix_is_reused_only_under_the_same_roi(llama, roi):
    # Same tokens, another ROI: the tangents differ wherever the ROI weights do, so those are recomputed.
    model, tok = llama
    cache = PrefixCache()
    agdecode.generate(model, tok, convs(), prefix_cache=cache, **KW)  # ROI: system
    hits = cache.stats()["hits"]
    other = agdecode.generate(model, tok, convs(), prefix_cache=cache, roi=roi, **KW)
    for a, b in zip(agdecode.generate(model, tok, convs(), prefix_cache=False, roi=roi, **KW), other):
        same(a, b)
    # Nothing of the first call's entry serves (its tangents are the system ROI's): the second call's
    # first conversation computes its own, which its other two reuse.
    assert cache.stats()["hits"] - hits == 2


def test_the_cache_is_bounded_and_least_recently_used_goes_first(llama):
    model, tok = llama
    probe = PrefixCache()
    agdecode.generate(model, tok, convs()[0], prefix_cache=probe, **KW)
    one = probe.nbytes
    assert one > 0
    cache = PrefixCache(max_bytes=int(one * 1.5))  # room for one entry
    for system in ("A. " + SYSTEM, "B. " + SYSTEM):
        agdecode.generate(model, tok, convs(system)[0], prefix_cache=cache, **KW)
    assert len(cache) == 1 and cache.nbytes <= cache.max_bytes and cache.stats()["evictions"] == 1
    agdecode.generate(model, tok, convs("B. " + SYSTEM)[1], prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 1  # the newer one stayed
    tiny = PrefixCache(max_bytes=one // 4)  # not one block fits: nothing kept, nothing breaks
    agdecode.generate(model, tok, convs(), prefix_cache=tiny, **KW)
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_padded_groups_store_and_reuse_their_own_columns(llama, monkeypatch):
    # A GPU prefills all prompts as one left-padded group; emulate that here: each prompt's entry is
    # its own columns, and a prompt with a cached prefix leaves the group. Padding changes rounding
    # (an unpadded prompt computes in other shapes), so here the check is closeness and equal tokens.
    from agdecode.engines import forward

    model, tok = llama
    monkeypatch.setattr(forward, "prefill_groups", lambda device, n: [slice(0, n)] if n else [])
    cache = PrefixCache()
    systems = [SYSTEM, "Other. " + SYSTEM, SYSTEM]
    batch = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s, q in zip(systems, QUESTIONS)]
    agdecode.generate(model, tok, batch, prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 0 and len(cache) == 2  # one group, looked up before it ran
    again = agdecode.generate(model, tok, batch, prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 3
    for a, b in zip(agdecode.generate(model, tok, batch, prefix_cache=False, **KW), again):
        assert a.token_ids == b.token_ids
        for sa, sb in zip(a.steps, b.steps):
            for ca, cb in zip(sa.candidates, sb.candidates):
                assert ca.scores["system"] == pytest.approx(cb.scores["system"], rel=1e-4, abs=1e-5)


def test_bad_prefix_cache_arguments(llama):
    model, tok = llama
    with pytest.raises(AgdError, match="prefix_cache must be a PrefixCache"):
        agdecode.generate(model, tok, convs()[0], prefix_cache="yes", **KW)
    with pytest.raises(AgdError, match="max_bytes must be an integer >= 0"):
        PrefixCache(max_bytes=-1)
    # Sources without reuse (greedy, baselines, the reverse engine) take a cache and ignore it.
    cache = PrefixCache()
    agdecode.generate(model, tok, convs(), prefix_cache=cache, method="greedy", max_new_tokens=2)
    agdecode.generate(model, tok, convs()[0], prefix_cache=cache, **{**KW, "engine": "reverse"})
    assert len(cache) == 0 and cache.stats()["hits"] == cache.stats()["misses"] == 0


def test_prompts_that_share_nothing_with_an_entry_miss_quietly(llama):
    # No token in common (a template without a BOS token, a raw prompt), or a one-token prompt.
    from agdecode.engines import make_engine
    from agdecode.sources import Row

    model, _ = llama
    cache = PrefixCache()

    def row(ids):
        ids = torch.tensor(ids)
        return Row(ids, token_weights=torch.ones(1, len(ids)))

    with make_engine("forward", model) as engine:
        engine.use_prefix_cache(cache)
        engine.prefill([row(list(range(10, 210)))])
        assert len(cache) == 1
        engine.prefill([row(list(range(300, 320))), row([5]), row(list(range(400, 700)))])
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 4 and len(cache) == 2


def test_a_prompt_larger_than_the_cache_keeps_the_blocks_that_fit_and_drops_nothing_else(llama):
    model, tok = llama
    probe = PrefixCache()
    agdecode.generate(model, tok, convs()[0], prefix_cache=probe, **KW)  # ~2 blocks of the system prompt
    per_block = probe.nbytes // (probe._entries[next(iter(probe._entries))].ids.shape[0] // 128)
    cache = PrefixCache(max_bytes=2 * per_block)
    agdecode.generate(model, tok, convs()[0], prefix_cache=cache, **KW)
    longer = [{"role": "system", "content": SYSTEM + " " + SYSTEM[:600]}, {"role": "user", "content": "Hi"}]
    agdecode.generate(model, tok, longer, prefix_cache=cache, **KW)  # 3+ blocks: only 2 fit
    assert len(cache) == 1 and cache.nbytes <= cache.max_bytes
    agdecode.generate(model, tok, convs()[1], prefix_cache=cache, **KW)
    assert cache.stats()["hits"] >= 2  # the shared system prompt is still there


def test_a_list_of_raw_prompts_is_a_batch(llama):
    model, tok = llama
    prompts = ["The capital of France is", "Cats are"]
    both = agdecode.generate(model, tok, prompts, roi="chars:0-4", **KW)
    assert [r.token_ids for r in both] == [agdecode.generate(model, tok, p, roi="chars:0-4", **KW).token_ids
                                           for p in prompts]
    from agdecode import hf

    inputs = hf.prepare(tok, prompts, roi="chars:0-5")
    assert inputs["input_ids"].shape[0] == 2 and inputs["roi_mask"].sum(-1).min() > 0


def test_entries_go_stale_when_the_weights_change_in_place(tokenizer):
    # An optimiser step (an in-place update under no_grad) between two calls: nothing old is reused.
    model = make_tiny("llama", len(tokenizer))
    cache = PrefixCache()
    agdecode.generate(model, tokenizer, convs()[0], prefix_cache=cache, **KW)
    agdecode.generate(model, tokenizer, convs()[1], prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 1
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    fresh = agdecode.generate(model, tokenizer, convs()[2], prefix_cache=cache, **KW)
    assert cache.stats()["hits"] == 1  # a miss: the entry was made with the old weights
    same(fresh, agdecode.generate(model, tokenizer, convs()[2], prefix_cache=False, **KW))


def test_entries_are_not_shared_between_engines_of_other_chunk_sizes(llama):
    from agdecode.engines.forward import ForwardEngine
    from agdecode.sources import Row

    model, _ = llama
    cache = PrefixCache()
    ids = torch.arange(10, 400)
    for chunk in (128, 64):
        with ForwardEngine(model, prefill_chunk=chunk) as engine:
            engine.use_prefix_cache(cache)
            engine.prefill([Row(ids, token_weights=torch.ones(1, len(ids)))])
    assert cache.stats()["hits"] == 0 and len(cache) == 2
