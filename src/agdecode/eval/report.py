"""``agd eval report``: one markdown table and one PNG per task and data set, from run directories.

Every rate comes with a 95 % bootstrap confidence interval over items (percentile method, 2,000
resamples, seeded); instruction-level rule accuracy resamples items, not instructions. Each method
is also compared with greedy on the items both ran: the mean paired difference of the main metric
with its bootstrap CI, the items it wins and loses, an exact sign-test p-value on those, and that
p-value Holm-adjusted over the comparisons of the table (Holm-Bonferroni: the family-wise error rate
of the table stays at 5 % when significance is read from the adjusted p).

Runs are read from run directories (``records.jsonl``) or from their compressed archives
(``records.jsonl.gz``, written by :func:`archive_runs`, the form committed under ``docs/results/``).
:func:`update_doc` rewrites the tables of a markdown file between ``<!-- table:NAME -->`` and
``<!-- /table:NAME -->`` markers, so a document's numbers are regenerated from committed records.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import ReportError
from ..report.style import method_color, new_figure, rc_params, save_png
from .methods import BASELINE
from .records import METRICS, QUALITY, RunFileError, item_values

__all__ = ["load_runs", "build_report", "bootstrap_ci", "paired_vs", "sign_test", "holm", "markdown_tables",
           "update_doc", "archive_runs", "ReportError"]

PRIMARY = {"rules": "prompt_strict", "qa": "recall"}
B = 2000
_MARKER = re.compile(r"<!-- table:(?P<name>[A-Za-z0-9._:@-]+) -->\n.*?<!-- /table:(?P=name) -->", re.S)


def _read_jsonl(folder: Path, name: str) -> list[dict]:
    """The JSON lines of ``folder/name`` or of its archive ``name.gz``."""
    if (folder / name).is_file():
        text = (folder / name).read_text(encoding="utf-8")
    elif (folder / (name + ".gz")).is_file():
        with gzip.open(folder / (name + ".gz"), "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        return []
    out, lines = [], text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # a torn last line of an interrupted run
                continue
            raise ReportError(f"{folder / name}: line {n} is not JSON; the file is damaged "
                              "(only a torn last line is tolerated)") from None
    return out


def _first_per_id(rows: list[dict]) -> list[dict]:
    seen: set = set()
    return [r for r in rows if r.get("id") not in seen and not seen.add(r.get("id"))]


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Every run (a folder with ``run.json``) under ``paths``, with its settings and records.

    Example:
        >>> runs = load_runs(["runs/pilot"]); runs[0]["settings"]["method"]
        'greedy'
    """
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise RunFileError(f"No such run directory: {p}")
        for run_file in sorted([p / "run.json"] if (p / "run.json").is_file() else p.rglob("run.json")):
            folder = run_file.parent
            try:
                settings = json.loads(run_file.read_text())["settings"]
                settings["task"], settings["method"], settings["data"]["name"], settings["model"]["fingerprint"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ReportError(f"{run_file}: not a run description, i.e. is not a run file written by agd eval "
                                  f"({type(e).__name__}: {e})") from None
            try:
                records = _first_per_id(_read_jsonl(folder, "records.jsonl"))
                timings = {t["id"]: t for t in _read_jsonl(folder, "timings.jsonl") if "id" in t}
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                raise ReportError(f"{folder}: cannot read its records ({e})") from None
            found.append({"dir": str(folder), "settings": settings,
                          "records": [r for r in records if not r.get("error")], "timings": timings,
                          "errors": sum(bool(r.get("error")) for r in records)})
    if not found:
        raise RunFileError(f"No run (run.json) under {', '.join(map(str, paths))}.")
    return found


def bootstrap_ci(num: np.ndarray, den: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of sums ``num.sum() / den.sum()`` and its 95 % bootstrap CI over items.

    Example:
        >>> bootstrap_ci(np.array([1., 0., 1., 1.]), np.ones(4))[0]
        0.75
    """
    n = len(num)
    if n == 0:
        return math.nan, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(B, n))
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    return float(num.sum() / den.sum()), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar) p-value of ``wins`` vs ``losses`` discordant items.

    Example:
        >>> round(sign_test(9, 1), 4)
        0.0215
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (step-down, monotone, capped at 1).

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_vs(run: dict, base: dict, metric: str, seed: int = 0) -> dict:
    """``run`` minus ``base`` on ``metric`` over the items both have: mean, 95 % CI, wins, losses, p.

    Example:
        >>> paired_vs(agd_run, greedy_run, "prompt_strict")["delta"]
    """
    a = {r["id"]: item_values(r, metric) for r in run["records"]}
    b = {r["id"]: item_values(r, metric) for r in base["records"]}
    ids = sorted(set(a) & set(b))
    if not ids:
        return {"n": 0}
    d = np.array([a[i][0] / a[i][1] - b[i][0] / b[i][1] for i in ids])
    delta, lo, hi = _bootstrap_mean(d, seed)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return {"n": len(ids), "delta": delta, "lo": lo, "hi": hi, "wins": wins, "losses": losses,
            "p": sign_test(wins, losses)}


def _bootstrap_mean(d: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences ``d`` and its 95 % bootstrap CI over items."""
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(B, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _rate(run: dict, metric: str) -> tuple[float, float, float]:
    vals = np.array([item_values(r, metric) for r in run["records"]]).reshape(-1, 2)
    return bootstrap_ci(vals[:, 0], vals[:, 1])


def _group_key(run: dict) -> tuple[str, str, str]:
    """Runs compared in one table: the same task, data, model and dtype (fp32 runs keep the plain name)."""
    s = run["settings"]
    dtype = s.get("dtype")
    return s["task"], s["data"]["name"], (s["model"].get("model_type", "") + ":" + s["model"]["fingerprint"][:8]
                                          + ("" if dtype in (None, "float32", "fp32") else f":{dtype}"))


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(task: str, runs: list[dict]) -> tuple[str, list[dict]]:
    base = next((r for r in runs if r["settings"]["method"] == BASELINE), None)
    primary, rows = PRIMARY[task], []
    head = ["method", "n"] + METRICS[task] + [f"Δ {primary} vs greedy", "won/lost", "p", "p (Holm)",
                                                "logprob", "repeat4", "words", "guided", "s/item"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    paired = {id(r): paired_vs(r, base, primary) for r in runs if base is not None and r is not base}
    tested = [k for k, pv in paired.items() if pv["n"]]
    adjusted = dict(zip(tested, holm([paired[k]["p"] for k in tested])))
    for run in runs:
        recs = run["records"]
        rates = {m: _rate(run, m) for m in METRICS[task]}
        pv = paired.get(id(run))
        q = {k: np.mean([r["quality"][k] for r in recs if r["quality"].get(k) is not None] or [math.nan])
             for k in QUALITY}
        steps = sum(r["trace"]["steps"] for r in recs)
        guided = sum(r["trace"]["guided"] for r in recs) / steps if steps else math.nan
        t = run.get("timings", {})
        secs = np.mean([t[r["id"]]["generate_s"] for r in recs if "generate_s" in t.get(r["id"], {})] or [math.nan])
        cells = [run["settings"]["method"], f"{len(recs)}" + (f" (+{run['errors']} errors)" if run["errors"] else "")]
        cells += [f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]" for v, lo, hi in rates.values()]
        if pv and pv["n"]:
            cells += [f"{pv['delta']:+.3f} [{pv['lo']:+.3f}, {pv['hi']:+.3f}] (n={pv['n']})",
                      f"{pv['wins']}/{pv['losses']}", _fmt(pv["p"], 3), _fmt(adjusted[id(run)], 3)]
            pv = {**pv, "p_holm": adjusted[id(run)]}
        else:
            cells += ["(baseline)" if run is base else "-", "-", "-", "-"]
        cells += [_fmt(q["logprob"], 2), _fmt(q["repeat4"], 3), _fmt(q["words"], 1), _fmt(guided, 2), _fmt(secs, 2)]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append({"method": run["settings"]["method"], "rates": rates, "paired": pv})
    return "\n".join(lines), rows


def plot_group(task: str, title: str, rows: list[dict], path: str | Path) -> Path:
    """The main metric per method with 95 % CIs, and its paired difference to greedy (one PNG).

    Example:
        >>> plot_group("rules", "rules / rules", rows, "runs/report/rules-rules.png")
    """
    import matplotlib  # optional: pip install 'agdecode[plots]'

    primary = PRIMARY[task]
    names = [r["method"] for r in rows]
    y = np.arange(len(rows))[::-1]
    with matplotlib.rc_context(rc_params()):
        fig = new_figure(figsize=(9, 0.45 * len(rows) + 1.6))
        ax1, ax2 = fig.subplots(1, 2, sharey=True)
        for i, (yi, r) in enumerate(zip(y, rows)):
            # All AGD variants share the house colour: markers tell them apart.
            style = dict(fmt="osD^vPX*"[i % 8], color=method_color(r["method"]), capsize=3)
            v, lo, hi = r["rates"][primary]
            ax1.errorbar(v, yi, xerr=[[v - lo], [hi - v]], **style)
            p = r["paired"]
            if p and p.get("n"):
                ax2.errorbar(p["delta"], yi, xerr=[[p["delta"] - p["lo"]], [p["hi"] - p["delta"]]], **style)
        ax1.set_yticks(y, names)
        ax1.set_xlabel(f"{primary} (95 % bootstrap CI)")
        ax2.axvline(0, color="0.5", lw=1)
        ax2.set_xlabel(f"Δ {primary} vs greedy, paired (95 % CI)")
        fig.suptitle(title)
        return save_png(fig, path)


def _set_name(task: str, data: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", f"{task}-{data}")


def _groups(runs: list[dict]) -> dict[str, tuple[tuple, list[dict]]]:
    """Runs by table: ``<task>-<data>`` names, with the model appended where a set ran on several
    models and the dtype where it is not fp32 (``rules-rules-bfloat16``)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    models: dict[tuple, set] = {}
    for task, data, model in groups:
        models.setdefault((task, data), set()).add(":".join(model.split(":")[:2]))
    named = {}
    for key, group in sorted(groups.items()):
        task, data, model = key
        name = _set_name(task, data)
        if len(models[(task, data)]) > 1:
            name += "-" + ":".join(model.split(":")[:2]).replace(":", "-")
        if model.count(":") > 1:
            name += "-" + model.rsplit(":", 1)[1]
        group.sort(key=lambda r: (r["settings"]["method"] != BASELINE, r["settings"]["method"]))
        named[name] = (key, group)
    return named


# The planned head-to-head comparisons (beside each method vs greedy): the paper's ablations (AttnLRP vs
# Input x Gradient, AGD vs its gate) and the project's variant against AGD_e. A table NAME-pairs lists
# those whose two methods ran on the set, Holm-adjusted over its primary-metric tests.
PAIRS = [("agd", "agd-ixg"), ("agd-gated", "agd-ixg-gated"), ("agd", "agd-gated"),
         ("agd-gated-rel0.25", "agd-gated"), ("agd@heads:in-context", "agd"), ("agd", "cad"), ("agd", "dola"),
         ("agd@heads:parametric", "dola"), ("agd-gated@heads:parametric", "dola")]


def _paired_mean(a: dict, b: dict, seed: int = 0) -> tuple[int, float, float, float]:
    """(n, mean of a - b, 95 % bootstrap CI) over the ids both have."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return 0, math.nan, math.nan, math.nan
    return (len(ids), *_bootstrap_mean(np.array([a[i] - b[i] for i in ids]), seed))


def _pairs_table(task: str, runs: list[dict]) -> str | None:
    by = {r["settings"]["method"]: r for r in runs}
    pairs = [(x, y) for x, y in PAIRS if x in by and y in by]
    if not pairs:
        return None
    primary = PRIMARY[task]
    metrics = [primary] + (["inst_strict"] if task == "rules" else [])
    tested = [t for t in ((x, y, m, paired_vs(by[x], by[y], m)) for x, y in pairs for m in metrics) if t[3]["n"]]
    if not tested:
        return None
    adjusted = holm([t[3]["p"] for t in tested if t[2] == primary])
    lines = ["| comparison | metric | n | Δ [95 % CI] | won/lost | p | p (Holm) | Δ logprob [95 % CI] |",
             "|---|---|---|---|---|---|---|---|"]
    k = 0
    for x, y, m, pv in tested:
        holm_p = "-"
        if m == primary:
            holm_p, k = f"{adjusted[k]:.3f}", k + 1
        lp = {n: {r["id"]: r["quality"]["logprob"] for r in by[n]["records"]
                  if r["quality"].get("logprob") is not None} for n in (x, y)}
        n, d, lo, hi = _paired_mean(lp[x], lp[y])
        lines.append(f"| {x} - {y} | {m} | {pv['n']} | {pv['delta']:+.3f} [{pv['lo']:+.3f}, {pv['hi']:+.3f}] | "
                     f"{pv['wins']}/{pv['losses']} | {pv['p']:.3f} | {holm_p} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


def markdown_tables(paths: list[str | Path]) -> dict[str, str]:
    """One markdown table per task x data set (x model) of the runs under ``paths``, by table name.

    Names are ``<task>-<data>`` (e.g. ``rules-rules``, ``qa-nq-open-book``): the names of the
    ``<!-- table:NAME -->`` markers :func:`update_doc` fills.

    Example:
        >>> print(markdown_tables(["docs/results"])["rules-rules"])
        | method | n | prompt_strict | ...
    """
    tables = {}
    for name, (key, group) in _groups(load_runs(paths)).items():
        tables[name] = _table(key[0], group)[0]
        pairs = _pairs_table(key[0], group)
        if pairs is not None:
            tables[f"{name}-pairs"] = pairs
    return tables


def marked_blocks(text: str) -> dict[str, str]:
    """The tables between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in ``text``, by name.

    Example:
        >>> marked_blocks("<!-- table:a -->\n| x |\n<!-- /table:a -->")
        {'a': '| x |'}
    """
    return {m["name"]: m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0].strip("\n") for m in _MARKER.finditer(text)}


def update_doc(doc: str | Path, paths: list[str | Path], check: bool = False) -> list[str]:
    """Rewrite every marked table of ``doc`` from the runs under ``paths``; return the names of those that changed.

    A marker whose table the runs do not make is an error (the document would keep numbers no
    record backs). With ``check`` nothing is written: the changed names say whether the doc is stale.

    Example:
        >>> update_doc("docs/results.md", ["docs/results"])
        []
    """
    doc = Path(doc)
    try:
        text = doc.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{doc}: cannot read it as a UTF-8 markdown file ({type(e).__name__}: "
                          f"{getattr(e, 'strerror', None) or getattr(e, 'reason', '')})") from None
    tables = markdown_tables(paths)
    old = marked_blocks(text)
    if not old:
        raise ReportError(f"{doc} has no table markers (<!-- table:NAME --> ... <!-- /table:NAME -->); "
                          f"tables available: {', '.join(tables)}")
    missing = sorted(set(old) - set(tables))
    if missing:
        raise ReportError(f"{doc}: no runs for the marked table(s) {', '.join(missing)} under "
                          f"{', '.join(map(str, paths))} (tables available: {', '.join(tables) or 'none'})")
    changed = [name for name in old if old[name] != tables[name]]
    if changed and not check:
        new = _MARKER.sub(lambda m: f"<!-- table:{m['name']} -->\n{tables[m['name']]}\n<!-- /table:{m['name']} -->",
                          text)
        doc.write_text(new, encoding="utf-8")
    return changed


def _gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no file name: the same records always compress to the same bytes (no churn in git).
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, default=float) + "\n" for r in rows).encode("utf-8")


def archive_runs(paths: list[str | Path], dest: str | Path) -> list[Path]:
    """Copy the runs under ``paths`` to ``dest/<task>-<data>/<method>/`` in committable form.

    Each run becomes ``run.json`` (as written), ``records.jsonl.gz`` (one record per item, sorted
    by id) and ``timings.jsonl.gz``; gzip is written without a time stamp, so archiving the same
    records twice gives the same bytes. Existing archives of the same runs are replaced.

    Example:
        >>> archive_runs(["runs/results/rules"], "docs/results")
        [PosixPath('docs/results/rules-rules/greedy'), ...]
    """
    if Path(dest).exists() and not Path(dest).is_dir():
        raise ReportError(f"--to {dest} is a file, not a folder: archives go into a folder (e.g. docs/results)")
    out = []
    for run in load_runs(paths):
        s = run["settings"]
        folder = Path(dest) / _set_name(s["task"], s["data"]["name"]) / s["method"].replace("/", "_")
        src = Path(run["dir"])
        if folder.resolve() == src.resolve():
            raise ReportError(f"{src} is already an archive; archive run directories into another folder")
        records = sorted(_first_per_id(_read_jsonl(src, "records.jsonl")), key=lambda r: str(r["id"]))
        timings = sorted(run["timings"].values(), key=lambda t: str(t["id"]))
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "run.json", folder / "run.json")
        for name, rows in (("records.jsonl.gz", records), ("timings.jsonl.gz", timings)):
            (folder / name).write_bytes(_gzip_bytes(_jsonl(rows)))
        out.append(folder)
    return out


def build_report(paths: list[str | Path], out_dir: str | Path | None = None, plots: bool = True) -> str:
    """Markdown tables (one per task x data set x model) for the runs under ``paths``; PNGs into ``out_dir``.

    Example:
        >>> print(build_report(["runs/pilot"], "runs/pilot"))
    """
    out = Path(out_dir or paths[0])
    parts = []
    for (task, data, model), group in _groups(load_runs(paths)).values():
        table, rows = _table(task, group)
        s = group[0]["settings"]
        dtype = s.get("dtype")
        title = (f"{task} / {data} ({s['model']['model_type']}, {Path(s['model']['name_or_path']).name or '?'}"
                 + ("" if dtype in (None, "float32", "fp32") else f", {dtype}") + ")")
        gen = {r["settings"]["method"]: r["settings"]["generate"] for r in group}
        parts.append(f"## {title}\n\n{table}\n")
        if plots:
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task}-{data}-{model}") + ".png"
            png = plot_group(task, title, rows, out / name)
            parts.append(f"![{title}]({png.name})\n")
        settings = json.dumps(gen, indent=1)
        parts.append(f"<details><summary>settings</summary>\n\n```json\n{settings}\n```\n</details>\n")
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text
