"""Scoring: the IFEval checker on hand-made responses, and answer-recall normalisation."""
from __future__ import annotations

import pytest

from agdecode.eval.scoring import normalize_answer, quality, recall, recall_word, repeat_rate, score_qa, score_rules

# (instruction id, kwargs, compliant response, violating response)
RULES = [
    ("punctuation:no_comma", {}, "Cats sleep a lot. They purr.", "Cats sleep, eat, and purr."),
    ("change_case:english_lowercase", {}, "all lower case here.", "Not all lower case."),
    ("change_case:english_capital", {}, "ALL CAPITALS HERE.", "ALL CAPITALS but one."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:title", {}, "<<Cats>>\nThey purr.", "Cats\nThey purr."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Cats purr. Any other questions?",
     "Any other questions? Cats purr."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bye.", "Hello. Bye."),
    ("detectable_format:json_format", {}, '{"a": 1}', "a: 1"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Two words.",
     "This answer has more than five words in it."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("startend:quotation", {}, '"Cats purr."', "Cats purr."),
    ("keywords:existence", {"keywords": ["purr", "whiskers"]}, "Whiskers twitch; cats purr.", "Cats sleep."),
    ("keywords:forbidden_words", {"forbidden_words": ["dog"]}, "Cats are great.", "A dog is great."),
    ("language:response_language", {"language": "fr"},
     "Les chats dorment beaucoup et ronronnent quand ils sont contents.",
     "Cats sleep a lot and purr when they are happy."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Tell me about cats."},
     "Tell me about cats. Cats purr.", "Cats purr."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", RULES, ids=[r[0] for r in RULES])
def test_checker_known_results(iid, kwargs, good, bad):
    ok = score_rules([iid], [kwargs], good)
    assert ok["prompt_strict"] and ok["inst_strict"] == [True] and ok["prompt_loose"] and not ok["errors"]
    ko = score_rules([iid], [kwargs], bad)
    assert not ko["prompt_strict"] and ko["inst_strict"] == [False] and not ko["errors"]


def test_prompt_and_instruction_level_and_loose():
    ids = ["punctuation:no_comma", "startend:quotation"]
    s = score_rules(ids, [{}, {}], 'Sure, here it is:\n"Cats purr."')
    # Strict: the preamble has a comma and breaks the quotes; loose drops the first line, so both pass.
    assert s["inst_strict"] == [False, False] and not s["prompt_strict"]
    assert s["inst_loose"] == [True, True] and s["prompt_loose"]
    s = score_rules(ids, [{}, {}], '"Cats, dogs."')
    assert s["inst_strict"] == [False, True] and not s["prompt_strict"]


def test_response_is_stripped_and_empty_fails():
    assert score_rules(["startend:quotation"], [{}], '\n  "Cats purr."  \n')["prompt_strict"]
    assert not score_rules(["punctuation:no_comma"], [{}], "   ")["prompt_loose"]


def test_checker_failure_is_reported_not_silent():
    s = score_rules(["detectable_format:number_bullet_lists"], [{"num_bullets": "two"}], "* a")
    assert s["inst_strict"] == [False] and "detectable_format:number_bullet_lists" in s["errors"]


def test_huggingface_style_none_kwargs_are_ignored():
    kw = {"num_bullets": 2, "keywords": None, "language": None}
    assert score_rules(["detectable_format:number_bullet_lists"], [kw], "* a\n* b")["prompt_strict"]


@pytest.mark.parametrize("text,expected", [
    ("The Beatles", "beatles"),
    ("  An   apple a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Wilhelm Conrad Röntgen!", "wilhelm conrad röntgen"),
    ("“Sunset Boulevard” — 1950", "sunset boulevard 1950"),
    ("theatre, another", "theatre another"),  # articles only as whole words
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_recall_edge_cases():
    assert recall("It was the Beatles.", ["The Beatles"]) and recall_word("It was the Beatles.", ["Beatles"])
    assert recall("made in the usa", ["U.S.A."])
    # "no" vs "not": substring recall (the literature's metric) is fooled, whole-word recall is not.
    assert recall("I do not know.", ["no"]) and not recall_word("I do not know.", ["no"])
    assert recall_word("No, it is not.", ["no"])
    assert not recall("Paris", ["London", "Rome"]) and recall("Rome!", ["London", "rome"])
    assert not recall("anything", ["", "the"])  # answers that normalise to nothing never match
    assert score_qa(["Paris"], "PARIS") == {"recall": True, "recall_word": True}


def test_quality_proxies():
    assert repeat_rate("a b c d a b c d") == pytest.approx(0.2)
    assert repeat_rate("one two three") == 0.0
    assert quality("x y", 3, -0.5) == {"logprob": -0.5, "repeat4": 0.0, "words": 2, "tokens": 3}
