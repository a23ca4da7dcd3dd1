"""AttnLRP rules against the upstream reference relevances, and the rules context's hygiene."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from agdecode import attnlrp, get_adapter
from conftest import ARCHS, GOLDEN, make_tiny


def _golden(arch):
    d = json.loads((GOLDEN / arch / "golden.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / arch, attn_implementation="eager").eval()
    return model, torch.tensor([d["input_ids"]]), d["targets"]


def _relevances(model, ids, target, lrp: bool):
    """Token relevance (embeddings) and head relevance (o_proj inputs) of one logit."""
    acts, hooks = {}, []
    for i, layer in enumerate(get_adapter(model).layers(model)):
        def keep(mod, args, i=i):
            args[0].retain_grad()
            acts[i] = args[0]
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep))
    try:
        with attnlrp(model) if lrp else torch.enable_grad():
            x = model.get_input_embeddings()(ids).detach().requires_grad_()
            logit = model(inputs_embeds=x).logits[0, -1, target]
            logit.backward()
    finally:
        for h in hooks:
            h.remove()
    n_heads = model.config.num_attention_heads
    tok = (x * x.grad).sum(-1)[0]
    heads = torch.stack([(a * a.grad).view(*a.shape[:2], n_heads, -1).sum(-1).sum((0, 1)) for a in acts.values()])
    return logit.item(), tok, heads


@pytest.mark.parametrize("arch", ARCHS)
def test_rules_match_reference_attnlrp(arch):
    model, ids, targets = _golden(arch)
    for t in targets:
        logit, tok, heads = _relevances(model, ids, t["target"], lrp=True)
        assert logit == pytest.approx(t["logit"], abs=1e-5)
        torch.testing.assert_close(tok, torch.tensor(t["token_relevance"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(heads, torch.tensor(t["head_relevance"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_input_x_gradient_differs_from_reference(arch):
    model, ids, targets = _golden(arch)
    t = targets[0]
    _, tok, heads = _relevances(model, ids, t["target"], lrp=False)
    gap = max((tok - torch.tensor(t["token_relevance"])).abs().max().item(),
              (heads - torch.tensor(t["head_relevance"])).abs().max().item())
    assert gap > 1e-2  # I x G is a different method; the golden test above really checks the rules


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rules_change_no_logits_and_restore_model(arch, attn):
    model = make_tiny(arch, vocab_size=97, attn=attn)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_attrs = {id(m): dict(vars(m)) for m in model.modules()}
    with torch.no_grad():
        before = model(ids).logits
        with attnlrp(model):
            inside = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=1e-6)
    assert torch.equal(after, before)
    assert model.config._attn_implementation == attn
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k])
    for m in model.modules():  # no instance override left behind
        assert set(vars(m)) == set(before_attrs[id(m)])
        assert "forward" not in vars(m) and "_norm" not in vars(m)


def test_rules_restore_model_after_an_exception():
    model = make_tiny("llama", vocab_size=97)
    with pytest.raises(RuntimeError, match="boom"):
        with attnlrp(model):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_architecture_is_refused_with_the_supported_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    from agdecode import UnsupportedArchitectureError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*gemma3.*llama.*qwen2.*qwen3"):
        with attnlrp(model):
            pass
