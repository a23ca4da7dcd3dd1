"""``agd serve --replicas N``: N copies of the server behind Ray Serve's HTTP proxy.

Each replica is the same FastAPI app as the single-process server (its own model and decoding
thread, so continuous batching happens within a replica); Ray Serve routes requests between them.
Locally ``ray.init`` starts a private cluster (no dashboard); ``--ray-address auto`` joins an
existing one, where ``--num-gpus-per-replica 1`` puts one replica on each GPU of every node.

Example:
    $ agd serve --model /models/Qwen2.5-7B-Instruct --dtype bfloat16 --device cuda \\
          --ray-address auto --replicas 8 --num-gpus-per-replica 1
"""
from __future__ import annotations

import logging
import signal
import threading

import torch

from ..errors import AgdError, MissingPackageError
from ..eval.ray_runner import init_ray
from ..models import load_model

__all__ = ["deployment", "run_ray"]

log = logging.getLogger("agdecode.serve")


class AgdReplica:
    """One model and its decoding thread; Ray Serve calls ``__serve_build_asgi_app__`` after ``__init__``."""

    def __init__(self, options: dict):
        from ray import serve  # optional: pip install 'agdecode[serve-ray]'

        from .app import AgdServer  # optional: fastapi (agdecode[serve]); `agd --help` imports this module

        device = options["device"]
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("this replica has no GPU: give it one with --num-gpus-per-replica 1")
        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        model, tok = load_model(options["model"], dtype=options["dtype"], device=device)
        self.server = AgdServer(model, tok, **options["server"])
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from .app import create_app  # optional: fastapi (agdecode[serve]), as in __init__

        return create_app(self.server, replica=self.replica)


def deployment(options: dict, replicas: int, num_gpus: float = 0, num_cpus: float = 1):
    """The bound Ray Serve application: ``replicas`` copies of :class:`AgdReplica` built from ``options``."""
    from ray import serve  # optional: pip install 'agdecode[serve-ray]'

    max_batch = options["server"].get("max_batch", 16)
    dep = serve.deployment(serve.ingress()(AgdReplica), name="agd").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Enough requests per replica to fill its batch and queue the next ones; beyond that Ray
        # Serve sends requests to another replica (or holds them).
        max_ongoing_requests=2 * max_batch,
    )
    return dep.bind(options)


def run_ray(options: dict, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, address: str | None = None,
            num_gpus: float = 0, num_cpus: float = 1) -> int:
    """Start Ray (or join ``address``), serve ``replicas`` replicas on ``host:port`` until SIGTERM/SIGINT."""
    try:
        import ray  # optional: pip install 'agdecode[serve-ray]'
        from ray import serve  # optional, as above
    except ImportError:
        raise MissingPackageError("agd serve --replicas needs Ray Serve: pip install 'agdecode[serve-ray]'") from None
    if not isinstance(replicas, int) or replicas < 1:
        raise AgdError(f"--replicas must be an integer >= 1, got {replicas!r}")
    if num_gpus and options["device"] == "cpu":
        options = {**options, "device": "cuda"}
    started = not ray.is_initialized()
    if started:
        init_ray(ray, address, "agd serve --replicas", include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(options, replicas, num_gpus, num_cpus), name="agd", route_prefix="/")
        log.info("serving %s on http://%s:%d with %d replicas", options["server"]["name"], host, port, replicas)
        stop.wait()
        log.info("shutting down: draining the replicas")
    finally:
        serve.shutdown()  # each replica's app shutdown drains its decoding thread
        if started:
            ray.shutdown()
    return 0
