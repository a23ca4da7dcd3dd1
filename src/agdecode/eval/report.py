"""``agd eval report``: one markdown table and one PNG per task and data set, from run directories.

Every rate comes with a 95 % bootstrap confidence interval over items (percentile method, 2,000
resamples, seeded); instruction-level rule accuracy resamples items, not instructions. Each method
is also compared with greedy on the items both ran: the mean paired difference of the main metric
with its bootstrap CI, the items it wins and loses, and an exact sign-test p-value on those.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .records import METRICS, QUALITY, RunStore, item_values

__all__ = ["load_runs", "build_report", "bootstrap_ci", "paired_vs", "sign_test"]

PRIMARY = {"rules": "prompt_strict", "qa": "recall"}
B = 2000


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Every run (a folder with ``run.json``) under ``paths``, with its settings and records.

    Example:
        >>> runs = load_runs(["runs/pilot"]); runs[0]["settings"]["method"]
        'greedy'
    """
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"No such run directory: {p}")
        for run_file in sorted([p / "run.json"] if (p / "run.json").is_file() else p.rglob("run.json")):
            store = RunStore(run_file.parent)
            found.append({"dir": str(run_file.parent), "settings": store.settings(),
                          "records": [r for r in store.records() if not r.get("error")],
                          "timings": store.timings(),
                          "errors": sum(bool(r.get("error")) for r in store.records())})
    if not found:
        raise FileNotFoundError(f"No run (run.json) under {', '.join(map(str, paths))}.")
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
    idx = np.random.default_rng(seed).integers(0, len(d), size=(B, len(d)))
    means = d[idx].mean(1)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return {"n": len(ids), "delta": float(d.mean()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "wins": wins, "losses": losses, "p": sign_test(wins, losses)}


def _rate(run: dict, metric: str) -> tuple[float, float, float]:
    vals = np.array([item_values(r, metric) for r in run["records"]]).reshape(-1, 2)
    return bootstrap_ci(vals[:, 0], vals[:, 1])


def _group_key(run: dict) -> tuple[str, str, str]:
    s = run["settings"]
    return s["task"], s["data"]["name"], s["model"].get("model_type", "") + ":" + s["model"]["fingerprint"][:8]


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(task: str, runs: list[dict]) -> tuple[str, list[dict]]:
    base = next((r for r in runs if r["settings"]["method"] == "greedy"), None)
    primary, rows = PRIMARY[task], []
    head = ["method", "n"] + METRICS[task] + [f"Δ {primary} vs greedy", "won/lost", "p",
                                                "logprob", "repeat4", "words", "guided", "s/item"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        recs = run["records"]
        rates = {m: _rate(run, m) for m in METRICS[task]}
        pv = paired_vs(run, base, primary) if base is not None and run is not base else None
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
                      f"{pv['wins']}/{pv['losses']}", _fmt(pv["p"], 3)]
        else:
            cells += ["(baseline)" if run is base else "-", "-", "-"]
        cells += [_fmt(q["logprob"], 2), _fmt(q["repeat4"], 3), _fmt(q["words"], 1), _fmt(guided, 2), _fmt(secs, 2)]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append({"method": run["settings"]["method"], "rates": rates, "paired": pv})
    return "\n".join(lines), rows


def plot_group(task: str, title: str, rows: list[dict], path: str | Path) -> Path:
    """The main metric per method with 95 % CIs, and its paired difference to greedy (one PNG).

    Example:
        >>> plot_group("rules", "rules / rules", rows, "runs/report/rules-rules.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:  # the shared house style, where present
        from ..report.style import method_color, rc_params, save_png
    except ImportError:  # pragma: no cover - style module not installed
        rc_params, method_color = (lambda: {}), (lambda name: None)

        def save_png(fig, p):
            fig.savefig(p, format="png", bbox_inches="tight")
            plt.close(fig)
            return Path(p)
    primary = PRIMARY[task]
    names = [r["method"] for r in rows]
    y = np.arange(len(rows))[::-1]
    with plt.rc_context(rc_params()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.45 * len(rows) + 1.6), sharey=True)
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


def build_report(paths: list[str | Path], out_dir: str | Path | None = None, plots: bool = True) -> str:
    """Markdown tables (one per task x data set x model) for the runs under ``paths``; PNGs into ``out_dir``.

    Example:
        >>> print(build_report(["runs/pilot"], "runs/pilot"))
    """
    runs = load_runs(paths)
    out = Path(out_dir or paths[0])
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    parts = []
    for (task, data, model), group in sorted(groups.items()):
        group.sort(key=lambda r: (r["settings"]["method"] != "greedy", r["settings"]["method"]))
        table, rows = _table(task, group)
        s = group[0]["settings"]
        title = f"{task} / {data} ({s['model']['model_type']}, {Path(s['model']['name_or_path']).name or '?'})"
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
