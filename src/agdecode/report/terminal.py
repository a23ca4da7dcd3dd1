"""Terminal rendering with rich: greedy and AGD side by side, overridden tokens marked."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..trace import GenerationResult

__all__ = ["marked_text", "print_comparison", "print_result"]


def marked_text(result: GenerationResult) -> Text:
    """The generated text with overridden tokens highlighted (and bracketed, for plain terminals).

    Example:
        >>> Console().print(marked_text(result))
    """
    text = Text()
    for step, tok in zip(result.steps, result.tokens):
        if step.overridden:
            text.append(f"[{tok}]", style="bold black on yellow")
        else:
            text.append(tok)
    return text


def _summary(result: GenerationResult) -> str:
    n = len(result.steps)
    return (f"{n} tokens, {result.guided_steps} attributed, {len(result.overrides)} overridden, "
            f"{result.seconds:.1f} s ({n / max(result.seconds, 1e-9):.1f} tok/s)")


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
    console.print("[bracketed/highlighted] tokens: AGD chose differently from greedy at that step.", markup=False)


def print_result(result: GenerationResult, console: Console | None = None) -> None:
    """Print one result with its overridden tokens marked."""
    console = console or Console()
    console.print(marked_text(result))
    console.print(_summary(result), style="dim")
