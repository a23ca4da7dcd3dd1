"""Reports: the HTML page (rendered in headless Chromium), the shared style, the terminal rendering."""
from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

from agdecode.cli import main
from agdecode.report import html as report_html
from agdecode.report.html import load_results, render_html, report_data, show, write_html
from agdecode.report.style import PALETTE, apply_style, css_variables, method_color, save_png
from agdecode.report.terminal import print_comparison, print_result
from agdecode.trace import Candidate, GenerationResult, Step
from chromium import INSTALL_HINT, Chromium, find_chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
DATA_BLOCK = re.compile(r'<script type="application/json" id="agd-data">(.*?)</script>', re.S)

# Text that breaks naive pages: markup, a script that would set window.pwned, entities, quotes,
# newlines, a JS line separator, an empty token, special tokens, Cyrillic, CJK, Arabic, emoji.
NASTY_PROMPT = ["<|im_start|>", "system", "\n", "<script>window.pwned=1</script>", " Réponds", " en",
                " русском", " 猫", "<|im_end|>", "\n", "<|im_start|>", "user", "\n",
                '<img src=x onerror="window.pwned=1">', " &amp;", " \"quoted\" 'x'", "\u2028", "</script><!--",
                "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
NASTY_OUT = ["Кошки", " —", " 猫", "\n\n", "<script>", "window.pwned=1", "</script>", " 🐱", "", " مرحبا",
             "&lt;b&gt;", "<|im_end|>"]


def nasty_result(method: str = "agd") -> GenerationResult:
    """A hand-built trace whose every string is hostile; step 4 overrides greedy, step 2 is gated."""
    n_prompt = len(NASTY_PROMPT)
    steps, relevance = [], {}
    for i, tok in enumerate(NASTY_OUT):
        chosen, greedy = 1000 + i, (2000 + i if method == "agd" and i in (0, 4, 9) else 1000 + i)
        gated = method == "agd" and i == 2
        scored = method == "agd" and not gated
        cands = [Candidate(chosen, tok, 0.3, {"system": 0.9} if scored else None)]
        if greedy != chosen:
            cands.insert(0, Candidate(greedy, f"<b>greedy{i}</b>\n", 0.5, {"system": 0.1}))
        cands.append(Candidate(3000 + i, "<script>alert(1)</script>", 0.01, None))
        reason = "gate" if gated else ("attribution" if scored else "greedy")
        steps.append(Step(i, 0.5 if gated else 2.0 + 0.1 * i, reason, greedy, chosen, cands))
        if scored:
            relevance[i] = [((p % 5) - 2) / 2.0 for p in range(n_prompt + i)]
    return GenerationResult(
        text="".join(NASTY_OUT[:-1]), token_ids=[s.chosen_id for s in steps], tokens=list(NASTY_OUT),
        prompt="".join(NASTY_PROMPT), prompt_ids=list(range(n_prompt)),
        roi_positions={"system": [3, 4, 5, 6, 7]} if method == "agd" else {}, steps=steps,
        config={"method": method, "roi": ["system"], "k": 3, "min_prob": 0.05, "entropy_threshold": 1.0,
                "attribution": "lrp", "engine": "reverse", "max_new_tokens": 12},
        model="/cache/models/tiny-<model>", seconds=0.5,
        extra={"relevance": relevance} if relevance else {}, prompt_tokens=list(NASTY_PROMPT))


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:  # a skipped browser test would hide a broken install: fail instead
        pytest.fail(INSTALL_HINT, pytrace=False)
    with Chromium() as b:
        yield b


def open_page(browser: Chromium, path: Path) -> None:
    browser.open(path.resolve().as_uri())
    assert browser.evaluate("document.body.dataset.ready") == "1", "the page script did not finish"
    assert browser.errors == [], "the page logged errors"
    assert browser.requests == [path.resolve().as_uri()], "the page fetched something besides itself"


# ---- page source, no browser


def test_page_source_escapes_everything(tmp_path):
    both = {"greedy": nasty_result("greedy"), "agd": nasty_result()}
    page = render_html(both, title="<b>cats</b> & dogs")
    # Only the template's own two script blocks; no token text ends or opens one.
    assert page.count("<script") == 2 and page.count("</script") == 2
    assert "<img" not in page and "<b>" not in page and "<!--" not in page
    assert "<title>&lt;b&gt;cats&lt;/b&gt; &amp; dogs</title>" in page
    assert page.isascii()  # the JSON block is ASCII-escaped: no raw U+2028, which old JS parsers choke on
    embedded = json.loads(DATA_BLOCK.search(page).group(1))
    assert embedded == json.loads(json.dumps(report_data(both, "<b>cats</b> & dogs")))
    assert embedded["results"][1]["tokens"] == NASTY_OUT
    assert embedded["results"][1]["prompt_tokens"] == NASTY_PROMPT
    assert not re.search(r"https?://|//cdn|<link|@import", page), "the page must not load anything"


def test_old_traces_json_keys_and_nan_render():
    d = nasty_result().to_dict()
    del d["prompt_tokens"]  # a trace written before the field existed
    d["steps"][1]["entropy"] = math.nan
    d["steps"][1]["info"] = {"layer": 8, "gap": math.inf, "pair": (1, 2)}  # a baseline's step info
    d = json.loads(json.dumps(d))  # relevance keys become strings, as in a saved trace
    result = GenerationResult.from_dict(d)
    assert result.prompt_tokens == []
    data = report_data(result)["results"][0]
    assert data["steps"][1]["entropy"] is None and data["prompt"] == result.prompt
    assert data["steps"][1]["info"] == {"layer": 8, "gap": None, "pair": [1, 2]}
    assert set(data["relevance"]) == {"0", "1", "3", "4", "5", "6", "7", "8", "9", "10", "11"}
    json.loads(DATA_BLOCK.search(result.to_html()).group(1))  # strict JSON: no NaN


def test_the_page_learns_from_the_method_registry_whether_a_run_was_guided():
    # The page shows a ROI and a gate for guided methods only; it asks the registry, not the name.
    assert report_data(nasty_result())["results"][0]["guided"] is True
    assert report_data(nasty_result("greedy"))["results"][0]["guided"] is False
    foreign = nasty_result()  # a method this installation does not have: guided where it scored candidates
    foreign.config["method"] = "someone-elses"
    assert report_data(foreign)["results"][0]["guided"] is True
    foreign = nasty_result("greedy")
    foreign.config["method"] = "someone-elses"
    assert report_data(foreign)["results"][0]["guided"] is False


def test_agd_report_command(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({m: nasty_result(m).to_dict() for m in ("greedy", "agd")}, ensure_ascii=False))
    assert main(["report", str(trace), "-o", str(tmp_path / "out" / "r.html"), "--title", "T"]) == 0
    assert "report written to" in capsys.readouterr().out
    page = (tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert [r["name"] for r in json.loads(DATA_BLOCK.search(page).group(1))["results"]] == ["greedy", "agd"]
    nasty_result().save(tmp_path / "single.json")
    assert main(["report", str(tmp_path / "single.json")]) == 0 and (tmp_path / "single.html").exists()
    (tmp_path / "bad.json").write_text('{"x": 1}')
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert "not a trace" in capsys.readouterr().err
    (tmp_path / "nope.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_results(tmp_path / "nope.json")


def test_show_inline_in_jupyter_and_as_file(monkeypatch, capsys):
    path = show(nasty_result())
    assert path.exists() and str(path) in capsys.readouterr().out
    shown = []
    display = types.ModuleType("IPython.display")
    display.HTML = lambda s: s
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setattr(report_html, "_kernel", lambda: object())
    assert nasty_result().show() is None
    (frame,) = shown
    assert frame.startswith('<iframe srcdoc="') and 'sandbox="allow-scripts"' in frame
    assert frame.count("<") == 2  # the iframe's own tags: the whole page is attribute-escaped
    path.unlink()


# ---- in the browser


def test_hostile_text_is_displayed_verbatim_in_chromium(browser, tmp_path):
    path = write_html({"greedy": nasty_result("greedy"), "agd": nasty_result()}, tmp_path / "nasty.html")
    open_page(browser, path)
    ev = browser.evaluate
    assert ev("window.pwned") is None and ev("document.querySelectorAll('img').length") == 0
    for ri in (0, 1):  # every token element's text is the token, exactly
        assert ev(f"Array.from(document.querySelectorAll('#text-{ri} .tok')).map(e => e.textContent)") == NASTY_OUT
    assert ev("Array.from(document.querySelectorAll('#heat .ptok')).slice(0, %d).map(e => e.textContent)"
              % len(NASTY_PROMPT)) == NASTY_PROMPT
    cells = ev("Array.from(document.querySelectorAll('#r1-s4 tr.cand td:first-child code')).map(e => e.textContent)")
    assert [json.loads(c) for c in cells] == ["<b>greedy4</b>\n", "<script>", "<script>alert(1)</script>"]
    assert ev("document.querySelectorAll('#text-1 .tok.ov').length") == 3
    assert ev("document.querySelector('#text-1 .tok.empty').textContent") == ""
    assert ev("document.title") == "greedy vs AGD: tiny-<model>"


def test_pages_without_relevance_or_prompt_tokens_in_chromium(browser, tmp_path):
    old = nasty_result().to_dict()
    del old["prompt_tokens"], old["extra"]  # an old trace, or an engine that keeps no relevance maps
    baseline = nasty_result("greedy")
    baseline.config.update(method="cad", cad_alpha=0.5)
    for s in baseline.steps:
        s.reason, s.info = "cad", {"model_top": 7, "note": "<i>x</i>"}
    pages = [("greedy", nasty_result("greedy")), ("cad", baseline), ("old", GenerationResult.from_dict(old))]
    for name, result in pages:
        open_page(browser, write_html(result, tmp_path / f"{name}.html"))
        if name == "cad":
            assert "cad decoding, cad_alpha=0.5" in browser.evaluate("document.querySelector('.card h2').textContent")
            assert 'note = "<i>x</i>"' in browser.evaluate("document.getElementById('r0-s0').textContent")
            assert browser.evaluate("document.querySelectorAll('i, .threshold').length") == 0
        assert browser.evaluate("document.querySelectorAll('#heat .ptok[style*=background]').length") == 0
        assert "relevance map" in browser.evaluate("document.getElementById('heat-info').textContent")
    assert browser.evaluate("document.getElementById('heat').textContent").endswith("".join(NASTY_PROMPT))


@pytest.mark.slow
def test_real_trace_report_in_chromium(browser, smollm2, tmp_path):
    """SmolLM2, French system prompt, reverse engine: the report of `agd generate --compare --json`."""
    import agdecode

    model, tok = smollm2
    messages = [{"role": "system", "content": "Always answer in French."},
                {"role": "user", "content": "Tell me about cats."}]
    both = agdecode.compare(model, tok, messages, engine="reverse", entropy_threshold=1.0, max_new_tokens=12)
    agd = both["agd"]
    assert agd.overrides and agd.extra["relevance"], "the demo prompt should make AGD override greedy"
    assert any(s.gated for s in agd.steps) and agd.prompt_tokens and len(agd.prompt_tokens) == len(agd.prompt_ids)
    ARTIFACTS.mkdir(exist_ok=True)
    trace = ARTIFACTS / "report-smollm2.json"  # as `agd generate --compare --json` writes it
    trace.write_text(json.dumps({m: r.to_dict() for m, r in both.items()}, ensure_ascii=False, indent=1))
    page = ARTIFACTS / "report-smollm2.html"
    assert main(["report", str(trace), "-o", str(page)]) == 0
    open_page(browser, page)
    ev = browser.evaluate

    ov = ev("Array.from(document.querySelectorAll('#text-1 .tok.ov'))"
            ".map(e => [Number(e.dataset.step), e.textContent])")
    assert ov == [[i, agd.tokens[i]] for i in agd.overrides]
    assert ev("document.querySelectorAll('#text-0 .tok.ov').length") == 0  # greedy never overrides itself
    for i in agd.overrides:  # each override has its candidate table: greedy's and AGD's token, with scores
        rows = ev(f"Array.from(document.querySelectorAll('#r1-s{i} tr.cand')).map(r => "
                  "[r.classList.contains('chosen'), JSON.parse(r.cells[0].textContent), r.cells[2].textContent])")
        step = agd.steps[i]
        assert [r[1] for r in rows] == [c.token for c in step.candidates]
        assert [r[0] for r in rows] == [c.token_id == step.chosen_id for c in step.candidates]
        assert all(r[2].startswith(("+", "-")) for r, c in zip(rows, step.candidates) if c.scores)
    gated = next(s.index for s in agd.steps if s.gated)
    assert "gated" in ev(f"document.querySelector('#r1-s{gated} .badge.gate').textContent")
    assert ev("document.querySelectorAll('#strip-1 .bar').length") == len(agd.steps)
    assert ev("document.querySelectorAll('#strip-1 .threshold').length") == 1
    assert ev("document.querySelectorAll('#strip-0 .threshold').length") == 0  # greedy has no gate

    # The heatmap starts on the first override; clicking another override moves it there.
    n_prompt, roi = len(agd.prompt_ids), agd.roi_positions["system"]
    first = agd.overrides[0]
    assert ev("document.getElementById('heat-step').value") == str(first)
    assert ev("document.querySelectorAll('#heat .ptok').length") == n_prompt + first
    assert ev("Array.from(document.querySelectorAll('#heat .ptok.roi')).map(e => Number(e.dataset.pos))") == roi
    colours = ev("Array.from(document.querySelectorAll('#heat .ptok')).map(e => e.style.backgroundColor)")
    assert any(c.startswith("rgba(214, 39, 40") for c in colours)  # positive (red) and negative (blue) cells
    assert any(c.startswith("rgba(31, 119, 180") for c in colours)
    last = agd.overrides[-1]
    ev(f"document.querySelector('#text-1 .tok[data-step=\"{last}\"]').click()")
    assert ev("document.getElementById('heat-step').value") == str(last)
    assert ev("document.querySelectorAll('#heat .ptok').length") == n_prompt + last
    assert ev(f"document.getElementById('r1-s{last}').hidden") is False
    ev(f"document.querySelector('#text-1 .tok[data-step=\"{gated}\"]')"
       ".dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))")  # hover shows the step, keeps the pin
    assert ev(f"document.getElementById('r1-s{gated}').hidden") is False
    assert ev("document.getElementById('heat-step').value") == str(last)
    ev("document.getElementById('text-1').dispatchEvent(new MouseEvent('mouseleave'))")  # back to the pinned step
    assert ev(f"document.getElementById('r1-s{gated}').hidden") is True
    assert ev(f"document.getElementById('r1-s{last}').hidden") is False
    assert browser.errors == []

    png = browser.screenshot(ARTIFACTS / "report-smollm2.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# ---- style and terminal


def test_style_is_shared_by_css_and_matplotlib(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert f"--agd-override: {PALETTE['override']};" in css_variables()
    assert method_color("agd") == PALETTE["agd"] and method_color("greedy") == PALETTE["greedy"]
    assert method_color("beam") == method_color("beam") and method_color("beam").startswith("#")
    apply_style()
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == PALETTE["agd"]
    fig, ax = plt.subplots()
    ax.bar(["greedy", "AGD"], [0.4, 0.6], color=[method_color("greedy"), method_color("agd")])
    out = save_png(fig, tmp_path / "plots" / "bar.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_terminal_shows_overrides_with_entropy_and_gate():
    console = Console(record=True, width=140, color_system=None)
    messages = [{"role": "system", "content": "<script>"}, {"role": "user", "content": "Кошки?"}]
    print_comparison(messages, nasty_result("greedy"), nasty_result(), console=console)
    print_result(nasty_result(), console=console)
    out = console.export_text()
    assert "<script>" in out and "Кошки?" in out and "[Кошки]" in out
    assert "where AGD overrode greedy" in out and "entropy (gate 1.0)" in out and "1 gated" in out
    assert "'<b>greedy4</b>\\n' p=0.500, ROI +0.100" in out
