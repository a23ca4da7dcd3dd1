"""The baselines (CAD, DoLa, activation steering, sampling) against independent no-cache references."""
from __future__ import annotations

import json
import math

import pytest
import torch

from agdecode import GenerationResult, generate, render_prompt
from agdecode.adapters import final_norm
from agdecode.baselines import BaselineError
from agdecode.baselines.cad import context_free_prompt
from agdecode.baselines.dola import candidate_layers
from agdecode.baselines.steering import SteeringVector, SteeringVectorMismatch, fit_steering_vector
from agdecode.cli import main
from conftest import make_tiny, tiny_config

N = 6  # tokens per generation: enough to go through the KV cache several times


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


@torch.no_grad()
def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits from a plain forward over the whole sequence (no cache), in float64."""
    return model(input_ids=ids).logits[0, -1].double()


def with_generated(prompt_ids: torch.Tensor, generated: list[int]) -> torch.Tensor:
    return torch.cat([prompt_ids, torch.tensor([generated], dtype=prompt_ids.dtype)], dim=1)


def assert_probs(step, ref_scores: torch.Tensor):
    """The trace's candidate probabilities are the softmax of the reference scores."""
    p = torch.softmax(ref_scores, -1)
    ids = [c.token_id for c in step.candidates]
    assert [c.prob for c in step.candidates] == pytest.approx(p[ids].tolist(), abs=2e-5)


# -- settings that switch a method off reproduce greedy ------------------------------------------

def test_neutral_settings_reproduce_greedy(tiny, messages):
    arch, model, tok = tiny
    greedy = generate(model, tok, messages, method="greedy", max_new_tokens=N).token_ids
    n_layers = model.config.num_hidden_layers
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for kwargs in [dict(method="cad", cad_alpha=0.0),
                   dict(method="steer", steer_vector=vector, steer_weight=0.0),
                   dict(method="dola", dola_layers=[n_layers], repetition_penalty=1.0)]:
        assert generate(model, tok, messages, max_new_tokens=N, **kwargs).token_ids == greedy, kwargs
    # ... and the same vector with a weight does change the logits (the hook is live).
    steered = generate(model, tok, messages, method="steer", steer_vector=vector, steer_weight=50.0, max_new_tokens=1)
    plain = generate(model, tok, messages, method="greedy", max_new_tokens=1)
    assert steered.steps[0].candidates[0].prob != pytest.approx(plain.steps[0].candidates[0].prob, rel=1e-4)


# -- CAD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cad_equals_two_plain_forwards(tiny, messages, alpha):
    arch, model, tok = tiny
    out = generate(model, tok, messages, method="cad", cad_alpha=alpha, k=4, max_new_tokens=N)
    full = render_prompt(tok, messages).input_ids
    without_system = render_prompt(tok, messages[1:]).input_ids
    assert out.extra["method"]["negative_prompt_ids"] == without_system[0].tolist()
    for step in out.steps:
        done = out.token_ids[:step.index]
        lf = last_logits(model, with_generated(full, done))
        lu = last_logits(model, with_generated(without_system, done))
        ref = (1 + alpha) * lf - alpha * lu  # Shi et al.'s raw-logit formula
        assert step.reason == "cad" and step.chosen_id == int(ref.argmax())
        assert_probs(step, ref)
        assert step.info == {"model_top": int(lf.argmax()), "context_free_top": int(lu.argmax())}


def test_cad_prompt_without_the_roi(llama, messages):
    model, tok = llama
    prompt = render_prompt(tok, messages)
    assert context_free_prompt(tok, prompt, "system").tolist() == render_prompt(tok, messages[1:]).input_ids.tolist()
    assert context_free_prompt(tok, prompt, "message:1").tolist() == render_prompt(tok, messages[:1]).input_ids.tolist()
    kept = [i for i in range(len(prompt)) if i not in (2, 3, 4)]
    assert context_free_prompt(tok, prompt, "tokens:2-4")[0].tolist() == prompt.input_ids[0, kept].tolist()


def test_cad_prompt_without_documents(llama):
    from agdecode.roi import resolve_region

    tok = llama[1]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    docs = [{"title": "Paris", "text": "Capital of France."}, {"title": "Rome", "text": "Capital of Italy."}]
    prompt = render_prompt(tok, msgs, documents=docs)
    assert context_free_prompt(tok, prompt, "context", msgs, docs).tolist() == render_prompt(tok, msgs).input_ids.tolist()
    assert (context_free_prompt(tok, prompt, "document:1", msgs, docs).tolist()
            == render_prompt(tok, msgs, documents=docs[1:]).input_ids.tolist())
    # The system message is left out, the documents stay.
    assert (context_free_prompt(tok, prompt, "system").tolist()
            == render_prompt(tok, msgs[1:], documents=docs).input_ids.tolist())
    # Without the originals, the documents' tokens are dropped from the rendered prompt.
    keep = ~(resolve_region("context", prompt).tokens > 0)
    assert context_free_prompt(tok, prompt, "context")[0].tolist() == prompt.input_ids[0, keep].tolist()


# -- DoLa -----------------------------------------------------------------------------------------

@torch.no_grad()
def dola_reference(model, ids: torch.Tensor, layers: list[int], penalty: float):
    """DoLa written out plainly: full forward, early exits, JSD, contrast, relative top, penalty."""
    out = model(input_ids=ids, output_hidden_states=True)
    n = model.config.num_hidden_layers
    cap = getattr(model.config, "final_logit_softcapping", None)
    final = out.logits[0, -1].double()

    def early_exit(j):
        if j == n:
            return final
        z = model.get_output_embeddings()(final_norm(model)(out.hidden_states[j][0, -1])).double()
        z = z / getattr(model.config, "logits_scaling", 1.0)  # Granite scales its logits down
        return z if cap is None else cap * torch.tanh(z / cap)

    def jsd(a, b):
        p, q = torch.softmax(a, -1), torch.softmax(b, -1)
        m = (p + q) / 2
        return float(0.5 * (p * (p / m).log()).nansum() + 0.5 * (q * (q / m).log()).nansum())

    divs = [jsd(final, early_exit(j)) for j in layers]
    layer = layers[max(range(len(layers)), key=lambda i: divs[i])]
    log_final = torch.log_softmax(final, -1)
    if layer == n:
        scores = log_final.clone()
    else:
        scores = log_final - torch.log_softmax(early_exit(layer), -1)
        scores[log_final < log_final.max() + math.log(0.1)] = -math.inf
    for t in set(ids[0].tolist()):
        scores[t] = scores[t] * penalty if scores[t] < 0 else scores[t] / penalty
    return scores, layer, divs


def check_dola(model, tok, messages, dola_layers, layers, penalty=1.2):
    out = generate(model, tok, messages, method="dola", dola_layers=dola_layers, k=4, max_new_tokens=N,
                   **({} if penalty == 1.2 else {"repetition_penalty": penalty}))
    assert out.extra["method"]["candidate_layers"] == layers
    prompt = render_prompt(tok, messages).input_ids
    chosen_layers = []
    for step in out.steps:
        scores, layer, divs = dola_reference(model, with_generated(prompt, out.token_ids[:step.index]), layers, penalty)
        assert step.reason == "dola" and step.chosen_id == int(scores.argmax())
        assert step.info["premature_layer"] == layer
        assert list(step.info["js_divergence"].values()) == pytest.approx(divs, rel=1e-3, abs=1e-7)
        assert_probs(step, scores)
        chosen_layers.append(layer)
    return chosen_layers


def test_dola_equals_no_cache_reference(tiny, messages):
    arch, model, tok = tiny
    check_dola(model, tok, messages, [0, 1], [0, 1])
    check_dola(model, tok, messages, "high", [1], penalty=1.0)


def test_dola_picks_layers_per_step_on_a_deeper_model(tokenizer, messages):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", len(tokenizer))
    cfg.num_hidden_layers = 6
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert candidate_layers(model, "low") == [0, 2] and candidate_layers(model, "high") == [3, 5]
    chosen = check_dola(model, tokenizer, messages, [5, 1, 3, 2, 4, 1], [1, 2, 3, 4, 5])
    assert len(set(chosen)) > 1  # the premature layer really is chosen per step (here 1 and 2)


@pytest.mark.parametrize("n, tied, low, high", [
    (30, True, list(range(2, 15, 2)), list(range(15, 30, 2))),  # SmolLM2-135M
    (30, False, list(range(0, 15, 2)), list(range(15, 30, 2))),
    (48, False, list(range(0, 20, 2)), list(range(28, 48, 2))),  # > 40 layers: first / last 20
])
def test_dola_buckets_follow_hf(n, tied, low, high):
    from types import SimpleNamespace

    from transformers import LlamaConfig

    model = SimpleNamespace(config=LlamaConfig(num_hidden_layers=n, tie_word_embeddings=tied))
    assert candidate_layers(model, "low") == low and candidate_layers(model, "high") == high


# -- activation steering --------------------------------------------------------------------------

def test_steering_vector_is_the_mean_residual_difference(llama, tmp_path):
    model, tok = llama
    prompts, instruction = ["Tell me about cats.", "What is rain?"], "Always answer in French."
    sv = fit_steering_vector(model, tok, prompts, instruction, layer=1)
    captured = []  # the input of decoder layer 1, read by a hook rather than output_hidden_states
    handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: captured.append(a[0][0, -1].clone()))
    try:
        diffs = []
        for p in prompts:
            for msgs in ([{"role": "system", "content": instruction}, {"role": "user", "content": p}],
                         [{"role": "user", "content": p}]):
                with torch.no_grad():
                    model(input_ids=render_prompt(tok, msgs).input_ids)
            diffs.append(captured[-2] - captured[-1])
    finally:
        handle.remove()
    assert torch.allclose(sv.vector, torch.stack(diffs).mean(0), atol=1e-5)
    path = sv.save(tmp_path / "french")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["layer"] == 1 and meta["hidden_size"] == 64 and meta["instruction"] == instruction
    loaded = SteeringVector.load(path)
    assert loaded.layer == 1 and torch.equal(loaded.vector, sv.vector) and loaded.meta["n_prompts"] == 2


def test_steering_adds_the_vector_at_every_position(tiny, messages):
    arch, model, tok = tiny
    v = 0.5 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out = generate(model, tok, messages, method="steer", steer_vector=v, steer_layer=0, steer_weight=3.0,
                   k=4, max_new_tokens=N)
    # Layer 0's input is the embedding output: steering there = shifting every input embedding.
    ids = render_prompt(tok, messages).input_ids
    for step in out.steps:
        seq = with_generated(ids, out.token_ids[:step.index])
        with torch.no_grad():
            # Granite scales the embeddings inside the model, before layer 0: shift by v / that scale.
            shift = 3.0 * v / getattr(model.config, "embedding_multiplier", 1.0)
            ref = model(inputs_embeds=model.get_input_embeddings()(seq) + shift).logits[0, -1].double()
        assert step.reason == "steer" and step.chosen_id == int(ref.argmax())
        assert_probs(step, ref)


# -- sampling -------------------------------------------------------------------------------------

def test_sampling_is_seeded(llama, messages):
    model, tok = llama
    a, b = (generate(model, tok, messages, method="sample", seed=3, top_p=1.0, max_new_tokens=N) for _ in range(2))
    c = generate(model, tok, messages, method="sample", seed=4, top_p=1.0, max_new_tokens=N)
    assert a.token_ids == b.token_ids != c.token_ids
    assert all(s.reason == "sample" and 0 < s.info["p_sampled"] <= 1 for s in a.steps)
    tiny_nucleus = generate(model, tok, messages, method="sample", top_p=1e-9, max_new_tokens=N)
    assert tiny_nucleus.token_ids == generate(model, tok, messages, method="greedy", max_new_tokens=N).token_ids


# -- traces and errors ----------------------------------------------------------------------------

def test_baseline_trace_round_trips(llama, messages, tmp_path):
    model, tok = llama
    out = generate(model, tok, messages, method="dola", dola_layers=[0, 1], max_new_tokens=3)
    back = GenerationResult.load(out.save(tmp_path / "t.json"))
    assert [s.info for s in back.steps] == [s.info for s in out.steps] and back.steps[0].info["premature_layer"] in (0, 1)
    steer = generate(model, tok, messages, method="steer", steer_vector=torch.zeros(64), max_new_tokens=1)
    assert json.loads(json.dumps(steer.to_dict()))["config"]["steer_vector"] == "tensor(64,)"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="cad", cad_alpha=-0.5), ValueError, "cad_alpha must be a number >= 0"),
    (dict(method="dola", dola_layers=[0, 7]), BaselineError, r"dola_layers \[7\] out of range: this model's layers are 0..2"),
    (dict(method="dola", dola_layers="middle"), ValueError, "dola_layers must be 'low', 'high'"),
    (dict(method="dola", repetition_penalty=0.0), ValueError, "repetition_penalty must be a number > 0"),
    (dict(method="steer", steer_vector=torch.zeros(64), steer_layer=2), BaselineError, "steering layer 2 is out of range"),
    (dict(method="steer", steer_vector=torch.zeros(32)), SteeringVectorMismatch, "hidden size is 64"),
    (dict(method="steer"), ValueError, "method='steer' needs steer_vector"),
    (dict(method="steer", steer_vector="/no/such/vector.safetensors"), FileNotFoundError, "agd steer fit"),
    (dict(method="greedy", steer_layer=1), ValueError, "steer_layer is only used by method='steer'"),
    (dict(method="sample", temperature=0), ValueError, "temperature must be a number > 0"),
    (dict(method="sample", top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
])
def test_bad_baseline_settings(llama, messages, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(*llama, messages, max_new_tokens=1, **kwargs)


def test_steering_vector_for_another_model(llama, messages, tmp_path):
    model, tok = llama
    other = make_tiny("llama", len(tok), seed=1)  # same architecture and sizes, other weights
    path = fit_steering_vector(other, tok, ["Hi"], "Be brief.", layer=1).save(tmp_path / "other")
    with pytest.raises(SteeringVectorMismatch, match="fitted on another model .*embedding fingerprint"):
        generate(model, tok, messages, method="steer", steer_vector=str(path), max_new_tokens=1)


def test_cad_with_nothing_left_to_contrast(llama):
    from agdecode import ROIError

    with pytest.raises(ROIError, match="leaves no message to contrast with"):
        generate(*llama, [{"role": "system", "content": "Be brief."}], method="cad", max_new_tokens=1)


# -- command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama):
    d = tmp_path_factory.mktemp("tiny-llama")
    llama[0].save_pretrained(d)
    llama[1].save_pretrained(d)
    return d


def test_cli_steer_fit_then_generate(model_dir, tmp_path, capsys):
    vec = tmp_path / "french.safetensors"
    assert main(["steer", "fit", "--model", str(model_dir), "--instruction", "Always answer in French.",
                 "--prompt", "Tell me about cats.", "--prompt", "What is rain?", "--layer", "1", "--out", str(vec)]) == 0
    assert json.loads(vec.with_suffix(".json").read_text())["n_prompts"] == 2
    trace = tmp_path / "t.json"
    for extra in (["--method", "steer", "--steer-vector", str(vec), "--steer-weight", "2"],
                  ["--method", "cad", "--cad-alpha", "1.0"], ["--method", "dola", "--dola-layers", "0,1"]):
        assert main(["generate", "Hi", "--system", "Always answer in French.", "--model", str(model_dir),
                     "--max-new-tokens", "2", "--json", str(trace),
                     *extra]) == 0
        data = json.loads(trace.read_text())
        assert data["config"]["method"] == extra[1] and all(s["reason"] == extra[1] for s in data["steps"])
    assert data["config"]["dola_layers"] == [0, 1] and "premature_layer" in data["steps"][0]["info"]
    capsys.readouterr()


def test_cli_prints_baseline_errors_without_traceback(model_dir, capsys):
    assert main(["generate", "Hi", "--model", str(model_dir), "--method", "dola", "--dola-layers", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: dola_layers [9] out of range") and "Traceback" not in err
