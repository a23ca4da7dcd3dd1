"""ROI resolution against the rendered chat prompt."""
from __future__ import annotations

import pytest

from agdecode import ROI, render_prompt, resolve_roi


@pytest.fixture
def prompt(tokenizer):
    return render_prompt(tokenizer, [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is <b>2+2</b>?"},
        {"role": "assistant", "content": "Quatre."},
        {"role": "user", "content": "Et 3+3 ?"},
    ])


def _text(tokenizer, prompt, mask):
    return tokenizer.decode(prompt.input_ids[0][mask])


def test_roles_and_message_indices(tokenizer, prompt):
    assert _text(tokenizer, prompt, resolve_roi("system", prompt)) == "Answer in French."
    assert _text(tokenizer, prompt, resolve_roi("assistant", prompt)) == "Quatre."
    assert _text(tokenizer, prompt, resolve_roi("message:1", prompt)) == "What is <b>2+2</b>?"
    assert _text(tokenizer, prompt, resolve_roi(ROI.message(-1), prompt)) == "Et 3+3 ?"
    user = resolve_roi("user", prompt)
    assert user.sum() == resolve_roi("message:1", prompt).sum() + resolve_roi("message:3", prompt).sum()


def test_chat_template_tokens_are_excluded(tokenizer, prompt):
    mask = resolve_roi("system", prompt)
    ids = prompt.input_ids[0][mask].tolist()
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_char_spans_and_token_positions(tokenizer, prompt):
    start = prompt.text.index("French")
    mask = resolve_roi(f"chars:{start}-{start + 6}", prompt)
    assert _text(tokenizer, prompt, mask).strip() == "French"
    mask = resolve_roi("tokens:0,2-4", prompt)
    assert mask.nonzero().flatten().tolist() == [0, 2, 3, 4]
    assert resolve_roi(ROI.tokens([1]), prompt).sum() == 1


def test_parse_round_trips():
    for spec in ["system", "user", "message:2", "chars:3-9", "tokens:1,2,3"]:
        assert str(ROI.parse(spec)) == spec
