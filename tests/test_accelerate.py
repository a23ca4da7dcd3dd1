"""Models dispatched by accelerate keep their device hooks under AGD, and get the same scores.

accelerate keeps its hook in the instance ``forward`` of each module (a wrapper around
``module._old_forward``). The rules must run inside that wrapper, so that offloaded weights are
loaded around them, and leave it exactly as it was afterwards.
"""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module

import agdecode
from agdecode.adapters import attnlrp
from conftest import make_tiny

GEN = dict(k=3, min_prob=0.0, max_new_tokens=3)


def _run(model, tokenizer, messages, method, engine):
    kw = dict(GEN, method=method) if method != "agd" else dict(GEN, engine=engine)
    return agdecode.generate(model, tokenizer, messages, **kw)


def _assert_same(got, want):
    assert got.token_ids == want.token_ids
    assert len(got.steps) == len(want.steps) == 3
    for a, b in zip(got.steps, want.steps):
        assert [c.token_id for c in a.candidates] == [c.token_id for c in b.candidates]
        for ca, cb in zip(a.candidates, b.candidates):
            assert ca.prob == pytest.approx(cb.prob, rel=1e-5, abs=1e-7)
            if cb.scores is None:
                assert ca.scores is None
            else:
                assert ca.scores.keys() == cb.scores.keys()
                for name in cb.scores:
                    assert ca.scores[name] == pytest.approx(cb.scores[name], rel=1e-5, abs=1e-6)


def _hook_state(model):
    """Per hooked module: the exact objects accelerate put on the instance."""
    return {name: (vars(m)["forward"], m._hf_hook, vars(m)["_old_forward"])
            for name, m in model.named_modules() if "_hf_hook" in vars(m)}


def _count_calls(model) -> dict[str, int]:
    """Count each accelerate hook's ``pre_forward`` calls (wrapped on the hook object itself)."""
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        hook = vars(m).get("_hf_hook")
        if hook is None:
            continue
        counts[name] = 0

        def pre_forward(module, *args, _name=name, _orig=hook.pre_forward, **kwargs):
            counts[_name] += 1
            return _orig(module, *args, **kwargs)

        hook.pre_forward = pre_forward
    return counts


# Every module kind a rule overrides: final norm, layer norms, a whole MLP, single projections
# (qwen2's biased q/k/v get the primal-bias rule), and a whole decoder layer.
DISK = ["model.norm", "model.layers.0.input_layernorm", "model.layers.0.mlp", "model.layers.0.self_attn.q_proj",
        "model.layers.1"]


def _dispatch_disk(model, tmp_path):
    device_map = {name: ("disk" if name in DISK else "cpu") for name in
                  ["model.embed_tokens", "model.rotary_emb", "lm_head", "model.layers.0.post_attention_layernorm",
                   "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.0.self_attn.o_proj", *DISK]}
    if any("q_norm" in n for n, _ in model.named_modules()):
        device_map.update({"model.layers.0.self_attn.q_norm": "disk", "model.layers.0.self_attn.k_norm": "cpu"})
    extra = [n for n, _ in model.named_modules() if n.startswith("model.layers.0.") and n.count(".") == 3
             and not any(k == n or k.startswith(n + ".") or n.startswith(k + ".") for k in device_map)]
    device_map.update({n: "cpu" for n in extra})  # e.g. gemma3's pre/post-feedforward norms
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))


def _all_hooks(model):
    # A hook on every module, norms and MLPs included (they have no parameters of their own).
    for m in model.modules():
        if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # containers are never called
            add_hook_to_module(m, AlignDevicesHook(execution_device="cpu"))
    return model


SETUPS = {"disk": _dispatch_disk, "all-modules": lambda m, tmp: _all_hooks(m)}
ARCHS = ["llama", "qwen2", "gemma3"]  # Llama-style norms; biased projections; Gemma-style ``_norm``


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tokenizer):
    return request.param, make_tiny(request.param, len(tokenizer))


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("method, engine", [("agd", "forward"), ("agd", "reverse"), ("cad", None), ("dola", None)])
def test_dispatched_model_scores_and_hooks(pair, tokenizer, messages, tmp_path, setup, method, engine):
    arch, plain = pair
    want = _run(plain, tokenizer, messages, method, engine)
    model = SETUPS[setup](copy.deepcopy(plain), tmp_path)
    before = _hook_state(model)
    assert before, "accelerate attached no hooks"
    counts = _count_calls(model)

    got = _run(model, tokenizer, messages, method, engine)

    _assert_same(got, want)
    assert all(n > 0 for n in counts.values()), {k: v for k, v in counts.items() if v == 0}
    after = _hook_state(model)
    assert after.keys() == before.keys()
    for name in before:
        assert all(a is b for a, b in zip(after[name], before[name])), name
    # Still called after AGD, and still loading offloaded weights: the plain forward is unchanged.
    ran = dict(counts)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
    assert all(counts[k] > ran[k] for k in counts)


def test_rules_restored_after_an_error(tokenizer):
    model = _all_hooks(make_tiny("llama", len(tokenizer)))
    before = _hook_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with attnlrp(model):
            assert vars(model.model.norm)["_old_forward"] is not before["model.norm"][2]  # the rule, inside the hook
            assert vars(model.model.norm)["forward"] is before["model.norm"][0]
            raise RuntimeError("boom")
    after = _hook_state(model)
    assert all(all(a is b for a, b in zip(after[n], before[n])) for n in before)


def test_instance_overrides_and_torch_hooks_survive(tokenizer, messages):
    plain = make_tiny("llama", len(tokenizer))
    want = _run(plain, tokenizer, messages, "agd", "forward")
    model = copy.deepcopy(plain)
    mine = model.model.norm.forward  # someone's own instance override (here: a bound method object)
    vars(model.model.norm)["forward"] = mine
    calls = {"post": 0, "pre": 0}
    post = model.model.norm.register_forward_hook(lambda m, a, o: calls.__setitem__("post", calls["post"] + 1))
    pre = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    for engine in ("forward", "reverse"):
        _assert_same(_run(model, tokenizer, messages, "agd", engine), want)
    assert calls["post"] > 0 and calls["pre"] > 0
    assert vars(model.model.norm)["forward"] is mine
    assert "forward" not in vars(model.model.layers[0].mlp)  # nothing left where nothing was
    assert len(model.model.norm._forward_hooks) == 1 and len(model.model.layers[0].mlp._forward_pre_hooks) == 1
    post.remove(), pre.remove()


def test_attention_implementation_restored(tokenizer):
    model = make_tiny("llama", len(tokenizer), attn="eager")
    with attnlrp(model, attention="sdpa"):
        assert model.config._attn_implementation.startswith("agd_attnlrp_")
    assert model.config._attn_implementation == "eager"


def test_cpu_offload(tokenizer, messages):
    plain = make_tiny("llama", len(tokenizer))
    want = _run(plain, tokenizer, messages, "agd", "forward")
    model = cpu_offload(copy.deepcopy(plain), execution_device="cpu")
    _assert_same(_run(model, tokenizer, messages, "agd", "forward"), want)


def test_input_device(tokenizer):
    from agdecode.models import input_device

    model = make_tiny("llama", len(tokenizer))
    assert input_device(model) == torch.device("cpu")
    cpu_offload(model, execution_device="cpu")
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")
