"""``agd serve --replicas 2``: two CPU replicas behind Ray Serve answer like the single server."""
from __future__ import annotations

import importlib

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

importlib.import_module("ray.serve")  # a dev dependency: a missing one is an error, not a skip
import openai  # noqa: E402

import agdecode  # noqa: E402
from conftest import free_port, save_tiny  # noqa: E402

CONV = [{"role": "system", "content": "Always answer in French."}, {"role": "user", "content": "Tell me about cats."}]


@pytest.mark.slow  # about a minute: a local Ray cluster and two replicas start
@pytest.mark.timeout(400)
def test_two_ray_replicas_serve_and_shut_down(tokenizer, tmp_path):
    d = tmp_path / "tiny"
    model = save_tiny(tokenizer, d)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(agdecode.__file__).parents[1]), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "agdecode", "serve", "--model", str(d), "--dtype", "float32", "--port", str(port),
                             "--replicas", "2", "--num-cpus-per-replica", "1", "--threads", "1", "--k", "3",
                             "--min-prob", "0", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    convs = [[CONV[0], {"role": "user", "content": f"Tell me about {x}."}] for x in ("cats", "dogs", "the sea", "Paris")]
    want = [agdecode.generate(model, tokenizer, c, max_new_tokens=5, k=3, min_prob=0.0).text for c in convs]
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.time() + 300
        while True:
            try:
                assert [m.id for m in c.models.list().data] == ["tiny"]
                break
            except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(1)

        def ask(i: int):
            raw = c.chat.completions.with_raw_response.create(model="tiny", messages=convs[i % 4], max_tokens=5)
            return raw.parse().choices[0].message.content, raw.headers["x-agd-replica"]

        replicas, deadline = set(), time.time() + 120
        # The proxy serves as soon as one replica is up; Ray Serve then routes by queue length, so
        # concurrent requests reach both once the second is up too.
        while time.time() < deadline:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(8)))
            assert [a for a, _ in answers] == [want[i % 4] for i in range(8)]
            replicas |= {r for _, r in answers}
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(proc.stdout.read()[-3000:])
