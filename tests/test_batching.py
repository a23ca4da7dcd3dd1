"""Batched decoding: each conversation in a batch decodes exactly as it would alone."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from agdecode import generate, render_prompt
from agdecode.decoding import AGDConfig, Decoder, Job
from agdecode.methods import engine_row
from agdecode.errors import AgdError
from agdecode.roi import resolve_region
from agdecode.sources import CachedForward, Row
from conftest import make_tiny

CONVS = [
    [{"role": "system", "content": "Always answer in French."}, {"role": "user", "content": "Tell me about cats."}],
    [{"role": "system", "content": "You are a pirate. Always talk like a pirate, with many arrs and ahoys."},
     {"role": "user", "content": "How are you today? Tell me about your ship and your crew, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
]
DOCS = [
    [{"title": "Paris", "text": "Paris is the capital of France."}],
    [{"title": "Ships", "text": "A ship has a hull."}, {"title": "Sea", "text": "The sea is large and salty."}],
    [{"title": "Sky", "text": "The sky is blue."}],
]


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


def _close_scores(batched, single, rel=1e-4):
    """Every step's candidate scores agree to ``rel`` of the step's largest score."""
    assert len(batched.steps) == len(single.steps)
    for s, t in zip(batched.steps, single.steps):
        assert s.reason == t.reason
        for c, d in zip(s.candidates, t.candidates):
            assert c.token_id == d.token_id
            assert (c.scores is None) == (d.scores is None)
            if c.scores is None:
                continue
            for name in c.scores:
                scale = max(abs(x.scores[name]) for x in t.candidates if x.scores) or 1e-6
                assert abs(c.scores[name] - d.scores[name]) <= rel * max(scale, 1e-6)


def _assert_batch_equals_singles(model, tok, convs, documents=None, **kw):
    batched = generate(model, tok, convs, documents=documents, **kw)
    assert isinstance(batched, list) and len(batched) == len(convs)
    for n, (conv, out) in enumerate(zip(convs, batched)):
        alone = generate(model, tok, conv, documents=None if documents is None else documents[n], **kw)
        assert out.token_ids == alone.token_ids, f"conversation {n}"
        _close_scores(out, alone)
    return batched


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_batch_equals_single_on_every_architecture(tiny, engine):
    arch, model, tok = tiny
    _assert_batch_equals_singles(model, tok, CONVS, k=4, min_prob=0.0, max_new_tokens=6, engine=engine,
                                 roi=["system", "user"])


@pytest.mark.parametrize("blocks", ["whole batch (GPU)", "one head of one sequence"])
def test_attention_blocks_do_not_change_the_output(tiny, monkeypatch, blocks):
    """The forward engine's attention runs in blocks (on a CPU: one sequence and the key heads that
    fit a budget; on a GPU: the whole batch), and its prefill in groups (on a CPU: each sequence at
    its own length; on a GPU: the whole batch, left-padded); the GPU's way decodes exactly as the CPU's."""
    import agdecode.engines.forward as forward

    arch, model, tok = tiny
    kw = dict(method="agd", max_new_tokens=5, entropy_threshold=0.0, engine="forward", roi=["system", "heads:0.1,1.3"])
    default = generate(model, tok, CONVS, **kw)
    if blocks.startswith("whole"):
        monkeypatch.setattr(forward, "_attention_blocks", lambda device, b, hkv, head_bytes: (b, hkv))
        monkeypatch.setattr(forward, "prefill_groups", lambda device, n: [slice(0, n)])
    else:
        monkeypatch.setattr(forward, "CPU_ATTENTION_BLOCK_BYTES", 1)
    for out, ref in zip(generate(model, tok, CONVS, **kw), default):
        assert out.token_ids == ref.token_ids
        _close_scores(out, ref, rel=1e-5)


def test_batch_equals_single_forward_ad(tiny):
    arch, model, tok = tiny
    _assert_batch_equals_singles(model, tok, CONVS[:2], k=3, min_prob=0.0, max_new_tokens=3, engine="forward-ad")


@pytest.mark.parametrize("roi", ["context", "context - user", "document:1 | system", "heads:0.1,1.3",
                                 "heads:1.0 + context"])
def test_batch_equals_single_for_context_and_head_rois(tiny, roi):
    arch, model, tok = tiny
    _assert_batch_equals_singles(model, tok, CONVS, documents=DOCS, roi=[roi, "system"], k=4, min_prob=0.0,
                                 max_new_tokens=5)


@pytest.mark.parametrize("method", ["greedy", "cad", "dola", "sample"])
def test_batch_equals_single_for_baselines(tiny, method):
    arch, model, tok = tiny
    _assert_batch_equals_singles(model, tok, CONVS, method=method, max_new_tokens=6)


def test_rows_finish_at_different_steps_and_others_are_unchanged(llama):
    model, tok = llama
    eos = tok.eos_token_id
    # Row 1 stops after 2 tokens (its own budget), row 0 at a stop criterion, row 2 runs on.
    jobs_cfg = AGDConfig(k=3, min_prob=0.0, max_new_tokens=8)
    alone = [generate(model, tok, c, config=jobs_cfg) for c in CONVS]
    dec = Decoder(model, tok, jobs_cfg)
    jobs = []
    for n, conv in enumerate(CONVS):
        prompt = render_prompt(tok, conv)
        region = resolve_region("system", prompt, model)
        jobs.append(Job(engine_row(prompt.input_ids[0], [region]), [region], prompt,
                        max_new_tokens=2 if n == 1 else 8))
    sizes = []
    with dec:
        dec.add(jobs)
        while dec.jobs:
            sizes.append(dec.source.kv.cache.layers[0].keys.shape[0])
            dec.step()
    assert jobs[1].out_ids == alone[1].token_ids[:2] and jobs[1].finish_reason == "length"
    assert jobs[0].out_ids == alone[0].token_ids and jobs[2].out_ids == alone[2].token_ids
    # 3 sequences x 2 rows (primal + 1 tangent) until row 1 leaves, then 2 x 2: the cache shrank.
    assert sizes[0] == 6 and sizes[2] == 4 and eos is not None


def test_a_finished_row_is_removed_from_the_cache_and_memory_released(llama):
    model, tok = llama
    prompts = [render_prompt(tok, c).input_ids[0] for c in CONVS]
    with CachedForward(model) as src:
        src.prefill([Row(p) for p in prompts])
        layer = src.kv.cache.layers[0]
        before = layer.keys.untyped_storage().nbytes()
        src.keep(torch.tensor([2, 0]))
        after = layer.keys.untyped_storage().nbytes()
        assert layer.keys.shape[0] == 2 and after < before
        # The short row 2 was the only reason for nothing: the longest kept row (0) has no padding.
        assert src.kv.mask.shape[1] == max(len(prompts[0]), len(prompts[2]))
        logits = src.step(torch.tensor([5, 7]))
    with CachedForward(model) as alone:
        alone.prefill([Row(prompts[0])])
        ref = alone.step(torch.tensor([7]))
    torch.testing.assert_close(logits[1], ref[0], rtol=1e-4, atol=1e-5)


def test_sequences_join_a_running_batch(llama):
    model, tok = llama
    cfg = AGDConfig(k=3, min_prob=0.0, max_new_tokens=6)
    alone = [generate(model, tok, c, config=cfg) for c in CONVS]
    dec = Decoder(model, tok, cfg)

    def job(conv):
        prompt = render_prompt(tok, conv)
        region = resolve_region("system", prompt, model)
        return Job(engine_row(prompt.input_ids[0], [region]), [region], prompt, 6)

    jobs = [job(c) for c in CONVS]
    with dec:
        dec.add(jobs[:1])
        dec.step()
        dec.step()
        dec.add(jobs[1:])  # joins after two steps of the first
        while dec.jobs:
            dec.step()
    for j, ref in zip(jobs, alone):
        assert j.out_ids == ref.token_ids


def test_batch_size_caps_rows_and_keeps_order(llama):
    model, tok = llama
    convs = CONVS * 2
    outs = generate(model, tok, convs, k=3, min_prob=0.0, max_new_tokens=4, batch_size=2)
    ref = generate(model, tok, convs, k=3, min_prob=0.0, max_new_tokens=4, batch_size=6)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [o.prompt for o in outs] == [render_prompt(tok, c).text for c in convs]


def test_repetition_penalty_acts_before_the_gate_and_the_candidates(llama):
    """AGD's entropy, candidate probabilities and greedy token come from the processed logits."""
    model, tok = llama
    conv = CONVS[0]
    out = generate(model, tok, conv, k=4, min_prob=0.0, max_new_tokens=4, repetition_penalty=1.5)
    # Hand computation: the model's logits on the prompt + the tokens emitted so far, penalised.
    ids = render_prompt(tok, conv).input_ids[0].tolist()
    for step in out.steps:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        seen = torch.tensor(sorted(set(ids)))
        v = logits[seen]
        logits[seen] = torch.where(v < 0, v * 1.5, v / 1.5)
        probs = torch.softmax(logits, -1)
        top_p, top_i = probs.topk(4)
        assert [c.token_id for c in step.candidates] == top_i.tolist()
        assert [c.prob for c in step.candidates] == pytest.approx(top_p.tolist(), rel=1e-4)
        logp = torch.log_softmax(logits, -1)
        assert step.entropy == pytest.approx(float(-(logp.exp() * logp).sum()), rel=1e-4)
        ids.append(step.chosen_id)
    # The same through a user-supplied LogitsProcessorList.
    via_list = generate(model, tok, conv, k=4, min_prob=0.0, max_new_tokens=4,
                        logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    assert via_list.token_ids == out.token_ids


def test_stop_strings_end_a_row_at_the_right_token(llama):
    model, tok = llama
    free = generate(model, tok, CONVS[0], method="greedy", max_new_tokens=12)
    # Stop at the text of the 5th generated token: the row must end right there.
    target = free.tokens[4]
    assert target.strip(), "pick a prompt whose 5th token has text"
    stopped = generate(model, tok, CONVS[0], method="greedy", max_new_tokens=12, stop_strings=[target])
    first = next(i for i in range(12) if tok.decode(free.token_ids[: i + 1]).endswith(target))
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.extra["finish_reason"] == "stop"
    # In a batch, only that row stops there.
    both = generate(model, tok, [CONVS[0], CONVS[2]], method="greedy", max_new_tokens=12, stop_strings=[target])
    assert both[0].token_ids == stopped.token_ids


@pytest.mark.parametrize("call, match", [
    (lambda m, t: generate(m, t, []), "messages must be a non-empty list"),
    (lambda m, t: generate(m, t, [CONVS[0], []]), "conversation 1: messages must be a non-empty list"),
    (lambda m, t: generate(m, t, CONVS, documents=DOCS[:2]), "documents has 2 entries for 3 conversations"),
    (lambda m, t: generate(m, t, CONVS, batch_size=0), "batch_size must be an integer >= 1"),
    (lambda m, t: generate(m, t, CONVS, k=10**9), "larger than the model's vocabulary"),
    (lambda m, t: generate(m, t, CONVS, stop_strings="x"), "stop_strings must be a non-empty list"),
    (lambda m, t: generate(m, t, CONVS, tempreature=1.0), "unknown generation setting"),
])
def test_bad_batched_calls_fail_before_any_compute(llama, monkeypatch, call, match):
    model, tok = llama
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(AgdError, match=match):
        call(model, tok)
    assert not calls


def test_config_keywords_override_the_config(llama):
    model, tok = llama
    out = generate(model, tok, CONVS[0], config=AGDConfig(k=5, max_new_tokens=2), k=3, max_new_tokens=7,
                   min_new_tokens=7)
    assert out.config["k"] == 3 and len(out.token_ids) == 7


@pytest.mark.parametrize("positive", [False, True])
def test_batched_attribution_equals_one_sequence_at_a_time(tiny, positive):
    from agdecode.engines.reverse import attribute, attribute_batch

    arch, model, tok = tiny
    seqs = [render_prompt(tok, c).input_ids[0] for c in CONVS]
    targets = torch.tensor([5, 17, 300])
    tok_rel, head_rel = attribute_batch(model, seqs, targets, positive=positive)
    for n, s in enumerate(seqs):
        t, h = attribute(model, s[None], targets[n : n + 1], heads=True, positive=positive)
        torch.testing.assert_close(tok_rel[n], t[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(head_rel[n], h[0], rtol=1e-4, atol=1e-6)


def test_head_discovery_does_not_depend_on_the_batch_size(llama):
    from agdecode.discovery import discover_heads

    model, tok = llama
    a = discover_heads(model, tok, n_items=5, top=3, batch_size=1)
    b = discover_heads(model, tok, n_items=5, top=3, batch_size=4)
    torch.testing.assert_close(torch.tensor(a["scores"]["D"]), torch.tensor(b["scores"]["D"]), rtol=1e-4, atol=1e-6)
    assert a["top"] == b["top"]


def test_cli_input_jsonl_writes_one_result_per_line_and_resumes(tokenizer, tmp_path, capsys):
    from agdecode.cli import main

    d = tmp_path / "m"
    model = make_tiny("llama", len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    lines = [{"id": "a", "messages": CONVS[0]}, CONVS[1], {"messages": CONVS[2], "documents": DOCS[2], "id": "c"}]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(d), "--dtype", "float32", "--input", str(f), "--output", str(out), "--max-new-tokens", "3",
            "--k", "3", "--min-prob", "0", "--batch-size", "2"]
    assert main(args) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a", "2", "c"]
    ref = generate(model, tokenizer, CONVS[0], k=3, min_prob=0.0, max_new_tokens=3)
    assert recs[0]["token_ids"] == ref.token_ids and recs[0]["text"] == ref.text
    # Resume: a torn last line is redone, finished ones are kept.
    out.write_text("\n".join(out.read_text().splitlines()[:1]) + '\n{"id": "2", "te')
    assert main(args) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines() if x.strip().endswith("}")]
    assert sorted(r["id"] for r in recs) == ["2", "a", "c"]
    # A bad line is named before the model loads.
    f.write_text(json.dumps(lines[0]) + "\n{not json\n" + json.dumps({"messages": "hi"}) + "\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 bad line(s): line 2: not JSON" in err and "line 3: expected a list" in err


def test_chat_template_kwargs_reach_the_template(llama):
    model, tok = llama
    template = tok.chat_template
    tok.chat_template = "{% if shout %}LOUD {% endif %}" + template
    try:
        loud = generate(model, tok, CONVS[0], method="greedy", max_new_tokens=1, chat_template_kwargs={"shout": True})
        quiet = generate(model, tok, CONVS[0], method="greedy", max_new_tokens=1)
    finally:
        tok.chat_template = template
    assert loud.prompt.startswith("LOUD ") and not quiet.prompt.startswith("LOUD ")


def test_decoders_with_other_settings_take_turns_on_one_model(llama):
    """Sources patch the model per call: two decoders (1 and 2 ROIs, and a steered baseline) interleave."""
    model, tok = llama
    cfgs = [AGDConfig(k=3, min_prob=0.0, max_new_tokens=5, roi="system"),
            AGDConfig(k=3, min_prob=0.0, max_new_tokens=5, roi=["user", "system"]),
            AGDConfig(method="steer", steer_vector=torch.ones(64) * 0.5, max_new_tokens=5)]
    alone = [generate(model, tok, CONVS[n], config=c) for n, c in enumerate(cfgs)]
    from agdecode.decoding import make_jobs

    decs = [Decoder(model, tok, c) for c in cfgs]
    jobs = [make_jobs(model, tok, c, [CONVS[n]])[0] for n, c in enumerate(cfgs)]
    for d, j in zip(decs, jobs):
        d.__enter__()
        d.add([j])
    while any(d.jobs for d in decs):
        for d in decs:
            if d.jobs:
                d.step()
    for d in decs:
        d.__exit__(None, None, None)
    assert [j.out_ids for j in jobs] == [a.token_ids for a in alone]
    assert not any("forward" in vars(m) for m in model.modules())  # nothing left patched


def test_kv_cache_appends_in_place_and_equals_concatenation():
    """KVBatch's cache layers write into spare room instead of concatenating; whatever happens to
    them (appends past the room, rows kept, keys replaced from outside, a crop) they hold what
    concatenation would."""
    from agdecode.sources import _growing_cache_class

    cache = _growing_cache_class()()
    torch.manual_seed(0)
    ref = None
    for step, t in enumerate([5, 1, 1, 70, 1, 1, 200, 1]):
        new = torch.randn(4 if step <= 4 else 2, 2, t, 3)
        keys, values = cache.update(new, -new, 0)
        ref = new if ref is None else torch.cat([ref, new], dim=2)
        torch.testing.assert_close(keys, ref, rtol=0, atol=0)
        torch.testing.assert_close(values, -ref, rtol=0, atol=0)
        assert cache.get_seq_length() == ref.shape[2]
        if step == 1:  # an append that fits reuses the buffer
            buffer = keys.data_ptr()
        if step == 2:
            assert keys.data_ptr() == buffer
        if step == 4:  # keys and values replaced from outside by a copy of some rows, not through replace()
            layer = cache.layers[0]
            layer.keys, layer.values = layer.keys[[0, 2]].contiguous(), layer.values[[0, 2]].contiguous()
            ref = ref[[0, 2]]
        if step == 6:  # ... or through replace(), which frees the old buffers at once
            layer.replace(layer.keys[[1, 0]].contiguous(), layer.values[[1, 0]].contiguous())
            assert layer._key_buffer is None and layer._value_buffer is None
            ref = ref[[1, 0]]
    cache.crop(-3)
    ref = ref[:, :, :-3]
    new = torch.randn(2, 2, 1, 3)
    keys, _ = cache.update(new, -new, 0)
    torch.testing.assert_close(keys, torch.cat([ref, new], dim=2), rtol=0, atol=0)


def test_kv_merge_of_parts_equals_one_padded_prefill(llama):
    """Sequences run apart (``KVBatch.run``) and merged in one copy, some joining a running batch,
    decode as the same sequences prefilled together, left-padded."""
    from agdecode.sources import KVBatch, left_pad

    model, tok = llama
    prompts = [render_prompt(tok, c).input_ids[0] for c in CONVS]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        together = KVBatch(model)
        ids, mask = left_pad(prompts)
        together.prefill(embed(ids), mask)
        apart = KVBatch(model, prefill_chunk=4)
        apart.prefill(embed(prompts[2][None]), torch.ones(1, len(prompts[2]), dtype=torch.long))
        apart.merge([apart.run(embed(p[None]), torch.ones(1, len(p), dtype=torch.long))[1] for p in prompts[:2]])
        apart.keep(torch.tensor([1, 2, 0]))   # back to the order of ``together``
        assert apart.mask.tolist() == together.mask.tolist()
        nxt = embed(torch.tensor([[5], [6], [7]]))
        torch.testing.assert_close(apart.step(nxt).logits, together.step(nxt).logits, rtol=1e-4, atol=1e-5)
