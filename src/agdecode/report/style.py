"""One look for every report: the colours of the HTML page, the terminal and matplotlib plots.

Everything that draws AGD results (``agd report``, ``agd eval report``, notebooks) takes its colours
from here, so that "AGD", "greedy", "overridden" and relevance signs mean the same colour everywhere.
matplotlib is imported only inside the functions that need it (it is an optional dependency).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PALETTE", "SERIES", "FONT_STACK", "method_color", "css_variables", "rc_params", "apply_style",
           "relevance_cmap", "save_png"]

PALETTE: dict[str, str] = {
    "agd": "#6741d9",        # AGD's own series and marks
    "greedy": "#868e96",     # the greedy baseline
    "override": "#ffd43b",   # background of tokens where AGD overrode greedy
    "roi": "#2b8a3e",        # outline of the region of interest
    "positive": "#d62728",   # relevance > 0 (supports the token)
    "negative": "#1f77b4",   # relevance < 0
    "gate": "#adb5bd",       # steps the entropy gate sent to greedy
    "threshold": "#c92a2a",  # the entropy threshold line
    "text": "#212529",
    "muted": "#6c757d",
    "background": "#ffffff",
    "panel": "#f8f9fa",
    "grid": "#dee2e6",
}

# Further series (other methods, models, ROIs), colour-blind safe (Okabe-Ito), after AGD and greedy.
SERIES: list[str] = [PALETTE["agd"], PALETTE["greedy"], "#e69f00", "#009e73", "#56b4e9", "#d55e00",
                     "#cc79a7", "#0072b2"]

FONT_STACK = "system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', 'Noto Sans', sans-serif"

# Rich styles of the terminal rendering, named like the palette keys.
RICH: dict[str, str] = {
    "override": "bold black on yellow",
    "gate": "dim",
    "agd": "bold magenta",
    "greedy": "bold",
    "positive": "red",
    "negative": "blue",
}


def method_color(name: str) -> str:
    """The colour of a decoding method or series name; unknown names get a stable colour of ``SERIES``.

    Example:
        >>> method_color("agd"), method_color("greedy")
        ('#6741d9', '#868e96')
    """
    key = name.lower()
    if key.startswith("agd"):
        return PALETTE["agd"]
    if key == "greedy":
        return PALETTE["greedy"]
    return SERIES[2 + sum(map(ord, key)) % (len(SERIES) - 2)]


def css_variables() -> str:
    """The palette as CSS custom properties (``--agd-override`` ...), for HTML pages.

    Example:
        >>> css_variables().startswith(":root {")
        True
    """
    body = "".join(f"--agd-{k}: {v}; " for k, v in PALETTE.items())
    return f":root {{ {body}--agd-font: {FONT_STACK}; }}"


def rc_params() -> dict[str, Any]:
    """matplotlib settings of the house style; use with ``matplotlib.rc_context(rc_params())`` to keep them local.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> with plt.rc_context(rc_params()):
        ...     fig, ax = plt.subplots()
    """
    from cycler import cycler  # optional: comes with matplotlib (pip install 'agdecode[plots]')

    return {
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "figure.facecolor": PALETTE["background"],
        "axes.facecolor": PALETTE["background"],
        "axes.edgecolor": PALETTE["muted"],
        "axes.labelcolor": PALETTE["text"],
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.labelsize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "axes.axisbelow": True,
        "axes.prop_cycle": cycler(color=SERIES),
        "grid.color": PALETTE["grid"],
        "grid.linewidth": 0.6,
        "xtick.color": PALETTE["muted"],
        "ytick.color": PALETTE["muted"],
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "legend.frameon": False,
        "legend.fontsize": 9,
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Noto Sans", "Arial"],
        "text.color": PALETTE["text"],
        "lines.linewidth": 1.8,
    }


def apply_style() -> None:
    """Make the house style matplotlib's default for this process (headless-safe: no GUI backend needed).

    Example:
        >>> from agdecode.report.style import apply_style, method_color
        >>> apply_style()
        >>> plt.bar(["greedy", "AGD"], [0.41, 0.63], color=[method_color("greedy"), method_color("agd")])
    """
    import matplotlib  # optional: pip install 'agdecode[plots]'

    matplotlib.rcParams.update(rc_params())


def relevance_cmap():
    """Diverging colormap for relevance: negative blue, zero white, positive red (as the HTML heatmap).

    Example:
        >>> ax.imshow(rel, cmap=relevance_cmap(), vmin=-m, vmax=m)
    """
    from matplotlib.colors import LinearSegmentedColormap  # optional: pip install 'agdecode[plots]'

    return LinearSegmentedColormap.from_list(
        "agd_relevance", [PALETTE["negative"], PALETTE["background"], PALETTE["positive"]])


def save_png(fig, path: str | Path) -> Path:
    """Save a figure as PNG in the house resolution and close it (batch scripts leak figures otherwise).

    Example:
        >>> save_png(fig, "runs/eval/accuracy.png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: release it there too
        import matplotlib.pyplot as plt  # optional (plots extra); only for a figure pyplot made

        plt.close(fig)
    return path


def new_figure(**kwargs):
    """A matplotlib ``Figure`` outside pyplot: no backend is chosen or changed (library code must not
    call ``matplotlib.use``), and nothing is kept alive after saving.

    Example:
        >>> fig = new_figure(figsize=(4, 3)); ax = fig.subplots(); save_png(fig, "plot.png")
    """
    from matplotlib.figure import Figure  # optional: pip install 'agdecode[plots]'

    return Figure(**kwargs)
