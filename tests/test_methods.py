"""The method registry: a method registered from outside the package runs everywhere a method is named."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import agdecode
from agdecode import methods
from agdecode.cli import main
from agdecode.decoding import AGDConfig, generate
from agdecode.errors import AgdError
from agdecode.methods import DecodingMethod, get_method, method_names, register_method, unregister_method
from conftest import make_tiny

SRC = Path(agdecode.__file__).parent


class LowestOfTopK:
    """A policy: the least probable of the step's top-k tokens."""

    def __call__(self, view, choice, source) -> None:
        rows = choice.undecided()
        choice.set(rows, view.top_i[rows, -1], "lowest")


class Lowest(DecodingMethod):
    """A toy method agdecode does not ship (one class, one registration line)."""

    name, about = "lowest-test", "the least probable of the top-k (a test method)"

    def policies(self, cfg):
        return [LowestOfTopK()]


@pytest.fixture
def lowest():
    register_method(Lowest)
    yield get_method("lowest-test")
    unregister_method("lowest-test")


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _is_lowest(steps) -> bool:
    return all(s.chosen_id == s.candidates[-1].token_id and s.reason == "lowest" for s in steps)


def test_a_registered_method_runs_through_generate(lowest, tokenizer, messages):
    model = make_tiny("llama", len(tokenizer))
    out = generate(model, tokenizer, messages, method="lowest-test", max_new_tokens=5, k=3)
    assert len(out.steps) == 5 and _is_lowest(out.steps)
    assert out.config["method"] == "lowest-test"
    batch = generate(model, tokenizer, [messages, messages[1:]], method="lowest-test", max_new_tokens=5, k=3)
    assert batch[0].token_ids == out.token_ids and _is_lowest(batch[1].steps)


def test_a_registered_method_runs_through_agd_generate_and_agd_eval(lowest, model_dir, tmp_path):
    trace = tmp_path / "t.json"
    assert main(["generate", "Hi", "--model", str(model_dir), "--method", "lowest-test", "--k", "3",
                 "--max-new-tokens", "4", "--json", str(trace)]) == 0
    steps = json.loads(trace.read_text())["steps"]
    assert len(steps) == 4 and all(s["chosen_id"] == s["candidates"][-1]["token_id"] for s in steps)
    assert main(["eval", "rules", "--method", "lowest-test", "--model", str(model_dir), "--max-new-tokens", "3",
                 "--limit", "2", "--no-progress", "--set", "k=3", "--out", str(tmp_path / "runs")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "runs" / "lowest-test" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("error" not in r for r in recs)


def test_a_registered_method_is_served(lowest, tokenizer, messages):
    from agdecode.serve.app import AgdServer
    from test_serve import post, running

    model = make_tiny("llama", len(tokenizer))
    with running(AgdServer(model, tokenizer, "tiny", {"method": "greedy"}, max_tokens=4)) as url:
        status, body = post(url, {"model": "tiny", "messages": messages, "max_tokens": 4,
                                  "agd": {"method": "lowest-test", "k": 3}}, headers={"Authorization": ""})
    assert status == 200, body
    want = generate(model, tokenizer, messages, method="lowest-test", max_new_tokens=4, k=3)
    assert body["choices"][0]["message"]["content"] == want.text and body["agd"]["method"] == "lowest-test"


def test_methods_from_entry_points_are_loaded_once_and_a_broken_one_only_warns(monkeypatch):
    class EP:
        def __init__(self, name, target):
            self.name, self.value, self._target = name, f"pkg:{name}", target

        def load(self):
            if isinstance(self._target, Exception):
                raise self._target
            return self._target

    calls = []

    def fake(group):
        calls.append(group)
        return [EP("lowest-test", Lowest), EP("broken", ImportError("no module named pkg"))]

    monkeypatch.setattr(methods, "entry_points", fake)
    monkeypatch.setattr(methods, "_entry_points_loaded", False)
    try:
        with pytest.warns(UserWarning, match="'broken'.*failed to load"):
            assert "lowest-test" in method_names()
        assert get_method("lowest-test").about.startswith("the least probable")
        method_names()
        assert calls == [methods.ENTRY_POINT_GROUP]
    finally:
        unregister_method("lowest-test")


def test_registry_refuses_bad_names_and_silent_replacement():
    class Nameless(DecodingMethod):
        pass

    class Other(DecodingMethod):
        name = "greedy"

    with pytest.raises(AgdError, match="needs a name"):
        register_method(Nameless)
    with pytest.raises(AgdError, match="already registered"):
        register_method(Other)
    with pytest.raises(AgdError, match="takes a DecodingMethod"):
        register_method(object())
    with pytest.raises(AgdError, match="method must be one of agd, greedy"):
        AGDConfig(method="nope").validate()
    assert get_method("greedy").name == "greedy"


def test_a_setting_owned_by_one_method_is_refused_with_another():
    with pytest.raises(AgdError, match="steer_layer is only used by method='steer'"):
        AGDConfig(method="agd", steer_layer=3).validate()
    with pytest.raises(AgdError, match="needs steer_vector"):
        AGDConfig(method="steer").validate()


def test_no_method_name_is_compared_outside_the_registry():
    """The issue's target: method names are compared only in methods.py (and named in CLI choices)."""
    names = "|".join(map(re.escape, ("agd", "greedy", "cad", "dola", "steer", "sample")))
    pattern = re.compile(rf"""method\S*\s*(==|!=|in|not in)\s*[\(\[]?\s*["']({names})["']""")
    hits = []
    for path in SRC.rglob("*.py"):
        if path.name == "methods.py" and path.parent == SRC:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert hits == []


def test_adding_a_method_is_documented():
    readme = (SRC.parents[1] / "README.md").read_text()
    section = readme.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    assert "register_method" in section and "agdecode.methods" in section


def test_min_prob_ratio_narrows_the_candidates_to_those_near_the_top_token():
    """The project's variant: candidates need p >= ratio * p(top) as well as p >= min_prob."""
    import torch

    from agdecode.policies import AttributionChoice, Choice, View

    top_p = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.03], [0.2, 0.15, 0.1, 0.06, 0.04]])
    top_i = torch.arange(10).reshape(2, 5)

    class Scores:  # the least probable candidate always has the highest ROI score
        def scores(self, ids, rows):
            return torch.arange(5.0).expand(len(rows), 1, 5)

    def chosen(ratio):
        choice = Choice(torch.full((2,), -1), [None, None])
        AttributionChoice(0.05, ratio)(View(None, top_p, top_i, None, []), choice, Scores())
        return choice.chosen.tolist(), choice.reasons

    assert chosen(0.0) == ([3, 8], ["attribution", "attribution"])   # the paper: p >= 0.05
    assert chosen(0.3) == ([1, 7], ["attribution", "attribution"])   # floors 0.18 and 0.06
    assert chosen(0.5) == ([0, 7], ["single", "attribution"])        # a sure step keeps its top token


def test_there_is_no_pseudo_roi_and_roi_none_needs_regions(tokenizer, messages):
    from agdecode.roi import ROI

    with pytest.raises(AgdError, match="Cannot parse ROI 'mask'"):
        ROI.parse("mask")
    model = make_tiny("llama", len(tokenizer))
    with pytest.raises(AgdError, match="needs a ROI"):
        generate(model, tokenizer, messages, roi=None, max_new_tokens=1)
    with pytest.raises(AgdError, match="needs a ROI to leave out"):
        generate(model, tokenizer, messages, method="cad", roi=None, max_new_tokens=1)
    assert generate(model, tokenizer, messages, method="greedy", roi=None, max_new_tokens=2).config["roi"] == []
