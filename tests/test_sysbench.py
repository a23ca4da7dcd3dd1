"""``agd eval sysbench``: the published layout, the metrics, and the judge protocol over real HTTP.

The judge is a canned OpenAI-compatible server (tests/judge_server.py) on a free local port; the
decoder is a tiny random model: its replies and the verdicts are not the point, the protocol is.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import agdecode.decoding
from agdecode.errors import AgdError
from agdecode.eval.sysbench import (JudgeConfig, JudgeError, SysBenchSpec, parse_verdicts, read_sysbench,
                                    run_sysbench, sysbench_metrics)
from conftest import make_tiny
from judge_server import JudgeServer, all_yes, closed_port_url, n_criteria

SAMPLE = Path(__file__).parent / "data" / "sysbench_sample.json"


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return make_tiny("llama", len(tokenizer)), tokenizer


def _spec(url, **kw):
    judge = JudgeConfig(url=url, model="canned", timeout=kw.pop("timeout", 10.0), retries=0,
                        template=kw.pop("template", None))
    return SysBenchSpec(data=str(SAMPLE), method=kw.pop("method", "greedy"), judge=judge, max_new_tokens=2, **kw)


def _records(d):
    return [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]


def test_reads_the_published_layout():
    dialogues, sha = read_sysbench(SAMPLE)
    assert [d.id for d in dialogues] == ["1", "2", "3"] and len(sha) == 64
    assert all(len(d.turns) == 5 for d in dialogues)
    first = dialogues[0].turns[0]
    assert first.criteria == ["The reply is written in English.", "The reply stays in the pirate role.",
                              "The reply is under 80 words."]  # a dict of criterion objects, in key order
    assert first.alignment == "aligned" and first.reference.startswith("Arr, a variable")
    assert dialogues[1].turns[2].criteria[1] == "The answer names Leonardo da Vinci."  # a list of strings
    assert dialogues[2].turns[3].criteria == ["回答是一首五言绝句。", "回答使用简体中文。", "回答不超过三句话。"]  # dict of strings
    assert sum(len(t.criteria) for d in dialogues for t in d.turns) == 31


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[0].pop("prompt_infos"), "dialogue 0: 'prompt_infos' must be a list with one entry per user turn (5)"),
    (lambda d: d[1]["prompt_infos"].pop(), "dialogue 1: 'prompt_infos' must be a list"),
    (lambda d: d[2]["messages"].pop(0), "dialogue 2: the first message must be the system message"),
    (lambda d: d[0]["prompt_infos"][3].update(criteria=[]), "dialogue 0, turn 4: 'criteria' must be"),
    (lambda d: d[0]["messages"].insert(2, {"role": "assistant", "content": "x"}), "messages[3] should be a user turn"),
])
def test_malformed_files_are_refused_with_the_place(tmp_path, mutate, message):
    data = json.loads(SAMPLE.read_text())
    mutate(data)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(AgdError, match=re.escape(message)):
        read_sysbench(f)
    with pytest.raises(AgdError, match="No such SysBench file"):
        read_sysbench(tmp_path / "missing.json")


def test_metrics_on_a_hand_written_verdict_table():
    T, F, U = True, False, None
    table = {  # dialogue -> verdicts per turn (3 turns each)
        "a": [[T, T], [T], [T, T, T]],      # every turn satisfied: run 3/3
        "b": [[T, T], [T, F], [T]],         # turn 2 fails: run 1/3
        "c": [[U, T], [T], [T, T]],         # unparsable in turn 1: not a pass, run 0/3
    }
    recs = [{"dialogue": d, "turn": t, "n_turns": 3, "alignment": "aligned" if t != 2 else "misaligned", "verdicts": v}
            for d, turns in table.items() for t, v in enumerate(turns, 1)]
    m = sysbench_metrics(recs)
    # 6 + 5 + 5 = 16 criteria, of which 14 True (one False, one unparsable)
    assert m["criteria"] == 16 and m["CSR"] == pytest.approx(14 / 16)
    # 9 turns, all-True ones: a1 a2 a3 b1 b3 c2 c3 = 7
    assert m["turns"] == 9 and m["ISR"] == pytest.approx(7 / 9)
    assert m["SSR"] == pytest.approx((3 / 3 + 1 / 3 + 0 / 3) / 3)
    assert m["unparsable"] == 1 and m["dialogues_complete"] == 3 and m["judge_errors"] == 0
    assert m["ISR_by_alignment"] == {"aligned": pytest.approx(5 / 6), "misaligned": pytest.approx(2 / 3)}
    # A judge error is not a judged turn; a dialogue missing a turn has no SSR
    recs[-1] = {**recs[-1], "verdicts": None}
    m = sysbench_metrics(recs)
    assert m["judge_errors"] == 1 and m["turns"] == 8 and m["dialogues_complete"] == 2
    assert m["SSR"] == pytest.approx((1 + 1 / 3) / 2)


def test_parse_verdicts():
    assert parse_verdicts('{"1": {"reason": "r", "verdict": "yes"}, "2": {"verdict": "No"}}', 2) == [True, False]
    assert parse_verdicts('Here you go:\n```json\n{"1": "是", "2": "否"}\n```', 2) == [True, False]
    assert parse_verdicts('Sure. {"criterion 1": true, "criterion 2": false} Done.', 2) == [True, False]
    assert parse_verdicts('["yes", "no", "yes"]', 3) == [True, False, True]
    assert parse_verdicts('{"1": "yes"}', 2) == [True, None]                 # a missing criterion
    assert parse_verdicts('{"1": "probably", "2": 1}', 2) == [None, None]    # neither yes nor no
    assert parse_verdicts("Everything looks fine to me.", 3) == [None, None, None]
    assert parse_verdicts("", 1) == [None]


def _scripted(request: dict) -> str:
    """Yes everywhere, except: dialogue 2 turn 3 (a no) and any turn of the Chinese dialogue 3 turn 4 (prose)."""
    prompt = request["messages"][-1]["content"]
    n = n_criteria(request)
    if "五言绝句" in prompt and "[Latest user message]\n写一首" in prompt:
        return "The reply looks acceptable overall."                # unparsable
    if "[Latest user message]\nPlease answer in plain text now" in prompt:
        return json.dumps({str(i): {"verdict": "no" if i == 1 else "yes"} for i in range(1, n + 1)})
    return all_yes(request)


def test_run_against_a_real_http_judge(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with JudgeServer(_scripted) as server:
        s = run_sysbench(_spec(server.url, batch_size=1), tmp_path, model, tok, progress=False)  # judged in order
        reqs = server.requests
    recs = _records(tmp_path / "greedy")
    assert len(recs) == 15 and len(reqs) == 15 and s["complete"]
    assert all(r["model"] == "canned" and r["temperature"] == 0 for r in reqs)
    dialogues, _ = read_sysbench(SAMPLE)
    for rec in recs:  # every criterion of every turn has a verdict entry
        turn = dialogues[int(rec["dialogue"]) - 1].turns[rec["turn"] - 1]
        assert rec["criteria"] == turn.criteria and len(rec["verdicts"]) == len(turn.criteria)
    by_id = {r["id"]: r for r in recs}
    bad = by_id["3:4"]
    assert bad["verdicts"] == [None, None, None] and bad["judge"]["unparsable"] == 3
    assert bad["judge"]["raw"] == "The reply looks acceptable overall."
    assert by_id["2:3"]["verdicts"] == [False, True]
    m = s["metrics"]
    assert m == sysbench_metrics(recs)
    assert m["unparsable"] == 3 and m["criteria"] == 31 and m["CSR"] == pytest.approx(27 / 31)
    assert m["ISR"] == pytest.approx(13 / 15) and m["SSR"] == pytest.approx((1 + 2 / 5 + 3 / 5) / 3)
    # The judge sees the system message, the checklist, and the model's own earlier replies as history
    p2 = reqs[1]["messages"][0]["content"]
    assert "You are Captain Byte" in p2 and "1. The reply explains what a loop is." in p2
    assert f"Assistant: {by_id['1:1']['response']}" in p2 and "Arr, a variable" not in p2
    run = json.loads((tmp_path / "greedy" / "run.json").read_text())
    assert run["settings"]["judge"]["model"] == "canned" and run["settings"]["gt_history"] is False


def test_dialogues_decoded_as_a_batch_equal_one_at_a_time(tiny_llama, tmp_path):
    model, tok = tiny_llama

    def answers(d):
        return {r["id"]: (r["response"], r["verdicts"]) for r in _records(d / "greedy")}

    with JudgeServer(_scripted) as server:
        one = run_sysbench(_spec(server.url, batch_size=1), tmp_path / "a", model, tok, progress=False)
    with JudgeServer(_scripted) as server:
        three = run_sysbench(_spec(server.url, batch_size=3), tmp_path / "b", model, tok, progress=False)
    assert answers(tmp_path / "a") == answers(tmp_path / "b") and one["metrics"] == three["metrics"]


def test_gt_history_and_a_custom_template(tiny_llama, tmp_path):
    model, tok = tiny_llama
    template = tmp_path / "judge.txt"
    template.write_text("H=$history|C=$criteria|N=$n")
    seen = []
    with JudgeServer(lambda r: seen.append(r["messages"][0]["content"]) or '["yes"]') as server:
        s = run_sysbench(_spec(server.url, gt_history=True, template=str(template), limit=1, batch_size=1), tmp_path, model, tok,
                         progress=False)
    assert seen[0] == "H=(none)|C=1. The reply is written in English.\n2. The reply stays in the pirate role.\n" \
                      "3. The reply is under 80 words.|N=3"
    assert "Assistant: Arr, a variable be a labelled chest" in seen[1]  # the reference answer as history
    assert s["metrics"]["turns"] == 5
    # a list of one verdict for 2-3 criteria cannot be read: all 12 criteria unparsable, no turn passes
    assert s["metrics"]["unparsable"] == 12 and s["metrics"]["ISR"] == 0.0 and s["metrics"]["CSR"] == 0.0


def _count_generate(monkeypatch):
    calls = []
    real = agdecode.decoding.generate

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(agdecode.decoding, "generate", counting)
    return calls


def test_judge_down_is_found_before_decoding(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    calls = _count_generate(monkeypatch)
    with pytest.raises(JudgeError, match=r"the judge at http://127.0.0.1:\d+/v1 cannot be reached"):
        run_sysbench(_spec(closed_port_url(), limit=1), tmp_path, model, tok, progress=False)
    assert calls == [] and not (tmp_path / "greedy" / "records.jsonl").exists()
    with JudgeServer(models=("another",)) as server:
        with pytest.raises(JudgeError, match=r"serves \['another'\], not --judge-model 'canned'"):
            run_sysbench(_spec(server.url, limit=1), tmp_path, model, tok, progress=False)


def test_judge_going_down_mid_run_stops_clearly_and_the_run_resumes_without_losing_records(
        tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    calls = _count_generate(monkeypatch)
    with JudgeServer(fail_after=3) as server:
        with pytest.raises(JudgeError, match=r"cannot be reached.*run the same command again to resume"):
            run_sysbench(_spec(server.url, limit=2, batch_size=1), tmp_path, model, tok, progress=False)
    recs = _records(tmp_path / "greedy")
    assert [r["id"] for r in recs] == ["1:1", "1:2", "1:3", "1:4"] and len(calls) == 4
    assert all(r["verdicts"] for r in recs[:3]) and recs[3]["verdicts"] is None
    assert "cannot be reached" in recs[3]["judge"]["error"] and recs[3]["response"] is not None
    with JudgeServer() as server:  # the judge is back, at another address
        s = run_sysbench(_spec(server.url, limit=2, batch_size=1), tmp_path, model, tok, progress=False)
        assert len(server.requests) == 7
    assert len(calls) == 10  # turn 1:4 was judged from its record, not decoded again
    recs = _records(tmp_path / "greedy")
    judged = {r["id"]: r for r in recs if r["verdicts"] is not None}
    assert sorted(judged) == sorted(f"{d}:{t}" for d in (1, 2) for t in range(1, 6))
    assert judged["1:4"]["response"] == recs[3]["response"] and s["complete"] and s["metrics"]["ISR"] == 1.0


def test_judge_timeout_and_refusal_are_clear_errors_and_keep_the_records(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with JudgeServer(delay=3.0) as server:
        with pytest.raises(JudgeError, match=r"timed out \(over 0.5 s per request"):
            run_sysbench(_spec(server.url, limit=1, timeout=0.5), tmp_path / "slow", model, tok, progress=False)
    (rec,) = _records(tmp_path / "slow" / "greedy")
    assert rec["verdicts"] is None and "timed out" in rec["judge"]["error"]
    with JudgeServer(models=("another",), list_models=False) as server:
        with pytest.raises(JudgeError, match="refused the request: HTTP 404"):
            run_sysbench(_spec(server.url, limit=1), tmp_path / "refused", model, tok, progress=False)


def test_cli(tiny_llama, tmp_path, monkeypatch, capsys):
    from agdecode.cli import main

    model, tok = tiny_llama
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "cache"))
    base = ["eval", "sysbench", "--data", str(SAMPLE), "--judge-model", "canned", "--model", str(d),
            "--max-new-tokens", "2", "--limit", "1", "--no-progress", "--threads", "1", "--judge-retries", "0",
            "--out", str(tmp_path / "runs")]
    assert main(base + ["--judge-url", closed_port_url()]) == 2
    err = capsys.readouterr().err
    assert "agd: error: the judge at http://127.0.0.1:" in err and "cannot be reached" in err
    with JudgeServer() as server:
        assert main(base + ["--judge-url", server.url, "--method", "greedy,agd@system - user"]) == 0
    out = capsys.readouterr().out
    assert "greedy: CSR 1.000, ISR 1.000, SSR 1.000 (5 turns, 12 criteria, 0 unparsable verdicts)" in out
    assert "agd@system - user: CSR 1.000" in out
    assert main(base + ["--judge-url", "http://x/v1", "--judge-template", str(tmp_path / "none.txt")]) == 2
    assert "No such judge template" in capsys.readouterr().err
