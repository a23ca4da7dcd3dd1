"""Item files, built-in sets and method selection of ``agd eval`` (no model needed)."""
from __future__ import annotations

import json

import pytest

from agdecode import ROIError
from agdecode.cli import main
from agdecode.eval import methods
from agdecode.eval.data import ItemFileError, parse_lines, read_items
from agdecode.eval.datasets import load_items

GOOD_QA = json.dumps({"id": "q1", "question": "capital of france", "answers": ["Paris"]})
GOOD_RULE = json.dumps({"id": 7, "messages": [{"role": "system", "content": "No commas."},
                                              {"role": "user", "content": "Hi"}],
                        "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})


def _bad_qa_lines():
    return [GOOD_QA, "{not json", "", json.dumps({"id": "q2", "question": "x"}),
            json.dumps({"id": "q3", "question": "x", "answers": ["a"], "documents": [{"title": "t"}]}),
            json.dumps({"id": "q1", "question": "dup", "answers": ["a"]}), "[1, 2]"]


def test_malformed_lines_are_refused_with_their_line_numbers():
    with pytest.raises(ItemFileError) as e:
        parse_lines(_bad_qa_lines(), "qa")
    msg = str(e.value)
    expected = [(2, "not JSON"), (4, "'answers'"), (5, "documents[0]"), (6, "duplicate id"), (7, "not a JSON object")]
    for n, why in expected:
        assert f"  line {n}" in msg and why in msg
    assert "  line 1" not in msg and "  line 3" not in msg and "--skip-bad-lines" in msg


def test_malformed_lines_can_be_skipped_and_are_reported(capsys):
    items, bad = parse_lines(_bad_qa_lines(), "qa", on_error="skip")
    assert [it["id"] for it in items] == ["q1"] and len(bad) == 5
    assert "skipped 5 malformed line(s)" in capsys.readouterr().err


def test_rule_items_are_checked_against_the_registry():
    items, _ = parse_lines([GOOD_RULE], "rules")
    assert items[0]["id"] == "7"  # integer ids become strings
    bad = [json.dumps({**json.loads(GOOD_RULE), "id": 8, "instruction_id_list": ["no_such:rule"]}),
           json.dumps({**json.loads(GOOD_RULE), "id": 9, "kwargs": []}),
           json.dumps({**json.loads(GOOD_RULE), "id": 10, "messages": [{"role": "system", "content": "x"}]})]
    pattern = r"line 1 .*unknown IFEval instruction(.|\n)*line 2 .*'kwargs'(.|\n)*line 3 .*no user"
    with pytest.raises(ItemFileError, match=pattern):
        parse_lines(bad, "rules")
    with pytest.raises(ItemFileError, match="no valid rules item"):
        parse_lines(bad, "rules", on_error="skip")


def test_cli_refuses_a_malformed_file_before_loading_a_model(tmp_path, capsys):
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(_bad_qa_lines()) + "\n")
    assert main(["eval", "qa", "--data", str(f), "--model", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "5 malformed line(s)" in err
    assert read_items(f, "qa", on_error="skip").skipped[0].startswith("line 2")


def test_builtin_rule_sets_pair_up():
    system, reference = load_items("rules", "rules").items, load_items("rules-reference", "rules").items
    assert len(system) == len(reference) >= 200
    for s, r in zip(system, reference):
        assert s["id"] == r["id"] and s["instruction_id_list"] == r["instruction_id_list"]
        assert [m["role"] for m in s["messages"]] == ["system", "user"]
        assert [m["role"] for m in r["messages"]] == ["user"]
        assert r["messages"][0]["content"] == f"{s['messages'][1]['content']} {s['messages'][0]['content']}"


def test_open_book_nq_uses_the_evaluation_split_only():
    from agdecode.eval.scoring import recall

    items = load_items("nq-open-book", "qa").items
    assert len(items) == 2000 and all(int(it["id"].rsplit("-", 1)[1]) < 2000 for it in items)
    positions = {it["gold_document"] for it in items}
    assert positions == set(range(5))
    for it in items[:200]:
        docs = it["documents"]
        assert len(docs) == 5 and recall(docs[it["gold_document"]]["text"], it["answers"])
    assert load_items("nq-open-book", "qa").items[:50] == items[:50]  # deterministic
    with pytest.raises(ValueError, match="is a qa set"):
        load_items("nq", "rules")


def test_multi_document_nq_has_ten_documents_with_the_gold_one_among_them():
    from agdecode.eval.scoring import normalize_answer, recall

    items = load_items("nq-multi-doc", "qa").items
    assert len(items) == 2000 and {it["gold_document"] for it in items} == set(range(10))
    for it in items[:100]:
        docs = it["documents"]
        assert len(docs) == 10 and recall(docs[it["gold_document"]]["text"], it["answers"])
        long = [a for a in it["answers"] if len(normalize_answer(a)) >= 3]  # short answers are matched as whole words there
        assert not long or sum(recall(d["text"], long) for d in docs) == 1  # no second gold passage


def test_method_names_settings_and_unknown_methods():
    kw = methods.resolve_method("agd-gated@user", roi="system", extra={"k": 3}, max_new_tokens=8)
    assert kw == {"method": "agd", "max_new_tokens": 8, "attribution": "lrp", "entropy_threshold": 1.734,
                  "roi": "user", "k": 3}
    assert methods.resolve_method("greedy", roi="system", max_new_tokens=8) == {"method": "greedy", "max_new_tokens": 8}
    with pytest.raises(methods.MethodUnavailableError, match="Unknown method 'nope'"):
        methods.resolve_method("nope")
    with pytest.raises(methods.MethodUnavailableError, match=r"no argument\(s\) \['kk'\]"):
        methods.resolve_method("greedy", extra={"kk": 3})
    with pytest.raises(ROIError, match="Cannot parse ROI 'banana'"):
        methods.resolve_method("agd@banana")
    assert methods.parse_set(["k=3", "roi=user", "cad_alpha=1.0"]) == {"k": 3, "roi": "user", "cad_alpha": 1.0}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        methods.parse_set(["k"])
