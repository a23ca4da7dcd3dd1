"""On the real default model, AGD with a French system prompt answers in French where greedy does not.

Replaces test_decoding.py's "French" test, which only checked that AGD changed some token.
"""
from __future__ import annotations

import re

import pytest

from agdecode import generate

# French function words: a reply in French is full of them, an English one has almost none.
FRENCH = {"le", "la", "les", "un", "une", "des", "du", "de", "est", "et", "qui", "à", "en", "il", "elle", "sont"}


def french_words(text: str) -> int:
    return sum(w in FRENCH for w in re.findall(r"\w+", text.lower()))


@pytest.mark.slow
def test_smollm2_agd_answers_in_french_where_greedy_answers_in_english(smollm2, messages):
    model, tok = smollm2
    greedy = generate(model, tok, messages, method="greedy", max_new_tokens=24)
    agd = generate(model, tok, messages, max_new_tokens=24)
    # Measured: greedy 'Cafétacabra, cafétacabra. What a delightful combination of words. In' (0 French words),
    # AGD 'La femme à cérémonie est un animal qui ait des coups de femme. La' (9).
    assert french_words(greedy.text) <= 1, greedy.text
    assert french_words(agd.text) >= 5, agd.text
    # Every override is AGD's rule at work: the emitted token has the highest system-ROI score of the candidates.
    for i in agd.overrides:
        step = agd.steps[i]
        scores = {c.token_id: c.scores["system"] for c in step.candidates if c.scores}
        assert step.reason == "attribution" and scores[step.chosen_id] == max(scores.values())
