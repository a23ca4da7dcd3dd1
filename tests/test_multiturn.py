"""The multi-turn and conflict rule sets: every earlier reply keeps the rules, items match the single-turn set."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agdecode.eval.datasets import load_items
from agdecode.eval.scoring import score_rules

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MULTI = ["rules-multiturn", "rules-conflict-multiturn"]


def _earlier_kwargs(item: dict) -> list[dict]:
    # A repeat_prompt rule refers to the request being answered: for the earlier reply, the earlier request.
    request = item["messages"][1]["content"]
    return [{"prompt_to_repeat": request} if iid == "combination:repeat_prompt" else kw
            for iid, kw in zip(item["instruction_id_list"], item["kwargs"])]


@pytest.mark.parametrize("name", MULTI)
def test_every_earlier_reply_passes_the_checker(name):
    items = load_items(name, "rules").items
    failing = []
    for it in items:
        roles = [m["role"] for m in it["messages"]]
        assert roles == ["system", "user", "assistant", "user"], it["id"]
        s = score_rules(it["instruction_id_list"], _earlier_kwargs(it), it["messages"][2]["content"],
                        prompt=it["messages"][1]["content"])
        if not s["prompt_strict"] or s["errors"]:
            failing.append(it["id"])
    assert len(items) >= 200 and failing == []


@pytest.mark.parametrize("name", MULTI + ["rules-conflict"])
def test_items_keep_the_single_turn_rules_system_message_and_task(name):
    single = {it["id"]: it for it in load_items("rules", "rules").items}
    items = load_items(name, "rules").items
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        ref = single[it["id"]]
        assert it["instruction_id_list"] == ref["instruction_id_list"] and it["kwargs"] == ref["kwargs"]
        assert it["messages"][0] == ref["messages"][0]
        final = it["messages"][-1]["content"]
        if name == "rules-conflict":  # the task, then the contradicting instruction
            assert final == f"{ref['task']} {it['conflict']['user_instruction']}"
        else:
            assert final == ref["task"] and it["messages"][1]["content"].split(" ")[0] != ""


@pytest.mark.parametrize("name", ["rules-conflict", "rules-conflict-multiturn"])
def test_conflict_items_contradict_one_of_their_own_rules(name):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from build_rules_conflict import contradiction
    finally:
        sys.path.remove(str(SCRIPTS))
    items = load_items(name, "rules").items
    for it in items:
        c = it["conflict"]
        assert c["rule"] in it["instruction_id_list"]
        kw = it["kwargs"][it["instruction_id_list"].index(c["rule"])]
        assert c["user_instruction"] == contradiction(c["rule"], kw) and "," not in c["user_instruction"]
        user_turn = it["messages"][1]["content"]  # the first user turn carries the conflict
        assert user_turn.endswith(" " + c["user_instruction"])
    assert len(items) >= 200 and len({it["conflict"]["rule"] for it in items}) >= 20


def test_contradictions_really_contradict():
    """Where the user's instruction is itself an IFEval rule, a reply that follows it breaks the system's rule."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from build_rules_conflict import contradiction
    finally:
        sys.path.remove(str(SCRIPTS))
    cases = [  # (system rule, kwargs, a reply that follows the user's contradicting instruction)
        ("change_case:english_lowercase", {}, "THIS IS MY WHOLE ANSWER IN CAPITAL LETTERS AS YOU ASKED."),
        ("punctuation:no_comma", {}, "Well, yes, of course, this has commas, five of them."),
        ("detectable_format:title", {}, "No title here at all."),
        ("keywords:forbidden_words", {"forbidden_words": ["cow", "snow"]}, "A cow in the snow."),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Thanks for reading."),
    ]
    for iid, kw, reply in cases:
        assert contradiction(iid, kw)
        assert score_rules([iid], [kw], reply)["prompt_strict"] is False, iid
    assert contradiction("length_constraints:number_sentences", {"num_sentences": 1, "relation": "at least"}) is None


def test_builder_reproduces_the_committed_replies():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from build_rules_multiturn import earlier_turn
    finally:
        sys.path.remove(str(SCRIPTS))
    single = [json.loads(line) for line in
              (SCRIPTS.parent / "src/agdecode/data/rules_dev.jsonl").read_text().splitlines()]
    multi = {it["id"]: it for it in load_items("rules-multiturn", "rules").items}
    for i in range(0, 30, 3):
        request, reply = earlier_turn(single[i], i)
        assert multi[single[i]["id"]]["messages"][1:3] == [{"role": "user", "content": request},
                                                          {"role": "assistant", "content": reply}]


def test_cli_runs_multiturn_and_conflict_sets_with_a_roi_expression(tokenizer, tmp_path, monkeypatch, capsys):
    """`agd eval rules --method "agd@system - user"`: the expression with spaces is parsed, run and recorded;
    the runner renders the whole conversation and scores the final reply (a tiny random model)."""
    from agdecode.cli import main
    from conftest import make_tiny

    monkeypatch.setenv("AGDECODE_CACHE", str(tmp_path / "cache"))
    tok = tokenizer
    d = tmp_path / "tiny"
    make_tiny("llama", len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    prompt_tokens = {}
    for name in ("rules-conflict", "rules-conflict-multiturn"):
        out = tmp_path / name
        assert main(["eval", "rules", "--data", name, "--model", str(d), "--method", "greedy,agd@system - user",
                     "--limit", "2", "--max-new-tokens", "2", "--no-progress", "--threads", "1",
                     "--out", str(out)]) == 0
        assert "agd@system - user: n=2" in capsys.readouterr().out
        run = json.loads((out / "agd@system - user" / "run.json").read_text())
        assert run["settings"]["method"] == "agd@system - user"
        assert run["settings"]["generate"]["roi"] == "system - user" and run["info"]["data"]["name"] == name
        recs = [json.loads(x) for x in (out / "agd@system - user" / "records.jsonl").read_text().splitlines()]
        assert recs[0]["config"]["roi"] == ["system - user"] and "prompt_strict" in recs[0]["scores"]
        prompt_tokens[name] = recs[0]["trace"]["prompt_tokens"]
    assert prompt_tokens["rules-conflict-multiturn"] > prompt_tokens["rules-conflict"] + 20  # the earlier exchange
