"""One self-contained, interactive HTML page of what AGD did (``agd report``, ``result.to_html()``).

The page is ``report.html`` (CSS and JavaScript, beside this file) with the trace embedded as JSON in
a ``<script type="application/json">`` block. The JavaScript builds the page from that data with
``textContent`` only, so token text (special tokens, ``<script>``, newlines, any script) is shown
as it is and never parsed as HTML. Nothing is fetched: no CDN, no fonts, no network.
"""
from __future__ import annotations

import html
import json
import math
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Mapping, Union

from ..checks import check_not_clobbering, check_writable, is_agd_html, is_int
from ..errors import AgdError, TraceFileError
from ..methods import get_method, method_names
from ..trace import GenerationResult
from .style import PALETTE, css_variables

__all__ = ["Results", "TraceFileError", "load_results", "report_data", "render_html", "write_html", "show", "register_report"]

Results = Union[GenerationResult, Mapping[str, GenerationResult]]
_MARKER = re.compile(r"/\*AGD_CSS\*/|__AGD_TITLE__|__AGD_DATA__")


def _as_dict(results: Results) -> dict[str, GenerationResult]:
    if isinstance(results, GenerationResult):
        return {results.config.get("method", "agd"): results}
    if not results or not all(isinstance(r, GenerationResult) for r in results.values()):
        raise AgdError("expected a GenerationResult or a non-empty {name: GenerationResult} mapping")
    return dict(results)


def load_results(path: str | Path) -> dict[str, GenerationResult]:
    """Read a trace written by ``agd generate --json`` (one result, or ``{"greedy": ..., "agd": ...}``).

    Example:
        >>> results = load_results("trace.json")     # {"greedy": GenerationResult, "agd": ...}
        >>> Path("report.html").write_text(render_html(results))
    """
    path = Path(path)
    if not path.is_file():
        raise TraceFileError(f"no trace file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceFileError(f"{path} is not JSON ({e}); expected a trace from `agd generate --json`") from None
    if isinstance(data, dict) and "steps" in data:
        config = data.get("config")
        runs = {(config.get("method") if isinstance(config, dict) else None) or "agd": data}
    elif isinstance(data, dict) and data and all(isinstance(v, dict) and "steps" in v for v in data.values()):
        runs = data
    else:
        raise TraceFileError(f"{path} is not a trace: expected the JSON that `agd generate --json` or "
                             "GenerationResult.save writes")
    out = {}
    for name, d in runs.items():
        problem = _trace_problem(d)
        if problem:
            raise TraceFileError(f"{path} is not a complete trace ({name}: {problem}); expected the JSON that "
                                 "`agd generate --json` writes")
        try:
            out[name] = GenerationResult.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TraceFileError(f"{path} is not a complete trace ({name}: {type(e).__name__}: {e})") from None
    return out


_TRACE_FIELDS = {"text": str, "token_ids": list, "tokens": list, "prompt": str, "prompt_ids": list, "steps": list}
_STEP_FIELDS = {"index": int, "entropy": (int, float), "reason": str, "greedy_id": int, "chosen_id": int,
                "candidates": list}


def _trace_problem(d: dict) -> str | None:
    """What makes ``d`` unusable as a trace (a missing or mistyped field), or None."""
    for k, t in _TRACE_FIELDS.items():
        if not isinstance(d.get(k), t):
            kind = {"str": "string"}.get(t.__name__, t.__name__)
            return f"field {k!r} must be a {kind}" if k in d else f"field {k!r} is missing"
    for k in ("token_ids", "prompt_ids"):
        if not all(is_int(t) for t in d[k]):
            return f"field {k!r} must be a list of integers"
    if "model" in d and not isinstance(d["model"], str):
        return "field 'model' must be a string"
    if "seconds" in d and not _finite(d["seconds"]):
        return "field 'seconds' must be a number"
    if len(d["tokens"]) != len(d["steps"]) or len(d["token_ids"]) != len(d["steps"]):
        return f"{len(d['steps'])} steps but {len(d['tokens'])} tokens"
    for i, st in enumerate(d["steps"]):
        if not isinstance(st, dict):
            return f"step {i} is not an object"
        for k, t in _STEP_FIELDS.items():
            if not isinstance(st.get(k), t) or isinstance(st.get(k), bool):
                return f"step {i}: field {k!r} is missing or mistyped"
        if not _finite(st["entropy"]):
            return f"step {i}: 'entropy' is not a finite number"
        for j, c in enumerate(st["candidates"]):
            if not isinstance(c, dict) or not isinstance(c.get("token_id"), int) or not _finite(c.get("prob")):
                return f"step {i}, candidate {j}: needs 'token_id' and 'prob'"
            if not isinstance(c.get("token"), str):
                return f"step {i}, candidate {j}: needs its 'token' text"
            scores = c.get("scores")
            if scores is not None and not (isinstance(scores, dict) and all(
                    isinstance(n, str) and (v is None or _finite(v)) for n, v in scores.items())):
                return f"step {i}, candidate {j}: 'scores' must map ROI names to numbers"
    if not isinstance(d.get("prompt_tokens", []), list):
        return "field 'prompt_tokens' is not a list"
    rois = d.get("roi_positions")
    if not isinstance(rois, dict) or not all(isinstance(v, list) and all(isinstance(p, int) for p in v)
                                             for v in rois.values()):
        return "field 'roi_positions' must map ROI names to lists of token positions"
    if not isinstance(d.get("config"), dict):
        return "field 'config' is missing or not an object"
    extra = d.get("extra", {})
    relevance = extra.get("relevance", {}) if isinstance(extra, dict) else None
    if not isinstance(relevance, dict) or not all(
            re.fullmatch(r"[0-9]+", str(k)) and isinstance(m, list) and all(v is None or _finite(v) for v in m)
            for k, m in relevance.items()):
        return "field 'extra.relevance' must map step numbers to lists of numbers"
    return None


def _finite(x) -> bool:
    """A JSON number that is a usable float (not a bool, not NaN/inf, not a 400-digit integer)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _num(x: float | None, digits: int = 4) -> float | None:
    # JSON has no NaN/inf (JSON.parse would reject the page); 4 significant digits keep pages small.
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _clean(x):
    # Free-form fields (config, a baseline's step info) may hold NaN, tuples or objects: make them JSON.
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return _num(x, 6)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return str(x)


def _guided(r: GenerationResult) -> bool:
    """Whether ``r``'s method chooses tokens by attribution (the page then shows its ROI and gate)."""
    method = r.config.get("method", "agd") if isinstance(r.config, dict) else "agd"
    if isinstance(method, str) and method in method_names():
        return get_method(method).guided
    # A method not registered here (a trace from elsewhere): guided where its candidates were scored.
    return any(c.scores is not None for s in r.steps for c in s.candidates)


def _result_data(name: str, r: GenerationResult) -> dict:
    relevance = r.extra.get("relevance", {}) if isinstance(r.extra, dict) else {}
    return {
        "name": name,
        "model": r.model,
        "config": _clean(r.config),
        "guided": _guided(r),
        "seconds": _num(r.seconds),
        "tokens": list(r.tokens),
        "prompt_tokens": list(r.prompt_tokens),
        # Without per-token strings (traces older than ``prompt_tokens``) the page shows the text only.
        "prompt": "" if r.prompt_tokens else r.prompt,
        "n_prompt": len(r.prompt_ids),
        "roi_positions": {k: list(v) for k, v in r.roi_positions.items()},
        "steps": [{
            "entropy": _num(s.entropy),
            "reason": s.reason,
            "greedy_id": s.greedy_id,
            "chosen_id": s.chosen_id,
            "info": _clean(getattr(s, "info", None)),  # what a baseline method computed at this step
            "candidates": [{"id": c.token_id, "token": c.token, "prob": _num(c.prob),
                            "scores": None if c.scores is None else {k: _num(v) for k, v in c.scores.items()}}
                           for c in s.candidates],
        } for s in r.steps],
        # Keys are ints in memory and strings after a JSON round trip: normalise to strings.
        "relevance": {str(int(k)): [_num(v) for v in m] for k, m in relevance.items()},
    }


def report_data(results: Results, title: str | None = None) -> dict:
    """The JSON-safe data the page is built from (no NaN, numbers rounded to 4 digits).

    Example:
        >>> report_data(result)["results"][0]["steps"][0]["candidates"][0]["prob"]
        0.8123
    """
    res = _as_dict(results)
    return {"title": title or _default_title(res), "palette": PALETTE,
            "results": [_result_data(n, r) for n, r in res.items()]}


def _default_title(res: dict[str, GenerationResult]) -> str:
    model = Path(next(iter(res.values())).model).name  # a cache path says little; its last part names it
    what = " vs ".join("AGD" if n == "agd" else n for n in res)
    return f"{what}: {model}" if model else what


def _embed_json(data: dict) -> str:
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    # Inside <script>, "</script>" or "<!--" in a token would end or alter the block: escape < > &
    # (valid JSON escapes, only ever inside strings).
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(results: Results, title: str | None = None) -> str:
    """One self-contained HTML page: generated text with overrides, candidates, entropy, relevance heatmap.

    ``results`` is one ``GenerationResult`` or ``{"greedy": ..., "agd": ...}`` (shown side by side).

    Example:
        >>> both = agdecode.compare(model, tok, messages, engine="reverse", max_new_tokens=40)
        >>> Path("report.html").write_text(render_html(both), encoding="utf-8")
    """
    data = report_data(results, title)
    template = resources.files(__package__).joinpath("report.html").read_text(encoding="utf-8")
    parts = {"/*AGD_CSS*/": css_variables(), "__AGD_TITLE__": html.escape(data["title"]),
             "__AGD_DATA__": _embed_json(data)}
    return _MARKER.sub(lambda m: parts[m.group(0)], template)


def write_html(results: Results, path: str | Path, title: str | None = None) -> Path:
    """Write the report (see ``render_html``) to ``path`` as UTF-8 and return the path.

    Example:
        >>> write_html(load_results("trace.json"), "report.html")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results, title), encoding="utf-8")
    return path


def _kernel():
    try:
        from IPython import get_ipython  # optional: present only where IPython/Jupyter is installed
    except ImportError:
        return None
    ip = get_ipython()
    return ip if ip is not None and getattr(ip, "kernel", None) is not None else None


def show(results: Results, title: str | None = None, height: int = 780) -> Path | None:
    """Show the report inline in Jupyter, or else write it to a temporary file and print its path.

    Inline, the page sits in a sandboxed ``<iframe srcdoc>`` so its CSS and script cannot touch the
    notebook. Returns the file written outside Jupyter, ``None`` inline.

    Example:
        >>> show(agdecode.compare(model, tok, messages, engine="reverse"))
    """
    page = render_html(results, title)
    if _kernel() is not None:
        from IPython.display import HTML, display  # optional: only inside a Jupyter kernel

        display(HTML(f'<iframe srcdoc="{html.escape(page, quote=True)}" sandbox="allow-scripts" '
                     f'style="width:100%;height:{int(height)}px;border:1px solid {PALETTE["grid"]}"></iframe>'))
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".html", prefix="agd-report-", delete=False,
                                     encoding="utf-8") as f:
        f.write(page)
    print(f"report written to {f.name}")
    return Path(f.name)


def cmd_report(args) -> int:
    results = load_results(args.trace)
    target = args.output or Path(args.trace).with_suffix(".html")
    check_writable(target, "--output", create_parents=True)
    check_not_clobbering(target, "--output", own=is_agd_html, inputs=(args.trace,))
    out = write_html(results, target, title=args.title)
    print(f"report written to {out} (open it in a browser; it needs no network)")
    return 0


def register_report(sub) -> None:
    """The ``agd report TRACE.json -o report.html`` subcommand.

    Example:
        $ agd generate --compare --engine reverse --json trace.json && agd report trace.json -o report.html
    """
    p = sub.add_parser("report", help="write an interactive HTML report of a trace from `agd generate --json`",
                       description="Write one self-contained HTML page (no network needed) showing the generated "
                                   "text with AGD's overrides, each step's candidates, probabilities, ROI scores "
                                   "and entropy, and the prompt's relevance heatmap.")
    p.add_argument("trace", help="JSON written by `agd generate --json` (with or without --compare)")
    p.add_argument("-o", "--output", help="HTML file to write (default: TRACE with .html)")
    p.add_argument("--title", help="page title (default: the methods and the model)")
    p.set_defaults(func=cmd_report)
