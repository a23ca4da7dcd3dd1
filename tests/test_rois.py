"""Context, document and attention-head ROIs, and ROI expressions, in both engines."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from agdecode import ROIError, render_prompt
from agdecode.engines import make_engine
from agdecode.sources import Row
from agdecode.engines.reverse import attribute
from agdecode.heads import head_mask
from agdecode.roi import resolve_region
from conftest import ARCHS, GOLDEN
from test_rules import assert_close_rel

DOCS = [{"title": "Cats", "text": "Cats are small carnivorous mammals kept as pets."},
        {"title": "Paris", "text": "Paris is the capital of France."}]
MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("arch", ARCHS)
def test_head_relevance_matches_reference(arch):
    d = json.loads((GOLDEN / arch / "golden.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / arch, attn_implementation="eager").eval()
    targets = torch.tensor([t["target"] for t in d["targets"]])
    tok, heads = attribute(model, torch.tensor([d["input_ids"]]), targets, "lrp", heads=True)
    for i, t in enumerate(d["targets"]):
        assert_close_rel(heads[i], t["head_relevance"])
        assert_close_rel(tok[i], t["token_relevance"])


def _scores(model, tok, spec, engine, steps=3, k=5, attribution="lrp"):
    prompt = render_prompt(tok, MSGS, documents=DOCS)
    region = resolve_region(spec, prompt, model)
    heads = None if region.heads is None else region.heads[None]
    out = []
    with make_engine(engine, model, 1, attribution, heads is not None) as eng:
        logits = eng.prefill([Row(prompt.input_ids[0], region.tokens[None], heads)])
        for _ in range(steps):
            top = logits.topk(k).indices                                 # (1, k)
            out.append(eng.scores(top, torch.tensor([0]))[0, 0].float())
            logits = eng.step(top[:, 0])
    return torch.stack(out)


def _close(a, b, rel=1e-4):
    scale = b.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    assert ((a - b).abs() / scale).max().item() < rel


@pytest.mark.parametrize("spec", ["heads:0.1,1.3", "context - user", "document:2 | system", "heads:1.0 + context"])
def test_forward_equals_reverse_for_context_and_head_rois(tiny, spec):
    arch, model, tok = tiny
    _close(_scores(model, tok, spec, "forward"), _scores(model, tok, spec, "reverse"))


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_context_score_is_the_relevance_map_summed_over_the_documents(tiny, engine):
    """Against an independent computation: plain autograd under the rules (test_rules._relevances), not the
    engines' own ``attribute``."""
    from test_rules import _relevances

    arch, model, tok = tiny
    prompt = render_prompt(tok, MSGS, documents=DOCS)
    cands = torch.tensor([5, 17, 300])
    doc_mask = torch.zeros(len(prompt), dtype=torch.bool)
    for a, b in prompt.document_spans:
        doc_mask |= prompt.tokens_in_chars(a, b)
    assert doc_mask.sum() > 10
    expected = torch.stack([_relevances(model, prompt.input_ids, int(c), lrp=True)[1][doc_mask].sum() for c in cands])
    with make_engine(engine, model) as eng:
        eng.prefill([Row(prompt.input_ids[0], resolve_region("context", prompt).tokens[None])])
        _close(eng.scores(cands[None], torch.tensor([0]))[0].float(), expected[None].float(), rel=1e-4)


def test_document_spans_and_roles(tokenizer):
    prompt = render_prompt(tokenizer, MSGS, documents=DOCS)
    assert [prompt.text[a:b] for a, b in prompt.document_spans] == [
        "Cats) Cats are small carnivorous mammals kept as pets.", "Paris) Paris is the capital of France."]
    user = resolve_region("user", prompt).tokens.bool()
    assert tokenizer.decode(prompt.input_ids[0][user]) == "What is the capital of France?"
    contrast = resolve_region("+context - user", prompt).tokens
    assert set(contrast.unique().tolist()) == {-1.0, 0.0, 1.0}
    both = resolve_region("context | document:1", prompt).tokens
    assert torch.equal(both, resolve_region("context", prompt).tokens)


@pytest.mark.parametrize("spec, match", [
    ("heads:9.0", "layer out of range; the model has 2 layers"),
    ("heads:0.7", "head out of range; the model has 4 heads"),
    ("heads:x.y", "Cannot parse head ROI"),
    ("heads:parametric", "No shipped 'parametric' head set"),
    ("heads:missing.json", "not found"),
    ("document:3", "there are 2 documents"),
    ("context - context", "selects nothing"),
])
def test_bad_head_and_document_rois(tiny, spec, match):
    arch, model, tok = tiny
    with pytest.raises(ROIError, match=match):
        resolve_region(spec, render_prompt(tok, MSGS, documents=DOCS), model)


def test_context_roi_without_documents(tiny):
    arch, model, tok = tiny
    with pytest.raises(ROIError, match="needs documents"):
        resolve_region("context", render_prompt(tok, MSGS), model)


def test_head_mask_from_discovery_file(tiny, tmp_path):
    arch, model, tok = tiny
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"kind": "parametric", "top": {"parametric": [[1, 2], [0, 0]], "in-context": [[1, 1]]}}))
    assert head_mask(str(f), model).nonzero().tolist() == [[0, 0], [1, 2]]
    assert head_mask(f"{f}#in-context", model).nonzero().tolist() == [[1, 1]]


def test_generate_with_documents_context_and_head_rois(tiny):
    from agdecode import generate

    arch, model, tok = tiny
    out = generate(model, tok, MSGS, documents=DOCS, roi=["context - user", "heads:0.1,1.2", "document:2"],
                   k=3, min_prob=0.0, max_new_tokens=3)
    assert "Document [2](Title: Paris)" in out.prompt
    assert set(out.steps[0].candidates[0].scores) == {"context - user", "heads:0.1,1.2", "document:2"}
    assert out.extra["roi_heads"] == {"heads:0.1,1.2": [[0, 1], [1, 2]]}
    assert out.roi_positions["document:2"] and set(out.roi_positions["document:2"]) < set(out.roi_positions["context - user"])
    rev = generate(model, tok, MSGS, documents=DOCS, roi=["context - user", "heads:0.1,1.2", "document:2"],
                   k=3, min_prob=0.0, max_new_tokens=3, engine="reverse")
    assert rev.token_ids == out.token_ids


def test_generate_ids_without_tokenizer_and_min_new_tokens(tiny):
    from agdecode import AGDConfig
    from agdecode.decoding import generate_ids

    arch, model, tok = tiny
    ids = torch.randint(10, 1000, (1, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(30, dtype=torch.bool)
    mask[:8] = True
    model.generation_config.eos_token_id = None
    logits = model(ids).logits[0, -1]
    model.generation_config.eos_token_id = int(logits.argmax())  # greedy would stop at once
    try:
        out = generate_ids(model, ids, {"roi": mask}, AGDConfig(k=1, max_new_tokens=5, min_new_tokens=5))
    finally:
        model.generation_config.eos_token_id = None
    # min_new_tokens holds end-of-sequence back, as in transformers: the greedy first token is not chosen.
    assert len(out.token_ids) == 5 and int(logits.argmax()) not in out.token_ids
    assert out.roi_positions == {"roi": list(range(8))} and out.tokens == [""] * 5


def test_generate_ids_greedy_without_a_source(tiny):
    from agdecode import AGDConfig
    from agdecode.decoding import generate_ids

    arch, model, tok = tiny
    ids = torch.randint(10, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    out = generate_ids(model, ids, {}, AGDConfig(method="greedy", max_new_tokens=3, min_new_tokens=3))
    assert out.token_ids[0] == int(model(ids).logits[0, -1].argmax())
