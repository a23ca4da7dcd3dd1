"""The policies that pick each row's next token, in order: each decides the rows still undecided.

A decoding method (:mod:`agdecode.methods`) is a chain of them over its source's logits: greedy;
AGD's entropy gate then attribution choice; sampling. A policy sees the step's :class:`View` and
fills in the :class:`Choice`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .baselines.sampling import Sampler
from .sources import Source

__all__ = ["View", "Choice", "Greedy", "EntropyGate", "AttributionChoice", "Sample"]


@dataclass
class View:
    """What the policies see of one step: the processed next-token distribution of every live row."""

    logits: torch.Tensor    # (B, V) after the logits processors
    top_p: torch.Tensor     # (B, k) probabilities of the top-k tokens, descending
    top_i: torch.Tensor     # (B, k) their ids
    entropy: torch.Tensor   # (B,) nats
    jobs: list              # the live jobs, in row order


@dataclass
class Choice:
    """The next token of every live row, filled in by the policies."""

    chosen: torch.Tensor                      # (B,) token ids, -1 = undecided
    reasons: list[str | None]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> ROI scores (R, n_candidates)
    info: dict[int, dict] = field(default_factory=dict)            # row -> what a policy computed

    def undecided(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]

    def set(self, rows: list[int], tokens: torch.Tensor, reason: str) -> None:
        for i, t in zip(rows, tokens.reshape(-1).tolist()):
            self.chosen[i], self.reasons[i] = t, reason


class Greedy:
    """The most probable token (of the model, or of a baseline's scores: then ``reason`` is its name)."""

    def __init__(self, reason: str = "greedy"):
        self.reason = reason

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = choice.undecided()
        choice.set(rows, v.top_i[rows, 0], self.reason)


class EntropyGate:
    """AGD_e: below ``threshold`` nats the model is sure enough; emit its greedy token."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = [i for i in choice.undecided() if v.entropy[i] < self.threshold]
        choice.set(rows, v.top_i[rows, 0], "gate")


class AttributionChoice:
    """The candidate (top-k, p >= min_prob) whose logit depends most on the first ROI.

    ``min_prob_ratio`` (the project's own variant, not the paper's) also asks p >= ratio x p(top
    token): a floor relative to the step's best token, so a sure step offers fewer, closer
    candidates and an unsure one more."""

    def __init__(self, min_prob: float, min_prob_ratio: float = 0.0):
        self.min_prob, self.ratio = min_prob, min_prob_ratio

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        rows = choice.undecided()
        floor = (self.ratio * v.top_p[rows, :1]).clamp_min(self.min_prob)             # (n, 1)
        n = dict(zip(rows, (v.top_p[rows] >= floor).sum(1).tolist()))  # candidates: a prefix of top-k
        for reason, few in (("no-candidate", 0), ("single", 1)):
            these = [i for i in rows if n[i] == few]
            choice.set(these, v.top_i[these, 0], reason)
        guided = [i for i in rows if n[i] > 1]
        if not guided:
            return
        scores = src.scores(v.top_i[guided], torch.tensor(guided)).float().cpu()    # (n, R, k)
        for i, s in zip(guided, scores):
            s = s[:, : n[i]]
            # Candidates are sorted by probability and argmax returns the first maximum: ties go
            # to the more probable token.
            best = int(s[0].argmax())
            choice.chosen[i], choice.reasons[i], choice.scores[i] = int(v.top_i[i, best]), "attribution", s


class Sample:
    """Temperature + top-p sampling, one seeded generator per job (a job samples as it would alone)."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.settings = (temperature, top_p, seed)

    def __call__(self, v: View, choice: Choice, src: Source) -> None:
        for i in choice.undecided():
            job = v.jobs[i]
            if job.sampler is None:  # the generator lives with its job: a new job starts from the seed
                own = job.config  # a job's own settings (a server's request) come before the decoder's
                job.sampler = Sampler(*((own.temperature, own.top_p, own.seed) if own is not None else self.settings))
            sampler = job.sampler
            choice.chosen[i], choice.reasons[i] = sampler(v.logits[i]), "sample"
            choice.info[i] = sampler.info()
