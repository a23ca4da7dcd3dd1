"""Forward-mode engines against the reverse-mode oracle; the rules' jvp against their backward."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from agdecode import generate, render_prompt, resolve_roi
from agdecode.engines import make_engine
from agdecode.engines.forward import ForwardEngine
from agdecode.sources import Row
from agdecode.rules import identity_rule, uniform_rule

PROMPTS = [
    [{"role": "system", "content": "Always answer in French."}, {"role": "user", "content": "Tell me about cats."}],
    [{"role": "system", "content": "You are a pirate. Always talk like a pirate."},
     {"role": "user", "content": "How are you today?"}],
    [{"role": "system", "content": "Answer in one word only."},
     {"role": "user", "content": "What color is the sky on a clear day?"}],
]


def _scores_along_greedy(model, tok, messages, engine, attribution, steps=4, k=5, rois=("system",)):
    """ROI scores of the top-k tokens at several steps of one cached generation."""
    prompt = render_prompt(tok, messages)
    masks = torch.stack([resolve_roi(r, prompt) for r in rois])
    out = []
    with make_engine(engine, model, len(rois), attribution) as eng:
        logits = eng.prefill([Row(prompt.input_ids[0], masks)])
        for _ in range(steps):
            top = logits.topk(k).indices                                 # (1, k)
            out.append(eng.scores(top, torch.tensor([0]))[0].float())
            logits = eng.step(top[:, 0])
    return torch.stack(out)  # (steps, n_roi, k)


def _assert_relative(a, b, rel=1e-4):
    scale = b.abs().amax(-1, keepdim=True).clamp_min(1e-6)  # per step and ROI
    assert ((a - b).abs() / scale).max().item() < rel


@pytest.mark.parametrize("engine", ["forward", "forward-ad"])
@pytest.mark.parametrize("attribution", ["lrp", "ixg"])
def test_forward_engines_equal_reverse_on_every_architecture(tiny, messages, engine, attribution):
    arch, model, tok = tiny
    ref = _scores_along_greedy(model, tok, messages, "reverse", attribution)
    _assert_relative(_scores_along_greedy(model, tok, messages, engine, attribution), ref)


def test_multi_roi_pass_equals_single_roi_passes(tiny, messages):
    arch, model, tok = tiny
    both = _scores_along_greedy(model, tok, messages, "forward", "lrp", rois=("system", "user"))
    for r, roi in enumerate(("system", "user")):
        single = _scores_along_greedy(model, tok, messages, "forward", "lrp", rois=(roi,))
        torch.testing.assert_close(both[:, r], single[:, 0], rtol=1e-5, atol=1e-6)


def test_forward_engine_prefill_chunks_do_not_change_scores(tiny, messages):
    arch, model, tok = tiny
    prompt = render_prompt(tok, messages)
    mask = resolve_roi("system", prompt)[None]
    res = []
    for chunk in (4, 512):
        with ForwardEngine(model, 1, "lrp", prefill_chunk=chunk) as eng:
            logits = eng.prefill([Row(prompt.input_ids[0], mask)])
            res.append((logits, eng.last_scores.clone()))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-4, atol=1e-5)


def test_rules_jvp_is_the_transpose_of_their_backward():
    """<J v, w> == <v, J^T w> for each rule: forward and reverse mode compute the same attribution."""
    torch.manual_seed(0)
    x, v, w = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    for fn in (lambda t: identity_rule(torch.nn.functional.silu, t), lambda t: uniform_rule(t, 4.0)):
        with torch.no_grad(), fwAD.dual_level():
            jv = fwAD.unpack_dual(fn(fwAD.make_dual(x, v))).tangent
        xr = x.clone().requires_grad_()
        (jtw,) = torch.autograd.grad(fn(xr), xr, w)
        assert (jv * w).sum().item() == pytest.approx((v * jtw).sum().item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attribution", ["lrp", "ixg"])
def test_smollm2_forward_equals_reverse(smollm2, attribution):
    model, tok = smollm2
    ref = _scores_along_greedy(model, tok, PROMPTS[0], "reverse", attribution, steps=3)
    _assert_relative(_scores_along_greedy(model, tok, PROMPTS[0], "forward", attribution, steps=3), ref)


@pytest.mark.slow
@pytest.mark.parametrize("messages", PROMPTS, ids=["french", "pirate", "one-word"])
def test_smollm2_both_engines_produce_identical_agd_outputs(smollm2, messages):
    model, tok = smollm2
    fwd = generate(model, tok, messages, engine="forward", max_new_tokens=8)
    rev = generate(model, tok, messages, engine="reverse", max_new_tokens=8)
    assert fwd.token_ids == rev.token_ids
