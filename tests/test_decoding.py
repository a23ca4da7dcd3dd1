"""The AGD loop: greedy equivalences, candidate-only choices, determinism, traces, streamers."""
from __future__ import annotations

import pytest
import torch

import agdecode
from agdecode import GenerationResult, generate, render_prompt


def hf_greedy(model, tok, messages, n):
    ids = render_prompt(tok, messages).input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_k1_equals_model_generate_on_every_architecture(tiny, messages):
    arch, model, tok = tiny
    ref = hf_greedy(model, tok, messages, 12)
    out = generate(model, tok, messages, k=1, min_prob=0.0, max_new_tokens=12)
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) == len(ref)


def test_gate_above_every_entropy_equals_greedy(tiny, messages):
    arch, model, tok = tiny
    ref = hf_greedy(model, tok, messages, 12)
    out = generate(model, tok, messages, k=5, min_prob=0.0, entropy_threshold=1e9, max_new_tokens=12)
    assert out.token_ids == ref
    assert all(s.reason == "gate" for s in out.steps)


def test_agd_only_emits_candidates_and_is_deterministic(tiny, messages):
    arch, model, tok = tiny
    a = generate(model, tok, messages, k=4, min_prob=0.0, max_new_tokens=8)
    b = generate(model, tok, messages, k=4, min_prob=0.0, max_new_tokens=8)
    assert a.token_ids == b.token_ids
    assert a.guided_steps == len(a.steps)  # min_prob=0: every step has 4 candidates
    for step in a.steps:
        ids = [c.token_id for c in step.candidates]
        assert step.chosen_id in ids
        scores = [c.scores["system"] for c in step.candidates]
        assert step.chosen_id == ids[scores.index(max(scores))]  # the best ROI score wins


def test_ixg_attribution_runs_and_differs_in_scores(tiny, messages):
    arch, model, tok = tiny
    lrp = generate(model, tok, messages, k=3, min_prob=0.0, max_new_tokens=1)
    ixg = generate(model, tok, messages, k=3, min_prob=0.0, max_new_tokens=1, attribution="ixg")
    s_lrp = [c.scores["system"] for c in lrp.steps[0].candidates]
    s_ixg = [c.scores["system"] for c in ixg.steps[0].candidates]
    assert s_lrp != pytest.approx(s_ixg, rel=1e-3)


def test_roi_score_is_the_sum_of_the_relevance_map_over_the_roi(tiny, messages):
    arch, model, tok = tiny
    out = generate(model, tok, messages, k=3, min_prob=0.0, max_new_tokens=2, engine="reverse")
    pos = out.roi_positions["system"]
    for i, step in enumerate(out.steps):
        rel = torch.tensor(out.extra["relevance"][i])
        chosen = next(c for c in step.candidates if c.token_id == step.chosen_id)
        assert rel[pos].sum().item() == pytest.approx(chosen.scores["system"], rel=1e-5, abs=1e-6)


def test_single_and_no_candidate_steps_take_the_greedy_token(tiny, messages):
    arch, model, tok = tiny
    out = generate(model, tok, messages, k=5, min_prob=1.0, max_new_tokens=3)  # nothing reaches p=1
    assert all(s.reason == "no-candidate" and not s.overridden for s in out.steps)


def test_several_rois_are_scored_and_the_first_decides(tiny, messages):
    arch, model, tok = tiny
    out = generate(model, tok, messages, roi=["user", "system"], k=3, min_prob=0.0, max_new_tokens=3)
    assert set(out.roi_positions) == {"user", "system"}
    single = generate(model, tok, messages, roi="user", k=3, min_prob=0.0, max_new_tokens=3)
    assert out.token_ids == single.token_ids
    for s, t in zip(out.steps, single.steps):
        for c, d in zip(s.candidates, t.candidates):
            assert c.scores["user"] == pytest.approx(d.scores["user"], rel=1e-4, abs=1e-6)


def test_trace_round_trips_through_json(tiny, messages, tmp_path):
    arch, model, tok = tiny
    out = generate(model, tok, messages, k=3, min_prob=0.0, max_new_tokens=3)
    back = GenerationResult.load(out.save(tmp_path / "t.json"))
    assert back.token_ids == out.token_ids and back.text == out.text
    assert back.steps[0].candidates[0].scores == out.steps[0].candidates[0].scores
    assert back.overrides == out.overrides


def test_streamer_receives_prompt_then_each_token(tiny, messages):
    arch, model, tok = tiny

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = generate(model, tok, messages, k=2, min_prob=0.0, max_new_tokens=4, streamer=s)
    assert s.ended and s.chunks[0] == [out.prompt_ids]
    assert [c[0] for c in s.chunks[1:]] == out.token_ids


def test_hf_text_streamer_prints_the_text(tiny, messages, capsys):
    from transformers import TextStreamer

    arch, model, tok = tiny
    out = generate(model, tok, messages, k=2, min_prob=0.0, max_new_tokens=5,
                   streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out.strip() == out.text.strip()


# --- the real default model -----------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_k1_and_high_gate_equal_greedy(smollm2, messages):
    model, tok = smollm2
    ref = hf_greedy(model, tok, messages, 16)
    assert generate(model, tok, messages, k=1, max_new_tokens=16).token_ids == ref
    assert generate(model, tok, messages, entropy_threshold=100.0, max_new_tokens=16).token_ids == ref


@pytest.mark.slow
def test_smollm2_system_roi_is_exactly_the_system_text(smollm2, messages):
    model, tok = smollm2
    p = render_prompt(tok, messages)
    mask = agdecode.resolve_roi("system", p)
    assert tok.decode(p.input_ids[0][mask]) == "Always answer in French."
