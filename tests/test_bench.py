"""``agd bench`` end to end on a tiny random-init model (the GPU path uses the same code)."""
from __future__ import annotations

import json
import statistics

from agdecode.bench import summarize
from agdecode.cli import main


def test_latency_bench_interleaves_modes_and_its_figures_follow_from_the_raw_runs(tmp_path, capsys):
    rc = main(["bench", "--random-init", "tiny-llama", "--lengths", "40", "--new-tokens", "4", "--dtype", "float32",
               "--reverse-tokens", "2", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "tiny-llama-cpu-float32-latency.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["model"] == "random-init:tiny-llama"
    # Provenance: the dtype as resolved and the commit measured (this checkout is a git repository).
    assert data["machine"]["dtype"] == "float32" and data["machine"]["dtype_asked"] == "float32"
    assert len(data["machine"]["git"]["commit"]) == 40 and isinstance(data["machine"]["git"]["dirty"], bool)
    modes = ["greedy", "greedy-loop", "agd-reverse", "agd-forward", "agd_e-forward"]
    # Interleaved: each round runs every mode (prefill, then the whole generation) in the same order.
    order = [(r["round"], r["mode"], r["phase"]) for r in data["runs"]]
    assert order == [(rnd, m, ph) for rnd in (0, 1) for m in modes for ph in ("prefill", "total")]
    for r in data["runs"]:
        if r["phase"] == "total" and r["mode"] in ("agd-forward", "agd-reverse"):
            assert r["guided_steps"] == r["new_tokens"]  # min_prob=0: every step attributed
    # The headline ratio is the ratio of the wall-clock medians per token, recomputed here from the raw runs.
    def med(mode):
        runs = [r for r in data["runs"] if r["mode"] == mode and r["phase"] == "total"]
        return statistics.median(r["wall_s"] for r in runs) / runs[0]["new_tokens"]

    s = data["summary"]["40"]
    assert abs(s["agd-forward"]["x_greedy_wall"] - med("agd-forward") / med("greedy")) < 1e-9
    assert abs(s["agd-forward"]["x_loop_wall"] - med("agd-forward") / med("greedy-loop")) < 1e-9
    assert {m["mode"] for m in data["memory"]} == set(modes) and all(m["peak_mib"] > m["base_mib"] > 0
                                                                      for m in data["memory"])
    table = (tmp_path / "tiny-llama-cpu-float32-latency.md").read_text()
    assert "forward speed-up over reverse" in table and "| 40 | agd-forward |" in table
    assert "x loop" in capsys.readouterr().out


def test_throughput_bench_runs_batches_of_mixed_lengths(tmp_path):
    rc = main(["bench", "--random-init", "tiny-llama", "--throughput", "--batch-sizes", "1", "3",
               "--prompt-range", "10", "30", "--new-tokens", "3", "--rounds", "1", "--threads", "1", "--dtype", "fp32",
               "--modes", "greedy", "greedy-loop", "agd-forward", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "tiny-llama-cpu-float32-throughput.json").read_text())
    agd = data["summary"]["3"]["agd-forward"]
    assert agd["guided_share"] == 1.0 and "x_loop_wall" in agd and "x_greedy_wall" in agd
    three = [r for r in data["runs"] if r["batch"] == 3]
    assert len({tuple(r["prompt_tokens"]) for r in three}) == 1 and len(set(three[0]["prompt_tokens"])) > 1
    greedy = next(r for r in three if r["mode"] == "greedy" and r["phase"] == "total")
    assert abs(data["summary"]["3"]["greedy"]["tokens_per_s"] - 3 * 3 / greedy["wall_s"]) < 1e-9


def test_summary_ratios_on_hand_made_runs():
    runs = [dict(round=r, mode=m, batch=1, phase=ph, new_tokens=4, wall_s=w, cpu_s=w)
            for r, (g, a) in enumerate([(1.0, 2.0), (2.0, 3.0), (1.5, 2.0)])
            for m, w0 in (("greedy", g), ("agd", a)) for ph, w in (("prefill", w0 / 4), ("total", w0))]
    s = summarize(runs)[(1,)]
    assert s["agd"]["x_greedy_wall"] == 2.0 / 1.5                      # ratio of the medians
    assert s["agd"]["x_greedy_wall_rounds"] == {"min": 2.0 / 1.5, "max": 2.0}  # per-round ratios 2, 1.5, 1.33
    assert s["agd"]["x_greedy_prefill"] == 0.5 / 0.375 and s["agd"]["decode_s_per_step"]["median"] == 1.5 / 3


def test_summary_ratios_to_both_greedy_baselines():
    runs = [dict(round=0, mode=m, batch=2, phase="total", new_tokens=4, wall_s=w, cpu_s=w, guided_steps=g)
            for m, w, g in (("greedy", 2.0, 0), ("greedy-loop", 1.0, 0), ("agd", 3.0, 6))]
    s = summarize(runs)[(2,)]["agd"]
    assert s["x_greedy_wall"] == 1.5 and s["x_loop_wall"] == 3.0
    assert s["guided_share"] == 6 / 8  # guided steps over the batch's generated tokens


def test_bench_refuses_an_unknown_dtype_before_measuring(tmp_path, capsys):
    assert main(["bench", "--random-init", "tiny-llama", "--dtype", "bf17", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "dtype must be one of" in err and "Traceback" not in err and not list(tmp_path.iterdir())


def test_rules_prompts_need_a_real_model_and_the_throughput_mode(tmp_path, capsys):
    assert main(["bench", "--random-init", "tiny-llama", "--throughput", "--prompts", "rules",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompts rules needs --throughput and a real model" in err
    assert not list(tmp_path.iterdir())
