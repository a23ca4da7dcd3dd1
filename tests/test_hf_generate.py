"""AGD inside transformers' generate: the custom_generate callable, the shipped custom_generate/ folder, prepare()."""
from __future__ import annotations

from pathlib import Path
import warnings

import pytest
import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.streamers import BaseStreamer

import agdecode
from agdecode import hf
from agdecode.errors import AgdError

from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]  # holds custom_generate/generate.py
N = 14
AGD = dict(k=5, min_prob=0.0)  # min_prob=0: every step is decided by attribution on the random model
SHORT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny("llama", len(tokenizer), seed=3)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def new_tokens(out, inputs):
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, inputs["input_ids"].shape[1]:].tolist()


def stop_string(model, tok, messages, **settings):
    """A stop string that ends the reference run early: the text of its 6th token (the first time it appears)."""
    full = agdecode.generate(model, tok, messages, max_new_tokens=N, **settings)
    for i in range(5, N - 2):
        text = tok.decode(full.token_ids[i : i + 1])
        if text.strip() and text not in tok.decode(full.token_ids[:i]):
            return text, full
    raise AssertionError("no usable stop string in the reference run (the seeded tiny model should give one)")


def test_custom_generate_folder_equals_agdecode_generate(model, tokenizer, messages):
    tok = tokenizer
    stop, full = stop_string(model, tok, messages, repetition_penalty=1.3, **AGD)
    ref = agdecode.generate(model, tok, messages, max_new_tokens=N, repetition_penalty=1.3, stop_strings=[stop], **AGD)
    greedy = agdecode.generate(model, tok, messages, max_new_tokens=N, method="greedy", repetition_penalty=1.3)
    assert ref.token_ids != greedy.token_ids[: len(ref.token_ids)]  # AGD changed the reply: the test can tell
    assert ref.extra["finish_reason"] == "stop" and len(ref.token_ids) < N

    inputs = hf.prepare(tok, messages, roi="system")
    streamer = Recorder()
    out = model.generate(**inputs, custom_generate=str(ROOT), trust_remote_code=True, tokenizer=tok,
                         max_new_tokens=N, repetition_penalty=1.3, stop_strings=[stop], streamer=streamer,
                         return_dict_in_generate=True, output_scores=True, **AGD)
    assert isinstance(out, hf.AGDGenerateOutput)
    assert new_tokens(out, inputs) == [ref.token_ids]
    assert out.agd[0].token_ids == ref.token_ids and out.agd[0].overrides == ref.overrides
    assert len(out.scores) == len(ref.token_ids) and out.scores[0].shape == (1, len(tok))
    # The streamer gets the prompt, then every generated token, then end().
    assert streamer.puts[0] == inputs["input_ids"].tolist()
    assert [t for p in streamer.puts[1:] for t in p] == ref.token_ids and streamer.ended


def test_callable_equals_agdecode_generate_with_processor_and_stop_criterion(model, tokenizer, messages):
    tok = tokenizer
    stop, _ = stop_string(model, tok, messages, no_repeat_ngram_size=2, **AGD)
    ref = agdecode.generate(model, tok, messages, max_new_tokens=N, no_repeat_ngram_size=2, stop_strings=[stop], **AGD)
    inputs = hf.prepare(tok, messages)
    out = model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=N, no_repeat_ngram_size=2,
                         stopping_criteria=StoppingCriteriaList([StopStringCriteria(tok, [stop])]), **AGD)
    assert new_tokens(out, inputs) == [ref.token_ids]


def test_roi_string_with_messages_equals_roi_mask(model, tokenizer, messages):
    tok = tokenizer
    inputs = hf.prepare(tok, messages)
    a = hf.generate(model, **inputs, max_new_tokens=8, **AGD)
    plain = {k: v for k, v in inputs.items() if k != "roi_mask"}
    b = hf.generate(model, **plain, roi="system", messages=messages, tokenizer=tok, max_new_tokens=8, **AGD)
    assert torch.equal(a, b)
    # A token ROI needs only the tokenizer: the system content's positions give the same tokens.
    pos = inputs["roi_mask"][0].nonzero().flatten().tolist()
    c = hf.generate(model, **plain, roi=f"tokens:{pos[0]}-{pos[-1]}", tokenizer=tok, max_new_tokens=8, **AGD)
    assert torch.equal(a, c)
    # Several ROIs: all scored, the first decides; as agdecode.generate.
    both = hf.generate(model, **plain, roi=["user", "system"], messages=messages, tokenizer=tok, max_new_tokens=8,
                       return_dict_in_generate=True, **AGD)
    ref = agdecode.generate(model, tok, messages, roi=["user", "system"], max_new_tokens=8, **AGD)
    assert new_tokens(both, inputs) == [ref.token_ids]
    assert set(both.agd[0].steps[0].candidates[0].scores) == {"user", "system"}


def test_sampling_settings_are_ignored_with_a_warning(model, tokenizer, messages):
    inputs = hf.prepare(tokenizer, messages)
    plain = model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=6, **AGD)
    with pytest.warns(UserWarning, match="deterministically"):
        sampled = model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=6, do_sample=True,
                                 temperature=0.5, top_k=3, **AGD)
    assert torch.equal(plain, sampled)


def test_batch_of_two_left_padded_prompts_equals_single_runs(model, tokenizer, messages):
    tok = tokenizer
    convs = [messages, SHORT]
    inputs = hf.prepare(tok, convs)
    assert inputs["attention_mask"][1, 0] == 0  # the short prompt is padded
    out = model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=N, repetition_penalty=1.3,
                         return_dict_in_generate=True, output_logits=True, **AGD)
    singles = [agdecode.generate(model, tok, c, max_new_tokens=N, repetition_penalty=1.3, **AGD).token_ids
               for c in convs]
    assert new_tokens(out, inputs) == singles
    assert len(out.logits) == N and out.logits[0].shape == (2, len(tok))


def test_length_settings_apply_to_each_row_without_its_padding(model, tokenizer, messages):
    """min_new_tokens counts each row's own new tokens, as it would alone (transformers counts padded length)."""
    tok = tokenizer
    inputs = hf.prepare(tok, [messages, SHORT])
    single = agdecode.generate(model, tok, SHORT, max_new_tokens=N, **AGD).token_ids
    eos = single[4]  # the short row ends at its 5th token when this is end-of-sequence ...
    assert eos not in single[:4]
    pad = int((inputs["attention_mask"][1] == 0).sum())
    assert pad > 0
    out = model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=N, eos_token_id=eos,
                         min_new_tokens=3, pad_token_id=0, **AGD)   # ... and 5 > min_new_tokens
    row = new_tokens(out, inputs)[1]
    assert row[:5] == single[:5] and row[5:] == [0] * (len(row) - 5)  # finished, then padded


def test_bad_input_is_one_clear_error(model, tokenizer, messages):
    tok = tokenizer
    inputs = hf.prepare(tok, messages)
    plain = {k: v for k, v in inputs.items() if k != "roi_mask"}
    with pytest.raises(AgdError, match="region of interest"):
        model.generate(**plain, custom_generate=hf.agd_generate, max_new_tokens=2)
    with pytest.raises(AgdError, match="tokenizer"):
        model.generate(**plain, custom_generate=hf.agd_generate, roi="system", max_new_tokens=2)
    with pytest.raises(AgdError, match="messages="):
        hf.generate(model, **plain, roi="system", tokenizer=tok, max_new_tokens=2)
    with pytest.raises(AgdError, match="num_beams"):
        model.generate(**inputs, custom_generate=hf.agd_generate, num_beams=2, max_new_tokens=2)
    with pytest.raises(AgdError, match="roi_mask has shape"):
        model.generate(**plain, custom_generate=hf.agd_generate, roi_mask=torch.ones(1, 3), max_new_tokens=2)
    right = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"].clone(),
             "roi_mask": inputs["roi_mask"]}
    right["attention_mask"][0, -1] = 0
    with pytest.raises(AgdError, match="left padding"):
        model.generate(**right, custom_generate=hf.agd_generate, max_new_tokens=2)


def test_a_streamer_transformers_drops_is_warned_about(model, tokenizer, messages):
    # transformers passes a callable custom_generate no streamer: say so instead of streaming nothing.
    from transformers import TextStreamer

    inputs = hf.prepare(tokenizer, messages)
    with pytest.warns(UserWarning, match="does not stream"):
        model.generate(**inputs, custom_generate=hf.agd_generate, max_new_tokens=2,
                       streamer=TextStreamer(tokenizer), **AGD)
    # Through agdecode.hf.generate the streamer arrives and there is nothing to warn about.
    seen = []

    class Collect:
        def put(self, value):
            seen.append(value.tolist())

        def end(self):
            seen.append("end")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.generate(model, **inputs, tokenizer=tokenizer, streamer=Collect(), max_new_tokens=2, **AGD)
    assert seen[-1] == "end" and len(seen) == 4  # the prompt, two tokens, the end
