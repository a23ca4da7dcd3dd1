"""Terminal rendering with rich: greedy and AGD side by side, overridden tokens marked."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..trace import GenerationResult
from .style import RICH

__all__ = ["marked_text", "overrides_table", "print_comparison", "print_result"]


def marked_text(result: GenerationResult) -> Text:
    """The generated text with overridden tokens highlighted (and bracketed, for plain terminals).

    Tokens the entropy gate sent to greedy are dimmed.

    Example:
        >>> Console().print(marked_text(result))
    """
    text = Text()
    for step, tok in zip(result.steps, result.tokens):
        if step.overridden:
            text.append(f"[{tok}]", style=RICH["override"])
        else:
            text.append(tok, style=RICH["gate"] if step.gated else "")
    return text


def _cand(step, token_id: int) -> str:
    for c in step.candidates:
        if c.token_id == token_id:
            score = f", ROI {next(iter(c.scores.values())):+.3f}" if c.scores else ""
            return f"{c.token!r} p={c.prob:.3f}{score}"
    return f"id {token_id}"


def overrides_table(result: GenerationResult) -> Table | None:
    """One row per overridden step: its entropy against the gate, greedy's token and AGD's, with ROI scores.

    Example:
        >>> Console().print(overrides_table(result))
    """
    steps = [s for s in result.steps if s.overridden]
    if not steps:
        return None
    gate = result.config.get("entropy_threshold")
    table = Table(title="where AGD overrode greedy", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step", justify="right")
    table.add_column("entropy" if gate is None else f"entropy (gate {gate})", justify="right")
    table.add_column("greedy would emit")
    table.add_column("AGD emitted", style=RICH["agd"])
    for s in steps:
        table.add_row(str(s.index), f"{s.entropy:.2f}", _cand(s, s.greedy_id), _cand(s, s.chosen_id))
    return table


def _summary(result: GenerationResult) -> str:
    n = len(result.steps)
    gated = sum(s.gated for s in result.steps)
    dtype = result.extra.get("dtype") if isinstance(result.extra, dict) else None
    return (f"{n} tokens, {result.guided_steps} attributed, " + (f"{gated} gated, " if gated else "")
            + f"{len(result.overrides)} overridden, {result.seconds:.1f} s ({n / max(result.seconds, 1e-9):.1f} tok/s)"
            + (f", {dtype}" if dtype else ""))


def print_comparison(messages, greedy: GenerationResult, agd: GenerationResult, console: Console | None = None) -> None:
    """Print greedy and AGD answers side by side; tokens where AGD overrode greedy are [marked].

    Example:
        >>> both = agdecode.compare(model, tok, messages)
        >>> print_comparison(messages, both["greedy"], both["agd"])
    """
    console = console or Console()
    for m in messages:
        console.print(Text(f"{m['role']}: ", style="bold") + Text(m["content"]))
    cfg = agd.config
    table = Table(show_lines=True, expand=True)
    table.add_column("greedy", ratio=1)
    table.add_column(f"AGD ({cfg['attribution']}, ROI {', '.join(cfg['roi'])}, k={cfg['k']}, "
                     f"min_prob={cfg['min_prob']}, gate={cfg['entropy_threshold']})", ratio=1)
    table.add_row(Text(greedy.text), marked_text(agd))
    table.add_row(_summary(greedy), _summary(agd))
    console.print(table)
    console.print("[bracketed/highlighted] tokens: AGD chose differently from greedy at that step"
                  + ("; dimmed: the entropy gate kept greedy." if cfg.get("entropy_threshold") is not None else "."),
                  markup=False)
    details = overrides_table(agd)
    if details is not None:
        console.print(details)


def print_result(result: GenerationResult, console: Console | None = None) -> None:
    """Print one result with its overridden tokens marked, then where and why AGD overrode greedy.

    Example:
        >>> print_result(agdecode.generate(model, tok, messages))
    """
    console = console or Console()
    console.print(marked_text(result))
    console.print(_summary(result), style="dim")
    details = overrides_table(result)
    if details is not None:
        console.print(details)
