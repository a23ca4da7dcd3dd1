"""Loading: local folders, GGUF files, Hub ids from the cache; every bad model input one clean error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import agdecode
from agdecode.errors import AgdError, QuantizedWeightsError
from agdecode.models import ModelLoadError, ModelNotFoundError, UnsafeModelError, load_model
from conftest import make_tiny

SRC = Path(agdecode.__file__).parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny Llama with the SmolLM2 tokenizer, saved as a Hugging Face folder (safetensors)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_folder_loads(folder, tokenizer):
    model, tok = load_model(folder, dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).device == torch.device("cpu") and model.dtype == torch.float32
    assert tok("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]
    model, _ = load_model(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_exactly_where_the_device_has_bf16_units(folder, monkeypatch, native):
    from agdecode import models

    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": (native, "a CPU (test)"))
    want = torch.bfloat16 if native else torch.float32
    assert models.resolve_dtype("auto", "cpu") == want
    assert load_model(folder)[0].dtype == want  # "auto" is the default


def test_cpu_bf16_units_are_detected_not_guessed(monkeypatch):
    from agdecode import models

    found = models.native_bf16("cpu")
    flags = models._cpu_flags()
    if flags:  # torch's own check and /proc/cpuinfo agree on this machine
        assert found[0] == bool({"amx_bf16", "avx512_bf16"} & flags)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert models.native_bf16("cpu") == (False, "CPU without AMX or AVX-512 BF16 units")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert models.native_bf16("cpu") == (True, "CPU with AMX")


def test_slow_or_unsupported_dtypes_warn_once_or_are_refused(monkeypatch):
    from agdecode import models

    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": (False, "CPU without AMX or AVX-512 BF16 units"))
    monkeypatch.setattr(models, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"bfloat16 on a CPU without .* slower than float32; pass dtype='float32'"):
        assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per dtype, not on every load
        models.resolve_dtype("bfloat16", "cpu")
        assert models.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(models, "native_bf16", lambda device="cpu": (False, "CUDA device without bf16 support"))
    with pytest.raises(ModelLoadError, match="bfloat16 is not supported by this CUDA device .* use float16 or float32"):
        models.resolve_dtype("bfloat16", torch.device("cuda"))


def test_fp16_on_a_cpu_without_fp16_units_warns(monkeypatch):
    from agdecode import models

    monkeypatch.setattr(models, "_fp16_units", lambda: False)
    monkeypatch.setattr(models, "_WARNED", set())
    with pytest.warns(UserWarning, match="float16 on a CPU without AVX-512 FP16 or AMX-FP16 units is emulated"):
        assert models.resolve_dtype("fp16", "cpu") == torch.float16


def test_auto_dtype_follows_a_device_map():
    from agdecode.models import _map_device

    assert _map_device({"model": "cpu", "lm_head": "disk"}) == "cpu" and _map_device("cpu") == "cpu"
    assert _map_device({"model": "cpu", "lm_head": 1}) == "cuda:1" and _map_device({"": "cuda:1"}) == "cuda:1"
    assert _map_device("auto") is None and _map_device(0) == "cuda:0"


def test_load_model_resolves_auto_for_the_device_map(folder, monkeypatch, tmp_path):
    from agdecode import models

    seen = []
    real = models.resolve_dtype
    monkeypatch.setattr(models, "resolve_dtype", lambda dtype, device=None: seen.append(device) or real(dtype, "cpu"))
    load_model(folder, device_map={"": "cpu"})
    assert seen == ["cpu"]


def test_fp16_units_silence_the_fp16_warning(monkeypatch):
    import warnings

    from agdecode import models

    monkeypatch.setattr(models, "_fp16_units", lambda: True)
    monkeypatch.setattr(models, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.resolve_dtype("fp16", "cpu") == torch.float16


def test_an_unknown_dtype_is_one_line_before_anything_loads(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^dtype must be one of auto, float32, .* got 'bf17'$"):
        load_model(tmp_path / "not-even-there", dtype="bf17")


def test_device_map_passes_through(folder, tokenizer, messages, tmp_path):
    # Offloading the final norm and a layer to disk makes transformers dispatch with accelerate hooks.
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    model, _ = load_model(folder, dtype="float32", device_map=device_map, offload_folder=tmp_path)
    assert model.hf_device_map == device_map
    assert "_hf_hook" in vars(model.model.norm) and model.model.norm.weight.device.type == "meta"
    plain, _ = load_model(folder, dtype="float32")
    for engine in ("forward", "reverse"):
        got = agdecode.generate(model, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2, engine=engine)
        want = agdecode.generate(plain, tokenizer, messages, k=3, min_prob=0.0, max_new_tokens=2, engine=engine)
        assert got.token_ids == want.token_ids
        assert got.steps[0].candidates[0].scores["system"] == pytest.approx(
            want.steps[0].candidates[0].scores["system"], rel=1e-5)
    assert "_hf_hook" in vars(model.model.norm)
    with pytest.raises(ModelLoadError, match="either device or device_map, not both"):
        load_model(folder, device="cpu", device_map="cpu")
    with pytest.raises(ModelLoadError, match="offload_folder is used only with a device_map"):
        load_model(folder, offload_folder=tmp_path)


# --- every bad model input: one clean error, of the AgdError family ----------------------------

def _copy(folder: Path, dest: Path) -> Path:
    """A cheap copy of ``folder``: weights linked, small files copied (so each case can edit them)."""
    dest.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            (dest / f.name).symlink_to(f)
        else:
            shutil.copy(f, dest / f.name)
    return dest


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for k, v in changes.items():
        if v is None:
            data.pop(k)
    path.write_text(json.dumps(data))


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _pickle_weights(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)


def _corrupt_weights(d):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")


def _shard_index(shard: str, rename_to: str | None = None):
    def edit(d):
        if rename_to:
            (d / "model.safetensors").rename(d / rename_to)
        else:
            (d / "model.safetensors").unlink()
            (d / "pytorch_model-00001-of-00001.bin").write_bytes(b"\x80\x04not really a pickle")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    return edit


FOLDER_CASES = {
    "shard index names a pickle": (_shard_index("pytorch_model-00001-of-00001.bin"), UnsafeModelError,
                                   r"names the shard 'pytorch_model-00001-of-00001.bin'; only safetensors"),
    "shard index leaves the folder": (_shard_index("../other/model.safetensors", "x.safetensors"),
                                      UnsafeModelError, "only safetensors files in the model folder"),
    "shard index names a missing shard": (_shard_index("model-00001-of-00002.safetensors", "x.safetensors"),
                                          ModelLoadError, "which is not in"),
    "bitsandbytes config": (lambda d: _edit_json(d / "config.json", quantization_config={
                                "quant_method": "bitsandbytes", "load_in_4bit": True}),
                            QuantizedWeightsError, r"declares quantised weights \(bitsandbytes\)"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{model_type: llama"),
                        ModelLoadError, r"config.json is not a readable JSON file \(JSONDecodeError"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"),
                      ModelLoadError, "config.json must hold a JSON object, found list"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'),
                         ModelLoadError, "config.json is not a readable JSON file"),
    "remote code (model)": (lambda d: _edit_json(d / "config.json", model_type="evil",
                                                 auto_map={"AutoModelForCausalLM": "evil.Model"}),
                            UnsafeModelError, r"config.json needs the folder's own Python code \(auto_map"),
    "remote code (tokenizer)": (lambda d: _edit_json(d / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                                                     auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}),
                                UnsafeModelError, "tokenizer_config.json needs the folder's own Python code"),
    "unknown model_type": (lambda d: _edit_json(d / "config.json", model_type="banana"),
                           ModelLoadError, "unknown model_type 'banana'"),
    "no model_type": (lambda d: _edit_json(d / "config.json", model_type=None),
                      ModelLoadError, "unknown model_type None"),
    "not a causal LM": (lambda d: _edit_json(d / "config.json", model_type="t5"),
                        ModelLoadError, "model_type 't5' is not a causal language model"),
    "no weights": (_no_weights, ModelLoadError, r"has no model weights \(no \*.safetensors file\)"),
    "pickle weights only": (_pickle_weights, UnsafeModelError, r"has only pickled weights \(pytorch_model.bin\)"),
    "corrupt weights": (_corrupt_weights, ModelLoadError, "Could not load the model from"),
    "no tokenizer": (_no_tokenizer, ModelLoadError, "has no tokenizer"),
    "no config.json": (lambda d: (d / "config.json").unlink(), ModelLoadError, "folder without config.json"),
}


def test_sharded_safetensors_folder_loads(folder, tmp_path):
    from safetensors import safe_open

    d = _copy(folder, tmp_path / "sharded")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    with safe_open(d / "model-00001-of-00001.safetensors", "pt") as f:
        names = list(f.keys())
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    model, _ = load_model(d, dtype="float32")
    reference, _ = load_model(folder, dtype="float32")
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


EVIL = "raise SystemExit('the model folder code ran')\n"


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_bad_folder(folder, tmp_path, monkeypatch, case):
    edit, error, match = FOLDER_CASES[case]
    d = _copy(folder, tmp_path / "model")
    (d / "evil.py").write_text(EVIL)
    edit(d)
    # Never a y/N prompt (transformers asks one for remote code when it is not told False).
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("load_model prompted for input"))
    with pytest.raises(error, match=match) as info:
        load_model(d)
    assert isinstance(info.value, AgdError) and "\n" not in str(info.value)


def test_auto_map_beside_a_builtin_type_loads_the_builtin(folder, tmp_path, monkeypatch):
    # Many Hub repos (Phi-3, ...) declare both a model_type transformers implements and an auto_map:
    # transformers' own code loads, the folder's never runs.
    d = _copy(folder, tmp_path / "model")
    (d / "evil.py").write_text(EVIL)
    _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
    _edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("load_model prompted for input"))
    model, tok = load_model(d)
    assert type(model).__module__ == "transformers.models.llama.modeling_llama"
    assert type(tok).__module__.startswith("transformers.")
    assert "evil" not in sys.modules


def _smollm2_gguf_bytes() -> bytes:
    from agdecode.models import _smollm2_gguf

    return _smollm2_gguf().read_bytes()


def _gguf_arch(path: Path, arch: str):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("t", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


GGUF_CASES = {
    "empty": (lambda p: p.write_bytes(b""), r"is not a GGUF file \(empty\)"),
    "garbage": (lambda p: p.write_bytes(b"hello world" * 10), r"is not a GGUF file \(no GGUF magic bytes\)"),
    "magic only": (lambda p: p.write_bytes(b"GGUF"), "is a truncated GGUF file"),
    "header only": (lambda p: p.write_bytes(_smollm2_gguf_bytes()[:24]), "is a truncated GGUF file"),
    "no tensors": (lambda p: p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + bytes(8)),
                   r"not a usable GGUF model \(version 3, 0 tensors"),
    "cut in metadata": (lambda p: p.write_bytes(_smollm2_gguf_bytes()[:100_000]), "Could not load the tokenizer from"),
    "unknown architecture": (lambda p: _gguf_arch(p, "banana"), "architecture banana is not supported"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_bad_gguf(tmp_path, case):
    make, match = GGUF_CASES[case]
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_truncated_gguf(tmp_path):
    # Cut in the tensor data: found only while the file is read (~8 s), still a clean error.
    path = tmp_path / "model.gguf"
    data = _smollm2_gguf_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="Could not load the tokenizer from .*ValueError: cannot reshape"):
        load_model(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="foo"), "dtype must be one of auto, float32, fp32"),
    (dict(dtype="nn"), "dtype must be one of"),           # getattr(torch, "nn") is a module
    (dict(dtype=torch.int8), "dtype must be one of"),
    (dict(dtype=None), "dtype must be one of"),
    (dict(device="banana"), "device 'banana' is not a torch device"),
    (dict(attn_implementation=""), "attn_implementation must be a name"),
    pytest.param(dict(device="cuda"), "asked for CUDA, but this torch has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    pytest.param(dict(device="cuda:7"), "asked for CUDA|there are only",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="8 CUDA devices")),
])
def test_bad_settings_fail_before_loading(kwargs, match):
    # The model does not exist: the settings are checked first, before any file is looked at.
    with pytest.raises(ModelLoadError, match=match):
        load_model("/does/not/exist", **kwargs)


def test_not_found_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found. Pass a local Hugging Face model folder") as info:
        load_model(tmp_path / "nothing-here")
    assert isinstance(info.value, AgdError) and isinstance(info.value, FileNotFoundError)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf file"):
        load_model(tmp_path / "weights.txt")


# --- Hub ids, from a temporary Hugging Face cache, offline --------------------------------------

_HUB_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from agdecode.models import load_model, ModelNotFoundError
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
print("LOADED", type(model).__name__, model.config.hidden_size, len(tok))
try:
    load_model("nobody/not-cached")
except ModelNotFoundError as e:
    print("ERROR", e)
"""


def _hub_cache(home: Path, folder: Path, repo: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / rev)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return root


def test_hub_id_from_the_cache_offline(folder, tmp_path):
    _hub_cache(tmp_path / "hf", folder, "HuggingFaceTB/SmolLM2-135M-Instruct")
    # A fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED LlamaForCausalLM 64 49152" in out.stdout
    error = out.stdout.split("ERROR ", 1)[1]
    assert error.startswith("Model 'nobody/not-cached' not found. It is not a local file or folder, nor in the "
                            f"Hugging Face cache ({tmp_path / 'hf' / 'hub'}), HF_HUB_OFFLINE is set")
    assert "Pass a local Hugging Face model folder, a .gguf file, a cached Hub id" in error


def test_hub_id_checked_like_a_folder(folder, tmp_path, monkeypatch):
    # A cached snapshot gets the same checks as a local folder (here: remote code refused).
    from huggingface_hub import constants

    root = _hub_cache(tmp_path / "hf", folder, "evil/model")
    snapshot = next((root / "snapshots").iterdir())
    _edit_json(snapshot / "config.json", model_type="evil", auto_map={"AutoModelForCausalLM": "evil.Model"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnsafeModelError, match="auto_map"):
        load_model("evil/model")


@pytest.mark.parametrize("name", ["./org/name", "org/name/extra", "a/b.gguf", "-bad-/name"])
def test_names_that_are_not_hub_ids_are_not_looked_up(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up the Hub"))
    with pytest.raises(ModelNotFoundError, match="not found. Pass a local"):
        load_model(name)


# --- chat-template options ------------------------------------------------------------------

def test_chat_template_kwargs(tokenizer, messages):
    from agdecode.prompt import render_prompt

    saved = tokenizer.chat_template
    tokenizer.chat_template = saved + "{% if enable_thinking %}<think>{% endif %}"
    try:
        assert render_prompt(tokenizer, messages, chat_template_kwargs={"enable_thinking": True}).text.endswith(
            "<think>")
        plain = render_prompt(tokenizer, messages)
        assert not plain.text.endswith("<think>")
        assert render_prompt(tokenizer, messages, chat_template_kwargs={"enable_thinking": False}).text == plain.text
    finally:
        tokenizer.chat_template = saved
