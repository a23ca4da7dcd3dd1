"""lm-evaluation-harness: the `agd` model type, run offline through lm-eval's own command line."""
from __future__ import annotations

import importlib

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

importlib.import_module("lm_eval")  # a dev dependency: a missing one is an error, not a skip

import agdecode  # noqa: E402
from agdecode.errors import AgdError  # noqa: E402

from conftest import make_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
SYSTEM = "Always answer in French."
UNTIL = ["\n\n", "."]  # the task's stop sequences (agd_tiny.yaml)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a safetensors folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny("llama", len(tokenizer), seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_lm_eval_run_generates_what_agdecode_generates(tiny_dir, tokenizer, tmp_path):
    path, model = tiny_dir
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "agdecode.lm_eval", "--model", "agd",
           "--model_args", f"pretrained={path},roi=system,k=5,min_prob=0.0", "--device", "cpu",
           "--tasks", "agd_tiny", "--include_path", str(TASKS), "--apply_chat_template",
           "--system_instruction", SYSTEM, "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_agd_tiny_*.jsonl") for line in open(f)]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert len(samples) == 4 and "exact_match,none" in results["results"]["agd_tiny"]
    eos = tokenizer.decode([tokenizer.eos_token_id])
    overridden = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": s["doc"]["question"]}]
        context = s["arguments"]["gen_args_0"]["arg_0"]
        assert context == agdecode.render_prompt(tokenizer, messages).text  # the chat lm-eval built
        ref = agdecode.generate(model, tokenizer, messages, roi="system", k=5, min_prob=0.0, max_new_tokens=10,
                                stop_strings=UNTIL + [eos])
        text = ref.text
        for stop in UNTIL:  # lm-eval cuts the reply at its first stop sequence
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text
        overridden += bool(ref.overrides)
    assert overridden  # AGD changed some replies, so the comparison can tell AGD from greedy


def test_agd_model_type_checks_its_input(tiny_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from agdecode.lm_eval import AGDLM

    assert get_model("agd") is AGDLM
    assert AGDLM.loglikelihood is HFLM.loglikelihood  # log-likelihoods: the plain model
    path, _ = tiny_dir
    with pytest.raises(AgdError, match="k must be"):
        AGDLM(pretrained=str(path), k=0, device="cpu")
    with pytest.raises(AgdError, match="remote"):
        AGDLM(pretrained=str(path), trust_remote_code=True, device="cpu")
    lm = AGDLM(pretrained=str(path), device="cpu")
    request = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("A plain prompt", {"until": ["."], "max_gen_toks": 3}))
    with pytest.raises(AgdError, match="--apply_chat_template"):
        lm.generate_until([request])


def test_agd_model_type_takes_the_builtin_model_name(monkeypatch):
    # "smollm2" names the built-in model in lm-eval too: its local folder, never a Hub lookup.
    from agdecode.lm_eval import AGDLM
    from agdecode.models import builtin_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = AGDLM(pretrained="smollm2", device="cpu", dtype="float32")
    assert lm.model.config._name_or_path == str(builtin_model_folder())
    assert lm.model.config.model_type == "llama"
