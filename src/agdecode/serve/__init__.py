"""``agd serve``: an OpenAI-compatible chat-completions server that decodes with AGD, with continuous batching.

Any OpenAI client talks to it by changing its base URL; AGD settings ride in the extension object
``agd`` and the field ``documents`` (README "Server").

Example:
    $ agd serve --model smollm2 --entropy-threshold 1.734 --port 8000
    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    >>> client.chat.completions.create(model="smollm2", messages=[...], extra_body={"agd": {"k": 5}})
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..checks import nonnegative_int, port, positive_int, threshold
from ..errors import MissingPackageError
from ..models import DTYPE_HELP, load_model
from .ray_serve import run_ray

__all__ = ["register_serve", "cmd_serve", "served_name", "create_app", "AgdServer"]


def __getattr__(name):  # fastapi and pydantic are imported only by those who serve
    if name in ("create_app", "AgdServer"):
        from . import app  # optional: fastapi, pydantic (pip install 'agdecode[serve]')

        return getattr(app, name)
    raise AttributeError(name)


def served_name(model: str) -> str:
    """The model id clients use: ``smollm2``, or the folder / file name of the model.

    Example:
        >>> served_name("/models/Qwen2.5-0.5B-Instruct"), served_name("x/model.Q4.gguf")
        ('Qwen2.5-0.5B-Instruct', 'model.Q4')
    """
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or model)


def _settings(args) -> dict:
    """The server's default AGD settings: only the flags given (the rest are AGDConfig's defaults)."""
    given = dict(method=args.method, roi=args.roi, k=args.k, min_prob=args.min_prob,
                 entropy_threshold=args.entropy_threshold, attribution=args.attribution, engine=args.engine)
    return {k: v for k, v in given.items() if v is not None}


def _server_options(args) -> dict:
    return dict(name=args.served_model_name or served_name(args.model), defaults=_settings(args),
                max_batch=args.max_batch, max_tokens=args.max_tokens, api_key=args.api_key,
                max_body_bytes=args.max_body_bytes, strict_roi=args.strict_roi,
                prefix_cache_bytes=args.prefix_cache_mb << 20)


def cmd_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("agdecode.serve")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    args.host)
    if args.replicas is not None:
        return run_ray(dict(model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                            server=_server_options(args)),
                       host=args.host, port=args.port, replicas=args.replicas, address=args.ray_address,
                       num_gpus=args.num_gpus_per_replica, num_cpus=args.num_cpus_per_replica)
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(f"agd serve needs the serve extra ({', '.join(missing)} missing): "
                                  "pip install 'agdecode[serve]'")
    import uvicorn  # optional: pip install 'agdecode[serve]' (checked just above)

    from .app import AgdServer, create_app  # optional: fastapi, pydantic, prometheus_client (checked above)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    server = AgdServer(model, tok, **_server_options(args))
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, waits for the requests in flight, then
    # runs the app's shutdown (which drains the decoding thread).
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0




def register_serve(sub) -> None:

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible chat-completions server decoding with AGD",
        description="Serve /v1/chat/completions (OpenAI schema; AGD settings in the extension object 'agd') "
                    "with continuous batching: requests join the running batch at the next token.")
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder, or a .gguf file")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port, 1-65535 (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: 'smollm2' or the model's folder/file name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="most sequences decoding at once (default 16)")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="completion length when a request sets no max_tokens (default 256)")
    p.add_argument("--prefix-cache-mb", type=nonnegative_int, default=1024,
                   help="MiB of prompt prefixes' keys and values (AGD's tangents included) kept for requests that "
                        "start alike, e.g. a shared system prompt (default 1024; 0: off)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (debug logs every step's batch size)")
    g = p.add_argument_group("default decoding settings (a request's 'agd' object overrides them)")
    g.add_argument("--method", default=None, help="agd (default), greedy, cad, dola or sample")
    g.add_argument("--roi", action="append", default=None, help="region of interest (default system; repeatable)")
    g.add_argument("--strict-roi", action="store_true",
                   help="refuse (400) a request whose ROI names a message it lacks; default: a conversation without "
                        "a system message under ROI 'system' is decoded without guidance, and the response's "
                        "agd.note says so")
    g.add_argument("--k", type=int, default=None, help="candidates per step (default 5)")
    g.add_argument("--min-prob", type=float, default=None, help="drop candidates below this probability (default 0.05)")
    g.add_argument("--entropy-threshold", type=threshold, default=None,
                   help="AGD_e threshold in nats (the paper: 1.734) or 'auto' (default: off)")
    g.add_argument("--attribution", default=None, choices=["lrp", "ixg"], help="lrp (default) or ixg")
    g.add_argument("--engine", default=None, help="attribution engine (default forward)")
    r = p.add_argument_group("scale-out with Ray Serve")
    r.add_argument("--replicas", type=positive_int, default=None,
                   help="run N model replicas behind Ray Serve (default: one in-process server, no Ray)")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto' or ray://host:10001); default: start a local one")
    r.add_argument("--num-gpus-per-replica", type=float, default=0, help="GPUs per replica (default 0)")
    r.add_argument("--num-cpus-per-replica", type=float, default=1, help="CPUs per replica (default 1)")
    p.set_defaults(func=cmd_serve)
