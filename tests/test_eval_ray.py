"""``agd eval --ray``: items sharded over a local two-worker Ray cluster give the records of a local run."""
from __future__ import annotations

import json

import pytest

from agdecode.eval.runner import EvalSpec, run_eval
from conftest import make_tiny

import ray  # a dev dependency: a missing one is an error, not a skip


@pytest.mark.timeout(300)
def test_ray_two_workers_match_a_local_run(tokenizer, tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    model = make_tiny("llama", len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    items = [{"id": f"q{i}", "question": f"question number {i}", "answers": [str(i)]} for i in range(6)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    spec = dict(task="qa", data=str(data), method="agd", model=str(d), max_new_tokens=3, roi="user")

    from agdecode.eval import ray_runner

    auth, close = [], ray_runner.RayPool.close

    def checked_close(self):  # while the instance runs: it requires its token
        auth.append(ray_runner.token_auth_enabled())
        close(self)

    monkeypatch.setattr(ray_runner.RayPool, "close", checked_close)
    local = run_eval(EvalSpec(**spec), tmp_path / "local", progress=False)
    sharded_spec = EvalSpec(**spec, batch_size=2)  # 3 chunks of 2
    sharded = run_eval(sharded_spec, tmp_path / "ray", progress=False,
                       pool=ray_runner.RayPool(sharded_spec, workers=2, cpus_per_worker=1, num_cpus=2))
    assert auth == [True]

    def records(root):
        return {r["id"]: r for r in map(json.loads, (root / "agd" / "records.jsonl").read_text().splitlines())}

    a, b = records(tmp_path / "local"), records(tmp_path / "ray")
    assert sorted(b) == sorted(a) and len((tmp_path / "ray" / "agd" / "records.jsonl").read_text().splitlines()) == 6
    assert len({r["worker"] for r in b.values()}) == 2  # both actors did work
    for i in a:
        assert b[i]["response"] == a[i]["response"] and b[i]["scores"] == a[i]["scores"]
    assert {k: sharded[k] for k in ("n", "metrics", "trace")} == {k: local[k] for k in ("n", "metrics", "trace")}
    settings = [json.loads((tmp_path / r / "agd" / "run.json").read_text())["settings"] for r in ("local", "ray")]
    assert settings[0] == settings[1]
    assert not ray.is_initialized()  # the local cluster it started is shut down


def test_a_local_ray_instance_without_authentication_is_refused(monkeypatch, tmp_path):
    from agdecode import AgdError
    from agdecode.eval.ray_runner import RayPool

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = EvalSpec(task="qa", data="nq", method="greedy")
    with pytest.raises(AgdError, match="listens on all network interfaces, without authentication"):
        RayPool(spec, workers=1, cpus_per_worker=1, num_cpus=1)
    assert not ray.is_initialized()
