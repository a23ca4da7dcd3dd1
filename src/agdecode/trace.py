"""The result of a generation: text, token ids and a per-step trace, saveable as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .provenance import provenance

__all__ = ["Candidate", "Step", "GenerationResult"]


@dataclass
class Candidate:
    """One candidate token at one step: its probability and, if attribution ran, its ROI score(s)."""

    token_id: int
    token: str
    prob: float
    scores: dict[str, float] | None = None  # ROI name -> signed ROI relevance of the logit


@dataclass
class Step:
    """What the decoder saw and did at one generation step.

    ``reason`` is why the token was chosen: ``"attribution"`` (AGD picked the best ROI score),
    ``"gate"`` (entropy below the threshold: greedy), ``"single"`` (one candidate passed
    ``min_prob``), ``"no-candidate"`` (none did: greedy) or ``"greedy"`` (method greedy). For the
    baselines it is the method's name (``"cad"``, ``"dola"``, ``"steer"``, ``"sample"``): then
    ``entropy``, ``candidates`` and ``greedy_id`` describe the method's own distribution, and ``info``
    what the method computed at this step (e.g. DoLa's premature layer, CAD's and DoLa's
    ``model_top``: the plain model's top token).
    """

    index: int
    entropy: float
    reason: str
    greedy_id: int
    chosen_id: int
    candidates: list[Candidate]
    info: dict | None = None

    @property
    def overridden(self) -> bool:
        """True where AGD emitted another token than greedy would have."""
        return self.chosen_id != self.greedy_id

    @property
    def gated(self) -> bool:
        return self.reason == "gate"


@dataclass
class GenerationResult:
    """Generated text, token ids, the rendered prompt and the per-step trace.

    Example:
        >>> result = agdecode.generate(model, tok, messages)
        >>> result.text, result.overrides
        >>> result.save("trace.json"); GenerationResult.load("trace.json")
    """

    text: str
    token_ids: list[int]
    tokens: list[str]
    prompt: str
    prompt_ids: list[int]
    roi_positions: dict[str, list[int]]
    steps: list[Step]
    config: dict
    model: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # Text of each prompt token, for reports (traces written before this field load with []).
    prompt_tokens: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> list[int]:
        """Indices of the steps where the emitted token differs from the greedy one."""
        return [s.index for s in self.steps if s.overridden]

    @property
    def guided_steps(self) -> int:
        """Steps on which attribution actually ran."""
        return sum(s.reason == "attribution" for s in self.steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, step in zip(d["steps"], self.steps):
            s["overridden"] = step.overridden
        return d

    def save(self, path: str | Path) -> Path:
        """Write this result as JSON (with the code, packages and machine behind it: ``extra["provenance"]``).

        Example:
            >>> result.save("trace.json"); GenerationResult.load("trace.json").text == result.text
            True
        """
        path = Path(path)
        d = self.to_dict()
        d["extra"] = {**d["extra"], "provenance": d["extra"].get("provenance") or provenance()}
        path.write_text(json.dumps(d, ensure_ascii=False, indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationResult":
        d = dict(d)
        d["steps"] = [
            Step(**{k: v for k, v in s.items() if k != "overridden" and k != "candidates"},
                 candidates=[Candidate(**c) for c in s["candidates"]])
            for s in d["steps"]
        ]
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "GenerationResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_html(self, title: str | None = None) -> str:
        """This result as one self-contained interactive HTML page (see ``agdecode.report.html``).

        Example:
            >>> Path("report.html").write_text(result.to_html())
        """
        return report_html.render_html(self, title=title)

    def show(self, title: str | None = None) -> Path | None:
        """Show the HTML report inline in Jupyter, or write it to a temporary file and print its path.

        Example:
            >>> result.show()
        """
        return report_html.show(self, title=title)


# Last, as a module: the report renders GenerationResult, so report.html imports it from here; by
# now it is defined, whichever of the two modules is imported first.
from .report import html as report_html  # noqa: E402
