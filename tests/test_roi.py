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


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "system"}, {"role": "user", "content": "end"}],
    [{"role": "system", "content": "im_start"}, {"role": "user", "content": "user"}],
    [{"role": "user", "content": "assistant"}],  # after SmolLM2's default system message
    [{"role": "system", "content": "  padded  "}, {"role": "user", "content": "\n"}, {"role": "assistant", "content": "user"},
     {"role": "user", "content": "im_end"}],
])
def test_message_rois_resolve_to_the_content_never_to_template_tokens(tokenizer, messages):
    prompt = render_prompt(tokenizer, messages)
    specials = set(tokenizer.all_special_ids)
    for i, m in enumerate(messages):
        start, end = prompt.message_spans[i]
        assert prompt.text[start:end] == m["content"].strip()
        # The content starts right after its role header: the text before it ends with "<role>\n".
        assert prompt.text[:start].endswith(f"{m['role']}\n" + (m["content"][:len(m["content"]) - len(m["content"].lstrip())]))
        if m["content"].strip():
            ids = prompt.input_ids[0][resolve_roi(f"message:{i}", prompt)].tolist()
            assert not set(ids) & specials
            assert tokenizer.decode(ids).strip() == m["content"].strip()


def test_a_template_that_rewrites_content_refuses_message_rois_only(tokenizer):
    from agdecode import ROIError

    saved = tokenizer.chat_template
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    try:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": "hello"}])
        with pytest.raises(ROIError, match="not found verbatim"):
            resolve_roi("user", prompt)
        assert resolve_roi("chars:6-11", prompt).any()  # what the message suggests instead works
    finally:
        tokenizer.chat_template = saved


def test_one_parser_for_the_roi_grammar():
    from agdecode.roi import Term, parse_expression, parse_rois

    assert parse_expression("context - user") == [Term("+", ROI("context", ())), Term("-", ROI.role("user"))]
    assert parse_expression("-system | document:2") == [Term("-", ROI.role("system")), Term("|", ROI("document", (2,)))]
    assert parse_expression("heads:3.1,4.5")[0].roi == ROI("heads", ("3.1,4.5",))
    assert ROI.parse("tokens:0-30000000").value == ((0, 30000000),)  # ranges stay ranges
    assert [len(e) for e in parse_rois(["system", "context - user"])] == [1, 2]
