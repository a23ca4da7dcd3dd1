"""Sharding an evaluation over Ray actors: one per GPU, or one per N CPU cores.

Each actor loads the model once and evaluates the items it is handed (the same ``evaluate_item`` as
a local run); the driver writes every record as it arrives, through the same append-only store, so
the output, the resumption and the summary are those of a local run (only the line order differs).

Example:
    >>> spec = EvalSpec("rules", "rules", "agd", model="/models/Qwen2.5-7B-Instruct", dtype="bfloat16")
    >>> run_eval(spec, "runs/rules", pool=RayPool(spec, address="auto"))        # an existing cluster
    >>> run_eval(spec, "runs/rules", pool=RayPool(spec, workers=2, cpus_per_worker=1))   # a local one
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Iterator

import torch

from ..errors import AgdError, MissingPackageError
from ..models import dtype_name, load_model
from .runner import EvalSpec, default_batch_size, evaluate_items, resolve_for_model

__all__ = ["RayPool", "token_auth_enabled"]

# Ray 2.60 binds its gRPC servers (GCS, raylet, workers) on every interface whatever ray.init is told
# (checked: with _node_ip_address="127.0.0.1" they still listen on "::", and Ray rewrites a loopback node
# address to the machine's routable one), and anyone who reaches them can run code. What keeps others
# out is Ray's token authentication, on by default since Ray 2.5x: a local instance is only started with it.
_NO_AUTH = ("{what} would start a local Ray instance, which listens on all network interfaces, without "
            "authentication (RAY_AUTH_MODE={mode}): anyone on the network could run code in it. Unset "
            "RAY_AUTH_MODE (token authentication is Ray's default) or run without {what}.")


def token_auth_enabled() -> bool:
    """Whether the running Ray instance requires its token (``RAY_AUTH_MODE=token``)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled  # optional: agdecode[ray]

    return is_token_auth_enabled()


def _refuse_unauthenticated(what: str, started: bool = False) -> None:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if started or mode.strip().lower() == "disabled":
        raise AgdError(_NO_AUTH.format(mode=mode or "<unset>", what=what))


def init_ray(ray, address: str | None, what: str, **kw) -> None:
    """``ray.init``, refusing to start a local instance without token authentication (``what``: the flag).

    Example:
        >>> init_ray(ray, None, "--ray", num_cpus=2, include_dashboard=False)
    """
    if not address:
        _refuse_unauthenticated(what)
    ray.init(**({"address": address} if address else {}), **kw)
    if not address and not token_auth_enabled():
        ray.shutdown()
        _refuse_unauthenticated(what, started=True)


class _Worker:
    """Lives in a Ray actor: one model, many items."""

    def __init__(self, spec_dict: dict, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.spec = EvalSpec(**spec_dict)
        self.model, self.tok = load_model(self.spec.model, dtype=self.spec.dtype, device=device)

    def resolve(self, gen: dict, calibration: str | None) -> tuple[dict, dict]:
        return resolve_for_model(self.model, gen, calibration)

    def dtype(self) -> str:
        return dtype_name(self.model.dtype)

    def evaluate(self, items: list[dict], gen: dict) -> list[dict]:
        batch = self.spec.batch_size or default_batch_size(self.spec.device)
        recs = list(evaluate_items(self.model, self.tok, self.spec.task, items, gen, self.spec.seed, batch))
        for rec in recs:
            rec["worker"] = os.getpid()
        return recs


class RayPool:
    """Ray actors evaluating items for one :class:`~agdecode.eval.runner.EvalSpec`.

    ``address`` None starts a local Ray instance (``num_cpus`` cores, default all); otherwise it is
    passed to ``ray.init`` (``"auto"`` or ``"ray://host:10001"``). ``workers`` defaults to the
    cluster's GPU count, or its CPU count divided by ``cpus_per_worker``.
    """

    def __init__(self, spec, address: str | None = None, workers: int | None = None, cpus_per_worker: int = 2,
                 num_cpus: int | None = None):
        try:
            import ray  # optional: pip install 'agdecode[ray]'
        except ImportError as e:
            raise MissingPackageError("--ray needs the ray package: pip install ray") from e
        self.ray = ray
        self.options = {"address": address, "workers": workers, "cpus_per_worker": cpus_per_worker}  # for run.json
        self._started = not ray.is_initialized()
        if self._started:
            init_ray(ray, address, "--ray", include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if address else {"num_cpus": num_cpus}))
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if gpus and spec.device == "cpu":
            spec.device = "cuda"  # a GPU cluster: one actor per GPU
        use_gpu = spec.device.startswith("cuda")
        n = workers or (gpus if use_gpu else max(1, int(res.get("CPU", 1)) // cpus_per_worker))
        opts = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus_per_worker}
        actor = ray.remote(**opts)(_Worker)
        self.calibration, self.batch_size, self.use_gpu = spec.calibration, spec.batch_size, use_gpu
        self.actors = [actor.remote(asdict(spec), "cuda" if use_gpu else spec.device,
                                    None if use_gpu else cpus_per_worker) for _ in range(n)]

    def resolve(self, gen: dict) -> tuple[dict, dict]:
        """Model identity and model-dependent settings, as one worker sees them."""
        return self.ray.get(self.actors[0].resolve.remote(gen, self.calibration))

    def dtype(self) -> str:
        """The dtype the workers' models run in (``auto`` resolves on the worker's own device)."""
        names = set(self.ray.get([a.dtype.remote() for a in self.actors]))
        if len(names) > 1:
            raise AgdError(f"the Ray workers loaded the model in different dtypes ({', '.join(sorted(names))}); "
                           "pass --dtype explicitly")
        return names.pop()

    def records(self, items: list[dict], gen: dict) -> Iterator[dict]:
        """Records of ``items``, in the order their chunks finish (a chunk: one batch per actor call)."""
        from ray.util import ActorPool  # optional: pip install 'agdecode[ray]'

        call = {k: v for k, v in gen.items() if k != "entropy_threshold_source"}
        pool = ActorPool(self.actors)
        n = self.batch_size or default_batch_size("cuda" if self.use_gpu else "cpu")
        chunks = [items[i:i + n] for i in range(0, len(items), n)]
        for recs in pool.map_unordered(lambda a, part: a.evaluate.remote(part, call), chunks):
            yield from recs

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()
