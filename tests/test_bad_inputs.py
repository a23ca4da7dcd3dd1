"""Every bad input tried so far, one case each: a clean error naming the problem, never a traceback or a
silent wrong result. API cases run on a tiny random model; CLI cases check exit status 2 and one
``agd: error:`` line (argparse's own errors: its usage and one error line); eval-file and report-file
cases check the error of the reader. Add a case here for every new bad input found."""
from __future__ import annotations

import json
import time

import pytest

from agdecode import AgdError, ROI, generate
from agdecode.cli import main
from conftest import make_tiny

MSGS = [{"role": "system", "content": "Always answer in French."}, {"role": "user", "content": "Tell me about cats."}]
DOCS = [{"title": "Cats", "text": "Cats are small mammals."}, {"title": "Paris", "text": "Paris is in France."}]
GOOD_HEADS = {"heads": [[0, 1], [1, 2]]}


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama):
    """Bad (and good) input files, written once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    model_dir = d / "tiny"
    llama[0].save_pretrained(model_dir)
    llama[1].save_pretrained(model_dir)
    write = {
        "heads_not_json.json": "{not json", "heads_list.json": "[[0, 1]]",
        "heads_triples.json": json.dumps({"heads": [[0, 1, 2]]}), "heads_strings.json": json.dumps({"heads": [["a", "b"]]}),
        "heads_empty.json": json.dumps({"heads": []}), "heads_no_kind.json": json.dumps({"top": {"parametric": [[0, 1]]},
                                                                                         "kind": "in-context"}),
        "heads_bools.json": json.dumps({"heads": [[True, False]]}), "heads_good.json": json.dumps(GOOD_HEADS),
        "docs_not_json.json": "[{", "docs_number.json": "5", "docs_no_text.json": json.dumps([{"title": "x"}]),
        "docs_empty.json": "[]",
        "qa_good.jsonl": json.dumps({"id": "q1", "question": "capital of france", "answers": ["Paris"]}) + "\n",
        "qa_empty.jsonl": "", "qa_not_json.jsonl": "{oops\n", "qa_array.jsonl": "[1, 2]\n",
        "qa_no_answers.jsonl": json.dumps({"id": "q1", "question": "q"}) + "\n",
        "qa_dup.jsonl": "".join(json.dumps({"id": "q1", "question": "q", "answers": ["a"]}) + "\n" for _ in range(2)),
        "qa_bad_docs.jsonl": json.dumps({"id": "q1", "question": "q", "answers": ["a"], "documents": [{"x": 1}]}) + "\n",
        "qa_bool_id.jsonl": json.dumps({"id": True, "question": "q", "answers": ["a"]}) + "\n",
        "rules_unknown_kwarg.jsonl": json.dumps({"id": 1, "messages": [{"role": "user", "content": "Hi"}],
                                                 "instruction_id_list": ["punctuation:no_comma"],
                                                 "kwargs": [{"nope": 3}]}) + "\n",
        "rules_unknown_rule.jsonl": json.dumps({"id": 1, "messages": [{"role": "user", "content": "Hi"}],
                                                "instruction_id_list": ["no:such"], "kwargs": [{}]}) + "\n",
        "rules_no_user.jsonl": json.dumps({"id": 1, "messages": [{"role": "system", "content": "Hi"}],
                                           "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n",
        "prompts_empty.txt": "\n\n",
        "notes.txt": "my notes, not agd's\n",
        "page.html": "<html>my page</html>",
        "input_id_null.jsonl": json.dumps({"id": None, "messages": MSGS}) + "\n",
        "input_id_object.jsonl": json.dumps({"id": {"a": 1}, "messages": MSGS}) + "\n",
        "input_good.jsonl": json.dumps({"id": "a", "messages": MSGS}) + "\n",
    }
    for name, text in write.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "qa_latin1.jsonl").write_bytes(json.dumps({"id": "q1", "question": "café", "answers": ["x"]},
                                                   ensure_ascii=False).encode("latin-1") + b"\n")
    (d / "trace_latin1.json").write_bytes('{"text": "café"}'.encode("latin-1"))
    # Run directories: a corrupt run.json, a records line that is not JSON.
    for name, run, records in [("run_corrupt", "{", ""), ("run_no_settings", '{"info": {}}', ""),
                               ("records_corrupt", None, '{"id": "q1"}\nnot json\n')]:
        run_dir = d / "runs" / name / "greedy"
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(run if run is not None else json.dumps({"settings": {"task": "qa"}}))
        (run_dir / "records.jsonl").write_text(records)
    # Traces: a good one, then each with one field missing or broken.
    model, tok = llama
    good = generate(model, tok, MSGS, max_new_tokens=2, k=3, min_prob=0.0).to_dict()
    (d / "trace_good.json").write_text(json.dumps(good))
    broken = {
        "no_steps_list": {**good, "steps": 5}, "no_tokens": {k: v for k, v in good.items() if k != "tokens"},
        "no_config": {k: v for k, v in good.items() if k != "config"},
        "no_roi_positions": {k: v for k, v in good.items() if k != "roi_positions"},
        "roi_positions_number": {**good, "roi_positions": {"system": 5}},  # rendered a blank page before
        "step_no_entropy": {**good, "steps": [{k: v for k, v in s.items() if k != "entropy"} for s in good["steps"]]},
        "candidate_no_prob": {**good, "steps": [{**s, "candidates": [{"token_id": 1, "token": "a"}]}
                                                for s in good["steps"]]},
        "tokens_mismatch": {**good, "tokens": good["tokens"][:1]},
        "relevance_bad": {**good, "extra": {"relevance": {"0": "x"}}},
        "prompt_tokens_number": {**good, "prompt_tokens": 3},
        "step_not_object": {**good, "steps": [1, 2]},
        "model_number": {**good, "model": 5},
        "seconds_word": {**good, "seconds": "fast"},
        "scores_strings": {**good, "steps": [{**st, "candidates": [{**c, "scores": "high"} for c in st["candidates"]]}
                                             for st in good["steps"]]},
        "scores_list": {**good, "steps": [{**st, "candidates": [{**c, "scores": [1, 2]} for c in st["candidates"]]}
                                          for st in good["steps"]]},
        "relevance_superscript_key": {**good, "extra": {"relevance": {"\u00b2": [0.1]}}},
        "text_number": {**good, "text": 5},
        "token_ids_strings": {**good, "token_ids": ["a"] * len(good["token_ids"])},
    }
    for name, data in broken.items():
        (d / f"trace_{name}.json").write_text(json.dumps(data))
    (d / "trace_huge_number.json").write_text(json.dumps(good).replace(
        '"entropy": ', '"entropy": ' + "9" * 400 + ", \"x_entropy\": ", 1))
    (d / "trace_not_json.json").write_text("{")
    (d / "trace_other.json").write_text('{"x": 1}')
    (d / "trace_list.json").write_text("[]")
    return d


# --- API: generate(...) -------------------------------------------------------------------------

API = [
    # (case id, generate keywords, expected error type, message pattern)
    ("roi-int", dict(roi=5), AgdError, "A ROI must be a string or ROI, got int"),
    ("roi-empty-list", dict(roi=[]), AgdError, "roi is an empty list"),
    ("roi-list-of-int", dict(roi=["system", 5]), AgdError, "got int"),
    ("roi-none", dict(roi=None), AgdError, "needs a ROI"),
    ("roi-unknown", dict(roi="banana"), AgdError, "Cannot parse ROI 'banana'"),
    ("roi-dangling-operator", dict(roi="system +"), AgdError, "Cannot parse ROI"),
    ("roi-double-operator", dict(roi="system + - user"), AgdError, "Cannot parse ROI"),
    ("roi-role-empty", dict(roi="role:"), AgdError, "Cannot parse ROI"),
    ("roi-message-word", dict(roi="message:x"), AgdError, "Cannot parse ROI 'message:x'"),
    ("roi-message-out-of-range", dict(roi="message:-9"), AgdError, "there are only 2 messages"),
    ("roi-chars-letters", dict(roi="chars:a-b"), AgdError, "Cannot parse ROI"),
    ("roi-chars-reversed", dict(roi="chars:9-3"), AgdError, "needs A < B"),
    ("roi-chars-beyond", dict(roi="chars:0-99999"), AgdError, "is not in the prompt"),
    ("roi-tokens-reversed", dict(roi="tokens:9-3"), AgdError, "range 9-3 is reversed"),
    ("roi-tokens-huge-range", dict(roi="tokens:0-30000000"), AgdError, r"0-30000000 are outside the prompt"),
    ("roi-tokens-huge-object", dict(roi=ROI("tokens", ((0, 10**12),))), AgdError, "outside the prompt"),
    ("roi-tokens-negative-text", dict(roi="tokens:-3"), AgdError, "Cannot parse ROI"),
    ("roi-tokens-empty", dict(roi="tokens:"), AgdError, "Cannot parse ROI"),
    ("roi-document-zero", dict(roi="document:0", documents=DOCS), AgdError, "numbered from 1"),
    ("roi-document-missing", dict(roi="document:3", documents=DOCS), AgdError, "there are 2 documents"),
    ("roi-context-without-documents", dict(roi="context"), AgdError, "needs documents"),
    ("roi-assistant-absent", dict(roi="assistant"), AgdError, "no 'assistant' message"),
    ("roi-cancels-out", dict(roi="system - system"), AgdError, "selects nothing"),
    ("heads-layer-out-of-range", dict(roi="heads:99.0"), AgdError, "layer out of range"),
    ("heads-head-out-of-range", dict(roi="heads:0.99"), AgdError, "head out of range"),
    ("heads-garbage", dict(roi="heads:abc"), AgdError, "Cannot parse head ROI"),
    ("heads-no-shipped-set", dict(roi="heads:parametric"), AgdError, "No shipped 'parametric' head set"),
    ("documents-int", dict(roi="context", documents=5), AgdError, "documents must be a list"),
    ("documents-str", dict(roi="context", documents="Cats are small."), AgdError, "documents must be a list"),
    ("documents-list-of-int", dict(roi="context", documents=[5]), AgdError, "document 1 must be a dict"),
    ("documents-no-text", dict(roi="context", documents=[{"title": "x"}]), AgdError, "string 'text'"),
    ("k-zero", dict(k=0), ValueError, "k must be an integer >= 1"),
    ("k-float", dict(k=2.5), ValueError, "k must be an integer >= 1"),
    ("min-prob-above-one", dict(min_prob=2.0), ValueError, r"min_prob must be in \[0, 1\]"),
    ("threshold-word", dict(entropy_threshold="high"), ValueError, "entropy_threshold must be"),
    ("max-new-tokens-negative", dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an integer >= 1"),
    ("method-unknown", dict(method="beam"), ValueError, "method must be one of"),
    ("seed-beyond-64-bits", dict(method="sample", seed=2**64), AgdError, r"seed must be an integer from -2\*\*63"),
    ("seed-a-string", dict(method="sample", seed="7"), AgdError, "seed must be an integer"),
    # The rest of generate()'s surface, one case a setting (round of issue 25).
    ("logits-processor-int", dict(logits_processor=5), AgdError, "logits_processor must be a list"),
    ("logits-processor-list-of-int", dict(logits_processor=[5]), AgdError, "logits_processor must be a list"),
    ("stopping-criteria-int", dict(stopping_criteria=5), AgdError, "stopping_criteria must be a list"),
    ("stopping-criteria-list-of-int", dict(stopping_criteria=[5]), AgdError, "stopping_criteria must be a list"),
    ("streamer-int", dict(streamer=5), AgdError, "streamer must have put"),
    ("template-kwargs-generation-prompt", dict(chat_template_kwargs={"add_generation_prompt": False}), AgdError,
     "may not set add_generation_prompt"),
    ("template-kwargs-tokenize", dict(chat_template_kwargs={"tokenize": True}), AgdError, "may not set tokenize"),
    ("template-kwargs-not-a-dict", dict(chat_template_kwargs=["x"]), AgdError, "chat_template_kwargs must be a dict"),
    ("stop-strings-too-many", dict(stop_strings=[f"s{i}" for i in range(1000)]), AgdError, "at most 128 stop strings"),
    ("stop-strings-empty-string", dict(stop_strings=[""]), AgdError, "stop_strings must be a non-empty list"),
    ("stop-strings-a-string", dict(stop_strings="\n"), AgdError, "stop_strings must be a non-empty list"),
    ("min-prob-ratio-above-one", dict(min_prob_ratio=1.5), AgdError, r"min_prob_ratio must be in \[0, 1\]"),
    ("min-prob-ratio-string", dict(min_prob_ratio="0.3"), AgdError, r"min_prob_ratio must be in \[0, 1\]"),
    ("min-new-tokens-negative", dict(min_new_tokens=-1), AgdError, "min_new_tokens must be an integer >= 0"),
    ("no-repeat-ngram-negative", dict(no_repeat_ngram_size=-2), AgdError, "no_repeat_ngram_size must be"),
    ("bad-words-empty-list", dict(bad_words_ids=[[]]), AgdError, "bad_words_ids must be a non-empty list"),
    ("bad-words-negative-id", dict(bad_words_ids=[[-5]]), AgdError, "bad_words_ids must be a non-empty list"),
    ("repetition-penalty-zero", dict(repetition_penalty=0), AgdError, "repetition_penalty must be a number > 0"),
    ("repetition-penalty-nan", dict(repetition_penalty=float("nan")), AgdError, "repetition_penalty must be"),
    ("cad-alpha-negative", dict(method="cad", cad_alpha=-1), AgdError, "cad_alpha must be a number >= 0"),
    ("dola-layers-word", dict(method="dola", dola_layers="middle"), AgdError, "dola_layers must be 'low', 'high'"),
    ("dola-layers-empty", dict(method="dola", dola_layers=[]), AgdError, "dola_layers must be"),
    ("steer-layer-negative", dict(method="steer", steer_vector="v.safetensors", steer_layer=-1), AgdError,
     "steer_layer must be None or an integer >= 0"),
    ("steer-layer-with-agd", dict(steer_layer=3), AgdError, "steer_layer is only used by method='steer'"),
    ("steer-weight-inf", dict(method="steer", steer_vector="v.safetensors", steer_weight=float("inf")), AgdError,
     "steer_weight must be a finite number"),
    ("temperature-zero", dict(method="sample", temperature=0), AgdError, "temperature must be a number > 0"),
    ("top-p-zero", dict(method="sample", top_p=0), AgdError, r"top_p must be in \(0, 1\]"),
    ("engine-unknown", dict(engine="turbo"), AgdError, "engine must be one of"),
    ("attribution-unknown", dict(attribution="shap"), AgdError, "attribution must be one of"),
    ("batch-size-zero", dict(batch_size=0), AgdError, "batch_size must be an integer >= 1"),
    ("batch-size-float", dict(batch_size=2.0), AgdError, "batch_size must be an integer >= 1"),
    ("config-not-a-config", dict(config={"k": 3}), AgdError, "config must be an AGDConfig"),
    ("setting-unknown", dict(top_k=5), AgdError, "unknown generation setting"),
    ("k-larger-than-vocab", dict(k=10**7), AgdError, "larger than the model's vocabulary"),
    ("threshold-nan", dict(entropy_threshold=float("nan")), AgdError, "entropy_threshold must be"),
    ("threshold-bool", dict(entropy_threshold=True), AgdError, "entropy_threshold must be"),
    ("max-new-tokens-beyond-context", dict(max_new_tokens=10**6), AgdError, "exceeds the model's context"),
    ("roi-list-with-int", dict(roi=["system", 5]), AgdError, "got int"),
]


@pytest.mark.parametrize("kwargs, error, match", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api(llama, kwargs, error, match):
    kwargs = {"max_new_tokens": 1, **kwargs}
    start = time.perf_counter()
    with pytest.raises(error, match=match) as e:
        generate(*llama, MSGS, **kwargs)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400  # one short line, whatever the input
    assert time.perf_counter() - start < 5  # no work before the refusal (tokens:0-30000000 included)


@pytest.mark.parametrize("name, match", [
    ("heads_not_json.json", r"heads_not_json.json: not JSON"),
    ("heads_list.json", r"heads_list.json: expected a JSON object"),
    ("heads_triples.json", r"heads_triples.json: head \[0, 1, 2\] is not a \[layer, head\] pair"),
    ("heads_strings.json", r"heads_strings.json: head \['a', 'b'\] is not a \[layer, head\] pair"),
    ("heads_bools.json", r"heads_bools.json: head \[True, False\] is not"),
    ("heads_empty.json", r"heads_empty.json: the head list must be a non-empty list"),
    ("heads_no_kind.json", r"heads_no_kind.json holds no head list"),
    ("missing.json", r"Head-set file '.*missing.json' not found"),
])
def test_api_head_files(llama, files, name, match):
    with pytest.raises(AgdError, match=match):
        generate(*llama, MSGS, roi=f"heads:{files / name}", max_new_tokens=1)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "caf\ud800"}], "is not valid Unicode text"),
    ([{"role": "system", "content": "\udfff"}, {"role": "user", "content": "Hi"}], "is not valid Unicode text"),
    ("lone \ud800 surrogate", "is not valid Unicode text"),
    ([[{"role": "user", "content": "Hi"}], []], "conversation 1"),
    ([{"role": "user"}], "string 'content'"),
    (5, "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    ([{"role": 5, "content": "x"}], "string 'role'"),
    ([{"role": "user", "content": None}], "string 'content'"),
    ([{"role": "user", "content": "Hi"}, "hello"], "message 1 must be a dict"),
    (["hello"], "ROI 'system' needs chat messages, but the prompt is a plain string"),  # a batch of one raw prompt
])
def test_api_messages(llama, messages, match):
    with pytest.raises(AgdError, match=match):
        generate(*llama, messages, max_new_tokens=1)


def test_api_documents_without_a_user_message(llama):
    with pytest.raises(AgdError, match="documents need a user message"):
        generate(*llama, MSGS[:1], roi="context", documents=DOCS, max_new_tokens=1)


# --- CLI ----------------------------------------------------------------------------------------

def _cli(capsys, argv: list[str]) -> str:
    """Run ``agd`` and return its last stderr line, checking status 2 and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # Our errors are one line; argparse's own are its usage lines and then one error line.
    assert lines[-1].startswith("agd") and "error:" in lines[-1]
    assert len(lines) == 1 or lines[0].startswith("usage:")
    return lines[-1]


NOWHERE = "/nonexistent/model"  # cases checked before the model loads would otherwise say "not found"

CLI = [
    ("generate-no-prompt", ["generate", "--model", NOWHERE], "give the user message"),
    ("generate-json-swallows-prompt", ["generate", "--json", "Tell me about cats.", "--model", NOWHERE],
     "give the user message"),
    ("generate-json-without-file", ["generate", "Hi", "--json"], "expected one argument"),
    ("generate-json-missing-dir", ["generate", "Hi", "--roi", "user", "--json", "/nonexistent/dir/t.json",
                                   "--model", NOWHERE], "does not exist"),
    ("generate-json-is-dir", ["generate", "Hi", "--roi", "user", "--json", "{tmp}", "--model", NOWHERE],
     "is a directory"),
    ("generate-no-system-default-roi", ["generate", "Hi", "--model", NOWHERE], "the default ROI is the system message"),
    ("generate-roi-unparsable", ["generate", "Hi", "--roi", "banana", "--model", NOWHERE], "Cannot parse ROI 'banana'"),
    ("generate-roi-tokens-reversed", ["generate", "Hi", "--roi", "tokens:9-1", "--model", NOWHERE], "reversed"),
    ("generate-roi-tokens-huge", ["generate", "Hi", "--roi", "tokens:0-30000000", "--model", "{model}"],
     "0-30000000 are outside the prompt"),
    ("generate-heads-missing-file", ["generate", "Hi", "--roi", "heads:missing.json", "--model", NOWHERE],
     "not found"),
    ("generate-heads-not-json", ["generate", "Hi", "--roi", "heads:{files}/heads_not_json.json", "--model", NOWHERE],
     "heads_not_json.json: not JSON"),
    ("generate-heads-wrong-shape", ["generate", "Hi", "--roi", "heads:{files}/heads_triples.json", "--model", NOWHERE],
     r"heads_triples.json: head \[0, 1, 2\]"),
    ("generate-k-zero", ["generate", "Hi", "--roi", "user", "--k", "0", "--model", NOWHERE], "k must be an integer >= 1"),
    ("generate-k-word", ["generate", "Hi", "--k", "many"], "invalid int value"),
    ("generate-min-prob", ["generate", "Hi", "--roi", "user", "--min-prob", "2", "--model", NOWHERE], "min_prob"),
    ("generate-threshold-word", ["generate", "Hi", "--entropy-threshold", "high"], "a number of nats or 'auto'"),
    ("generate-threshold-negative", ["generate", "Hi", "--roi", "user", "--entropy-threshold", "-1",
                                     "--model", NOWHERE], "entropy_threshold must be"),
    ("generate-max-new-tokens-zero", ["generate", "Hi", "--roi", "user", "--max-new-tokens", "0", "--model", NOWHERE],
     "max_new_tokens must be"),
    ("generate-documents-missing", ["generate", "Hi", "--roi", "context", "--documents", "missing.json",
                                    "--model", NOWHERE], "--documents missing.json: cannot read"),
    ("generate-documents-not-json", ["generate", "Hi", "--roi", "context", "--documents", "{files}/docs_not_json.json",
                                     "--model", NOWHERE], "cannot read a JSON list"),
    ("generate-documents-number", ["generate", "Hi", "--roi", "context", "--documents", "{files}/docs_number.json",
                                   "--model", NOWHERE], "documents must be a list"),
    ("generate-documents-no-text", ["generate", "Hi", "--roi", "context", "--documents",
                                    "{files}/docs_no_text.json", "--model", NOWHERE], "string 'text'"),
    ("generate-documents-empty", ["generate", "Hi", "--roi", "context", "--documents", "{files}/docs_empty.json",
                                  "--model", NOWHERE], "the list of documents is empty"),
    ("generate-steer-without-vector", ["generate", "Hi", "--method", "steer", "--model", NOWHERE],
     "needs steer_vector"),
    ("generate-steer-vector-missing", ["generate", "Hi", "--method", "steer", "--steer-vector", "nope.safetensors",
                                       "--model", NOWHERE], "--steer-vector 'nope.safetensors' not found"),
    ("generate-unknown-method", ["generate", "Hi", "--method", "beam"], "invalid choice"),
    ("steer-fit-no-prompts", ["steer", "fit", "--instruction", "French.", "--prompts", "{files}/prompts_empty.txt",
                              "--out", "{tmp}/v.safetensors", "--model", NOWHERE], "no prompts"),
    ("steer-fit-prompts-missing", ["steer", "fit", "--instruction", "French.", "--prompts", "missing.txt",
                                   "--out", "{tmp}/v.safetensors", "--model", NOWHERE], "--prompts missing.txt"),
    ("eval-limit-zero", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--limit", "0"], "expected a positive integer"),
    ("eval-limit-negative", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--limit", "-1"],
     "expected a positive integer"),
    ("eval-limit-word", ["eval", "rules", "--limit", "all"], "expected a positive integer"),
    ("eval-max-new-tokens-zero", ["eval", "rules", "--max-new-tokens", "0"], "expected a positive integer"),
    ("eval-data-missing", ["eval", "qa", "--data", "missing.jsonl", "--model", NOWHERE],
     "neither a built-in qa set"),
    ("eval-data-wrong-task", ["eval", "qa", "--data", "rules", "--model", NOWHERE], "is a rules set, not a qa set"),
    ("eval-data-latin1", ["eval", "qa", "--data", "{files}/qa_latin1.jsonl", "--model", NOWHERE], "is not UTF-8"),
    ("eval-data-empty", ["eval", "qa", "--data", "{files}/qa_empty.jsonl", "--model", NOWHERE], "no valid qa item"),
    ("eval-method-unknown", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--method", "nope", "--model", NOWHERE],
     "Unknown method 'nope'"),
    ("eval-method-roi-unparsable", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--method", "agd@banana",
                                    "--model", NOWHERE], "Cannot parse ROI 'banana'"),
    ("eval-set-without-value", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--set", "k", "--model", NOWHERE],
     "--set expects KEY=VALUE"),
    ("eval-set-unknown-key", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--set", "kk=3", "--model", NOWHERE],
     r"no argument\(s\) \['kk'\]"),
    ("eval-set-bad-k", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--set", "k=0", "--model", NOWHERE],
     "k must be an integer >= 1"),
    ("eval-out-is-a-file", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--out", "{files}/qa_good.jsonl",
                            "--model", NOWHERE], "exists and is not a directory"),
    ("eval-calibration-missing", ["eval", "qa", "--data", "{files}/qa_good.jsonl", "--method", "agd-gated-auto",
                                  "--calibration", "missing.json", "--model", NOWHERE], "--calibration 'missing.json'"),
    ("calibrate-limit-zero", ["calibrate", "--limit", "0"], "expected a positive integer"),
    ("calibrate-percentile", ["calibrate", "--percentile", "120", "--model", NOWHERE], r"--percentile must be in \[0, 100\]"),
    ("heads-n-items-zero", ["heads", "discover", "--n-items", "0", "--out", "{tmp}/h.json"], "expected a positive integer"),
    ("heads-n-items-one", ["heads", "discover", "--n-items", "1", "--out", "{tmp}/h.json", "--model", NOWHERE],
     "--n-items must be at least 2"),
    ("heads-out-missing-dir", ["heads", "discover", "--out", "/nonexistent/dir/h.json", "--model", NOWHERE],
     "does not exist"),
    ("eval-report-missing", ["eval", "report", "/nonexistent/runs"], "No such run directory"),
    ("eval-report-no-runs", ["eval", "report", "{tmp}"], r"No run \(run.json\)"),
    ("eval-report-corrupt-run-json", ["eval", "report", "{files}/runs/run_corrupt"], r"(is not a run file|not a run description)"),
    ("eval-report-run-json-without-settings", ["eval", "report", "{files}/runs/run_no_settings"],
     r"(is not a run file|not a run description)"),
    ("eval-report-corrupt-records", ["eval", "report", "{files}/runs/records_corrupt"], r"(line 2 is not JSON|not a run description)"),
    ("serve-port-out-of-range", ["serve", "--port", "70000", "--model", NOWHERE], "expected a port from 1 to 65535"),
    ("serve-port-zero", ["serve", "--port", "0", "--model", NOWHERE], "expected a port from 1 to 65535"),
    ("serve-threads-zero", ["serve", "--threads", "0", "--model", NOWHERE], "expected a positive integer"),
    ("serve-max-batch-zero", ["serve", "--max-batch", "0", "--model", NOWHERE], "expected a positive integer"),
    ("serve-max-tokens-negative", ["serve", "--max-tokens", "-1", "--model", NOWHERE], "expected a positive integer"),
    ("serve-replicas-zero", ["serve", "--replicas", "0", "--model", NOWHERE], "expected a positive integer"),
    ("serve-unknown-dtype", ["serve", "--dtype", "bf17", "--model", NOWHERE], "dtype must be one of auto"),
    ("generate-unknown-dtype", ["generate", "hi", "--system", "x", "--dtype", "bf17", "--model", NOWHERE], "dtype must be one of auto"),
    ("report-missing", ["report", "missing.json"], "no trace file at missing.json"),
    ("report-not-json", ["report", "{files}/trace_not_json.json"], "is not JSON"),
    ("report-latin1", ["report", "{files}/trace_latin1.json"], "is not JSON"),
    ("report-not-a-trace", ["report", "{files}/trace_other.json"], "is not a trace"),
    ("report-blank-page-trace", ["report", "{files}/trace_roi_positions_number.json", "-o", "{tmp}/r.html"],
     "'roi_positions' must map ROI names to lists"),
    ("report-output-under-a-file", ["report", "{files}/trace_good.json", "-o", "{files}/qa_good.jsonl/r.html"],
     "qa_good.jsonl' is not a directory"),
    # Round of issue 25: sampling settings, huge numbers, clobbering, eval files, heads.
    ("generate-seed-beyond-64-bits", ["generate", "Hi", "--roi", "user", "--method", "sample", "--seed",
                                      "18446744073709551616", "--model", NOWHERE], "seed must be an integer from"),
    ("generate-temperature-with-agd", ["generate", "Hi", "--roi", "user", "--temperature", "0.7", "--model", NOWHERE],
     "--temperature only apply to --method sample"),
    ("generate-top-p-with-compare", ["generate", "Hi", "--system", "x", "--compare", "--top-p", "0.5",
                                     "--model", NOWHERE], "--top-p only apply to --method sample"),
    ("generate-json-empty", ["generate", "Hi", "--roi", "user", "--json", "", "--model", NOWHERE],
     "--json needs a file name"),
    ("generate-json-foreign-file", ["generate", "Hi", "--roi", "user", "--json", "{files}/notes.txt",
                                    "--model", NOWHERE], "exists and was not written by agd"),
    ("generate-json-is-the-documents", ["generate", "Hi", "--roi", "context", "--documents",
                                        "{files}/docs_no_text.json", "--json", "{files}/docs_no_text.json",
                                        "--model", NOWHERE], "string 'text'|is also the input"),
    ("generate-lone-surrogate", ["generate", "caf\udcff", "--roi", "user", "--model", "{model}"],
     "is not valid Unicode text"),
    ("generate-stop-too-many", ["generate", "Hi", "--roi", "user", *(["--stop", "x"] * 200), "--model", NOWHERE],
     "at most 128 stop strings"),
    ("generate-input-id-null", ["generate", "--input", "{files}/input_id_null.jsonl", "--model", NOWHERE],
     "'id' must be a non-empty string or an integer"),
    ("generate-input-id-object", ["generate", "--input", "{files}/input_id_object.jsonl", "--model", NOWHERE],
     "'id' must be a non-empty string or an integer"),
    ("generate-output-foreign-file", ["generate", "--input", "{files}/input_good.jsonl", "--output",
                                      "{files}/notes.txt", "--model", NOWHERE], "was not written by `agd generate"),
    ("generate-input-batch-size-zero", ["generate", "--input", "{files}/input_good.jsonl", "--batch-size", "0",
                                        "--model", NOWHERE], "--batch-size must be at least 1"),
    ("report-output-is-the-input", ["report", "{files}/trace_good.json", "-o", "{files}/trace_good.json"],
     "is also the input"),
    ("report-output-foreign-page", ["report", "{files}/trace_good.json", "-o", "{files}/page.html"],
     "was not written by agd"),
    ("report-huge-number", ["report", "{files}/trace_huge_number.json", "-o", "{tmp}/r.html"], "not a finite number"),
    ("report-model-number", ["report", "{files}/trace_model_number.json", "-o", "{tmp}/r.html"],
     "field 'model' must be a string"),
    ("steer-fit-foreign-json", ["steer", "fit", "--instruction", "French.", "--prompt", "Hi", "--out",
                                "{files}/docs_empty.safetensors", "--model", NOWHERE], "exists and was not written"),
    ("heads-batch-size-zero", ["heads", "discover", "--batch-size", "0", "--out", "{tmp}/h.json"],
     "expected a positive integer"),
    ("heads-batch-size-negative", ["heads", "discover", "--batch-size", "-1", "--out", "{tmp}/h.json"],
     "expected a positive integer"),
    ("eval-threads-zero", ["eval", "rules", "--threads", "0"], "expected a positive integer"),
    ("serve-prefix-cache-negative", ["serve", "--prefix-cache-mb", "-1"], "expected an integer >= 0"),
    ("serve-prefix-cache-word", ["serve", "--prefix-cache-mb", "lots"], "expected an integer >= 0"),
    ("serve-prefix-cache-huge", ["serve", "--prefix-cache-mb", "99999999999999"], r"at most 2\*\*40"),
    ("eval-batch-size-zero", ["eval", "rules", "--batch-size", "0"], "expected a positive integer"),
    ("eval-archive-to-a-file", ["eval", "archive", "{files}/runs/records_corrupt", "--to", "{files}/notes.txt"],
     "is a file, not a folder"),
    ("eval-report-update-doc-missing", ["eval", "report", "--update-doc", "{tmp}/missing.md",
                                        "{files}/runs/records_corrupt"], "missing.md: cannot read it"),
    ("eval-report-check-doc-not-utf8", ["eval", "report", "--check-doc", "{files}/qa_latin1.jsonl",
                                        "{files}/runs/records_corrupt"], "cannot read it as a UTF-8"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli(files, tmp_path, capsys, argv, match):
    argv = [a.format(files=files, tmp=tmp_path, model=files / "tiny") for a in argv]
    import re

    line = _cli(capsys, argv)
    assert re.search(match, line), line


# --- eval files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, task, match", [
    ("qa_latin1.jsonl", "qa", "line 1 is not UTF-8 text"),
    ("qa_empty.jsonl", "qa", "no valid qa item"),
    ("qa_not_json.jsonl", "qa", "line 1: not JSON"),
    ("qa_array.jsonl", "qa", "line 1: not a JSON object"),
    ("qa_no_answers.jsonl", "qa", "'answers' must be a non-empty list"),
    ("qa_dup.jsonl", "qa", "duplicate id 'q1'"),
    ("qa_bad_docs.jsonl", "qa", r"documents\[0\] must be"),
    ("qa_bool_id.jsonl", "qa", "missing or invalid 'id'"),
    ("rules_unknown_kwarg.jsonl", "rules", r"has argument\(s\) \['nope'\] it does not take"),
    ("rules_unknown_rule.jsonl", "rules", "unknown IFEval instruction"),
    ("rules_no_user.jsonl", "rules", "no user message"),
    ("missing.jsonl", "qa", "No such item file"),
])
def test_eval_files(files, name, task, match):
    from agdecode.eval.data import read_items

    with pytest.raises(AgdError, match=match):
        read_items(files / name, task)


# --- report files -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, match", [
    ("no_steps_list", "field 'steps' must be a list"), ("no_tokens", "field 'tokens' is missing"),
    ("no_config", "field 'config' is missing"), ("no_roi_positions", "'roi_positions' must map"),
    ("roi_positions_number", "'roi_positions' must map"), ("step_no_entropy", "step 0: field 'entropy'"),
    ("candidate_no_prob", "step 0, candidate 0: needs 'token_id' and 'prob'"),
    ("tokens_mismatch", "2 steps but 1 tokens"), ("relevance_bad", "'extra.relevance' must map"),
    ("prompt_tokens_number", "'prompt_tokens' is not a list"), ("step_not_object", "step 0 is not an object"),
    ("list", "is not a trace"), ("latin1", "is not JSON"),
    ("model_number", "field 'model' must be a string"), ("seconds_word", "field 'seconds' must be a number"),
    ("scores_strings", "step 0, candidate 0: 'scores' must map"), ("scores_list", "step 0, candidate 0: 'scores' must map"),
    ("relevance_superscript_key", "'extra.relevance' must map"), ("text_number", "field 'text' must be a string"),
    ("token_ids_strings", "field 'token_ids' must be a list of integers"),
    ("huge_number", "step 0: 'entropy' is not a finite number"),
])
def test_report_files(files, name, match):
    from agdecode.report.html import load_results

    with pytest.raises(AgdError, match=match):
        load_results(files / f"trace_{name}.json")


def test_the_good_files_are_accepted(files, llama):
    """The fixtures' good files work, so the bad ones fail for the reason named."""
    from agdecode.eval.data import read_items
    from agdecode.heads import read_head_file
    from agdecode.report.html import load_results

    assert read_head_file(files / "heads_good.json") == GOOD_HEADS["heads"]
    assert len(read_items(files / "qa_good.jsonl", "qa").items) == 1
    assert len(load_results(files / "trace_good.json")) == 1
    assert generate(*llama, MSGS, roi=f"heads:{files / 'heads_good.json'}", max_new_tokens=1, k=3, min_prob=0.0)
