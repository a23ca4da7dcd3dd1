"""Head discovery: deterministic, valid output, usable as a head ROI."""
from __future__ import annotations

import json

from agdecode.cli import main
from agdecode.discovery import discover_heads, discovery_items, plot_heads
from agdecode.heads import head_mask


def test_discovery_items_are_counterfactual_and_from_the_reserved_split():
    items = discovery_items(20)
    assert all(it["id"] >= 2000 for it in items)  # evaluation uses lines < 2000
    for it in items:
        assert it["answer"] in it["text"] and it["cf_answer"] in it["cf_text"]
        assert it["cf_answer"].lower() != it["answer"].lower()


def test_discovery_is_deterministic_and_writes_a_valid_file(tiny, tmp_path):
    arch, model, tok = tiny
    a = discover_heads(model, tok, n_items=4, top=3)
    b = discover_heads(model, tok, n_items=4, top=3)
    assert a == b
    n_layers, n_heads = 2, 4
    assert len(a["scores"]["D"]) == n_layers and len(a["scores"]["D"][0]) == n_heads
    assert len(a["top"]["parametric"]) == 3 and len(a["top"]["in-context"]) == 3
    d = a["scores"]["D"]
    assert d[a["top"]["in-context"][0][0]][a["top"]["in-context"][0][1]] == max(max(r) for r in d)
    assert d[a["top"]["parametric"][0][0]][a["top"]["parametric"][0][1]] == min(min(r) for r in d)
    f = tmp_path / "heads.json"
    f.write_text(json.dumps(a))
    assert head_mask(str(f), model).sum() == 3
    assert plot_heads(a, tmp_path / "heads.png").stat().st_size > 1000


def test_cli_discover(tokenizer, tmp_path, capsys):
    from conftest import make_tiny

    d = tmp_path / "m"
    make_tiny("qwen3", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "h.json"
    assert main(["heads", "discover", "--model", str(d), "--n-items", "2", "--top", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["data"]["n_items"] == 2
    assert out.with_suffix(".png").is_file()
    assert "stability" in capsys.readouterr().out


def _positive_head_relevance(model, tokenizer, question, target, document):
    """R+_h of the first target token, by plain autograd under the rules (not the engines' ``attribute``)."""
    import torch

    from agdecode import attnlrp, get_spec
    from agdecode.discovery import SYSTEM, SYSTEM_OPEN
    from agdecode.prompt import render_prompt

    messages = [{"role": "system", "content": SYSTEM_OPEN if document else SYSTEM},
                {"role": "user", "content": question[:1].upper() + question[1:] + "?"}]
    ids = render_prompt(tokenizer, messages, documents=[document] if document else None).input_ids
    first = tokenizer(target, add_special_tokens=False).input_ids[0]
    acts, hooks = [], []
    for layer in get_spec(model).layers(model):
        def keep(mod, args):
            args[0].retain_grad()
            acts.append(args[0])
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep))
    try:
        with attnlrp(model):
            model(input_ids=ids).logits[0, -1, first].backward()
    finally:
        for h in hooks:
            h.remove()
    n_heads = model.config.num_attention_heads
    return torch.stack([(a * a.grad).view(*a.shape[:2], n_heads, -1).clamp(min=0).sum((0, 1, 3)) for a in acts])


def test_discovery_d_equals_an_independent_computation(tokenizer):
    import torch

    from conftest import make_tiny

    model = make_tiny("llama", len(tokenizer))
    result = discover_heads(model, tokenizer, n_items=4, top=2)
    items = discovery_items(4)
    ob = torch.stack([_positive_head_relevance(model, tokenizer, it["question"], it["cf_answer"],
                                               {"title": it["title"], "text": it["cf_text"]}) for it in items])
    cb = torch.stack([_positive_head_relevance(model, tokenizer, it["question"], it["answer"], None) for it in items])
    d = ob.mean(0) - cb.mean(0)
    assert d.abs().max() > 0
    torch.testing.assert_close(torch.tensor(result["scores"]["D"]), d, rtol=1e-4, atol=1e-6 * d.abs().max().item())
    assert result["identity"]["fingerprint"]  # a head set records the model it was found on


def test_a_head_set_found_on_another_model_is_refused(tokenizer, tmp_path):
    import pytest

    from agdecode import ROIError
    from conftest import make_tiny

    a, b = make_tiny("llama", len(tokenizer), seed=0), make_tiny("llama", len(tokenizer), seed=1)
    f = tmp_path / "heads.json"
    f.write_text(json.dumps(discover_heads(a, tokenizer, n_items=2, top=2)))
    assert head_mask(str(f), a).sum() == 2
    with pytest.raises(ROIError, match="was found for another model"):
        head_mask(str(f), b)
