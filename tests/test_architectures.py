"""Every architecture spec: weight-equivalent oracles against the Llama path, exact restoration after
the forward engine, and refusal of packed quantised weights.

The golden relevances (tests/test_rules.py, tests/test_rois.py) cover llama, qwen2, qwen3, gemma3 and
gpt2; forward engine = reverse engine, k=1 = greedy and batch = single run on every architecture through
the ``tiny`` fixture (tests/test_engines.py, test_decoding.py, test_batching.py, test_rois.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from agdecode import generate
from agdecode.adapters import QuantizedWeightsError, attnlrp
from agdecode.architectures import SPECS, get_spec
from agdecode.engines.forward import ForwardEngine, dual_mode
from agdecode.engines.reverse import attribute
from agdecode.sources import Row
from conftest import TINY_ARCHS, make_tiny
from test_engines import _scores_along_greedy

VOCAB = 211
IDS = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(3))


def _llama_like(src: nn.Module, state: dict) -> nn.Module:
    """A Llama model with ``src``'s sizes, rotary settings and norm epsilon, holding ``state``."""
    c = src.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False)
    llama = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    missing, unexpected = llama.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return llama


def _split_phi3(phi3: nn.Module) -> dict:
    """Phi-3's fused q/k/v and gate/up weights split into a Llama model's separate projections."""
    c = phi3.config
    d = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    state = {}
    for name, w in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            state[base + "q_proj.weight"], state[base + "k_proj.weight"], state[base + "v_proj.weight"] = \
                w.split([q, kv, kv])
        elif name.endswith("gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            state[base + "gate_proj.weight"], state[base + "up_proj.weight"] = w.chunk(2)
        else:
            state[name] = w
    return state


def _equivalent_pair(arch: str):
    """(model of ``arch``, a Llama model that computes the same function with the same weights)."""
    if arch == "mistral":
        model = make_tiny("mistral", VOCAB, sliding_window=None)
        return model, _llama_like(model, model.state_dict())
    if arch == "phi3":
        model = make_tiny("phi3", VOCAB)
        return model, _llama_like(model, _split_phi3(model))
    if arch == "granite":
        # Every multiplier neutral: Llama scales attention scores by 1/sqrt(head_dim), Granite by
        # attention_multiplier, so that one is 1/sqrt(head_dim) rather than 1.
        model = make_tiny("granite", VOCAB, embedding_multiplier=1.0, residual_multiplier=1.0,
                          attention_multiplier=16 ** -0.5, logits_scaling=1.0)
        return model, _llama_like(model, model.state_dict())
    if arch == "smollm3":
        model = make_tiny("smollm3", VOCAB, no_rope_layers=[1, 1])  # rotary embeddings in every layer
        return model, _llama_like(model, model.state_dict())
    raise KeyError(arch)


def _relevances(model):
    targets = torch.tensor([5, 17, 100])
    return attribute(model, IDS, targets, "lrp", heads=True)


@pytest.mark.parametrize("arch", ["mistral", "phi3", "granite", "smollm3"])
def test_weight_equivalent_architectures_equal_the_llama_path(arch, tokenizer, messages):
    model, llama = _equivalent_pair(arch)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, llama(IDS).logits, rtol=1e-5, atol=1e-5)
    # The autograd rules: token and head relevances (reverse engine's attribute).
    (tok_a, head_a), (tok_b, head_b) = _relevances(model), _relevances(llama)
    torch.testing.assert_close(tok_a, tok_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_a, head_b, rtol=1e-4, atol=1e-6)
    assert tok_a.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("arch", ["mistral", "phi3", "granite", "smollm3"])
def test_weight_equivalent_architectures_equal_the_llama_path_in_the_forward_engine(arch, messages):
    model, llama = _equivalent_pair(arch)
    mask = torch.zeros(1, IDS.shape[1])
    mask[0, :9] = 1.0
    out = []
    for m in (model, llama):
        with ForwardEngine(m, 1, "lrp") as eng:
            logits = eng.prefill([Row(IDS[0], mask)])
            top = logits.topk(5).indices
            first = eng.scores(top, torch.tensor([0]))
            logits = eng.step(top[:, 0])
            out.append((top, first, eng.scores(logits.topk(5).indices, torch.tensor([0]))))
    (top_a, s1_a, s2_a), (top_b, s1_b, s2_b) = out
    assert torch.equal(top_a, top_b)
    torch.testing.assert_close(s1_a, s1_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s2_a, s2_b, rtol=1e-4, atol=1e-6)


def test_granite_multipliers_matter(tokenizer, messages):
    """The tiny Granite of the other tests has multipliers away from 1: its scores are not Llama's."""
    model = make_tiny("granite", len(tokenizer))
    neutral = make_tiny("granite", len(tokenizer), embedding_multiplier=1.0, residual_multiplier=1.0,
                        attention_multiplier=16 ** -0.5, logits_scaling=1.0)
    a = _scores_along_greedy(model, tokenizer, messages, "forward", "lrp", steps=1)
    b = _scores_along_greedy(neutral, tokenizer, messages, "forward", "lrp", steps=1)
    assert not torch.allclose(a, b, rtol=1e-2)


def test_smollm3_layers_without_rotary_embeddings_change_the_model():
    nope = make_tiny("smollm3", VOCAB)
    rope = make_tiny("smollm3", VOCAB, no_rope_layers=[1, 1])
    with torch.no_grad():
        assert not torch.allclose(nope(IDS).logits, rope(IDS).logits, atol=1e-3)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("attribution", ["lrp", "ixg"])
def test_forward_engine_restores_the_model_exactly(arch, attribution):
    model = make_tiny(arch, VOCAB)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {id(m): dict(vars(m)) for m in model.modules()}
    attn = model.config._attn_implementation
    with torch.no_grad():
        before = model(IDS).logits
    with ForwardEngine(model, 2, attribution, heads=True) as eng:
        n_layers, n_heads = get_spec(model).head_shape(model)
        eng.prefill([Row(IDS[0], torch.ones(2, IDS.shape[1]), torch.ones(2, n_layers, n_heads))])
        eng.step(torch.tensor([3]))
    attribute(model, IDS, torch.tensor([1, 2]), attribution, heads=True)
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(after, before)
    assert model.config._attn_implementation == attn
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for m in model.modules():  # nothing added, nothing replaced (hooks removed, overrides gone)
        assert vars(m).keys() == attrs[id(m)].keys()
        for key, value in vars(m).items():
            assert value is attrs[id(m)][key], (type(m).__name__, key)
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_every_spec_names_modules_its_architecture_has():
    for spec in SPECS:
        model = make_tiny(spec.name, VOCAB)
        layers = spec.layers(model)
        assert len(layers) == model.config.num_hidden_layers
        n_layers, n_heads = spec.head_shape(model)
        out = spec.attention_output(layers[0])
        in_features = out.in_features if isinstance(out, nn.Linear) else out.nx  # GPT-2: Conv1D
        assert in_features % n_heads == 0 and n_layers == len(layers)
        assert isinstance(spec.final_norm(model), spec.norm_classes())
        assert any(isinstance(m, spec.mlp_class()) for m in model.modules())
        assert (spec.positions(model) is not None) == (spec.name == "gpt2")


# --- quantised weights ---------------------------------------------------------------------------

class FakeInt8Linear(nn.Linear):
    """A packed layer as bitsandbytes' 8-bit layers keep it: int8 weight and a scale, its own forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.abs().amax() / 127
        self.weight = nn.Parameter(torch.round(linear.weight / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


class FakeLinear4bit(nn.Linear):
    """A 4-bit layer's tell: a ``quant_state`` beside a (here still float) weight."""

    quant_state = object()


def _with_packed(model, cls=FakeInt8Linear, which="q_proj"):
    attn = get_spec(model).layers(model)[0].self_attn
    setattr(attn, which, cls(getattr(attn, which)) if cls is FakeInt8Linear else _as(cls, getattr(attn, which)))
    return model


def _as(cls, linear):
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
    new.load_state_dict(linear.state_dict())
    return new


@pytest.mark.parametrize("cls", [FakeInt8Linear, FakeLinear4bit])
def test_forward_engine_refuses_a_packed_layer_with_a_bias(tokenizer, messages, cls):
    model = _with_packed(make_tiny("qwen2", len(tokenizer)), cls)   # Qwen2: q_proj has a bias
    before = {id(m): dict(vars(m)) for m in model.modules()}
    with pytest.raises(QuantizedWeightsError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*packed quantised.*"
                                                    r"dequantised.*bfloat16"):
        generate(model, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2, engine="forward")
    for m in model.modules():  # refused before anything was overridden
        assert vars(m).keys() == before[id(m)].keys()


def test_a_packed_layer_without_a_bias_runs_through_its_own_forward(tokenizer, messages):
    """No override reads a bias-free projection's weight: such a layer keeps its own forward, exactly."""
    model = _with_packed(make_tiny("llama", len(tokenizer)))
    ref = _scores_along_greedy(model, tokenizer, messages, "reverse", "lrp", steps=2)
    got = _scores_along_greedy(model, tokenizer, messages, "forward", "lrp", steps=2)
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    assert ((got - ref).abs() / scale).max() < 1e-4


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_a_quantised_model_is_refused_by_both_engines(tokenizer, messages, engine):
    model = make_tiny("llama", len(tokenizer))
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(QuantizedWeightsError, match="quantised \\(bitsandbytes\\).*dequantised"):
        generate(model, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2, engine=engine)
    with pytest.raises(QuantizedWeightsError):
        with attnlrp(model):
            pass
    assert all("forward" not in vars(m) for m in model.modules())
    # Decoding without attribution needs no rules.
    del model.config.quantization_config
    assert len(generate(model, tokenizer, messages, method="greedy", max_new_tokens=2).token_ids) == 2


def test_dual_mode_refuses_before_overriding(tokenizer):
    model = _with_packed(make_tiny("qwen2", len(tokenizer)))
    with pytest.raises(QuantizedWeightsError):
        with dual_mode(model):
            pass
    assert all("forward" not in vars(m) for m in model.modules() if not isinstance(m, FakeInt8Linear))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])  # gated, fused-gated and plain MLPs
def test_plain_gradient_with_several_rois_equals_reverse(arch, tokenizer, messages):
    model = make_tiny(arch, len(tokenizer))
    rois = ("system", "user")
    ref = _scores_along_greedy(model, tokenizer, messages, "reverse", "ixg", steps=2, rois=rois)
    got = _scores_along_greedy(model, tokenizer, messages, "forward", "ixg", steps=2, rois=rois)
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    assert ((got - ref).abs() / scale).max() < 1e-4


def test_logits_scale_is_what_the_model_applies_after_the_head():
    for arch in ("granite", "llama"):
        model = make_tiny(arch, VOCAB)
        spec = get_spec(model)
        with torch.no_grad():
            out = model(IDS, output_hidden_states=True)
            head = model.get_output_embeddings()(out.hidden_states[-1])
        torch.testing.assert_close(out.logits, head * spec.logits_scale(model))
    granite = make_tiny("granite", VOCAB)
    assert get_spec(granite).logits_scale(granite) == 0.25  # the tiny model's logits_scaling = 4


def test_baseline_layout_of_an_unmapped_architecture(tokenizer):
    """DoLa and steering need only the layers and the final norm: an unmapped model with the common
    layout gets them; one without is refused with the supported list."""
    from transformers import OPTConfig, OPTForCausalLM

    from agdecode.adapters import UnsupportedArchitectureError, decoder_layers, final_norm

    llama = make_tiny("llama", VOCAB)
    llama.config.model_type = "my_llama_variant"  # this test's own model
    assert decoder_layers(llama) == list(llama.model.layers) and final_norm(llama) is llama.model.norm
    with pytest.raises(UnsupportedArchitectureError):
        get_spec(llama)
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                   word_embed_proj_dim=32, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="supported: gemma3, gpt2"):
        decoder_layers(opt)


def test_a_torch_ao_int8_model_decodes_greedily_and_is_refused_by_agd(tokenizer, messages):
    # quantize_dynamic packs every Linear (weight() becomes a method): decoding without attribution
    # runs; AGD is refused with one line naming the LM head, which every engine reads.
    import warnings

    model = make_tiny("llama", len(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert len(generate(quantized, tokenizer, messages, method="greedy", max_new_tokens=2).token_ids) == 2
    for engine in ("forward", "reverse"):
        with pytest.raises(QuantizedWeightsError, match=r"'lm_head' holds packed quantised weights \(a torch.ao"):
            generate(quantized, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2, engine=engine)
