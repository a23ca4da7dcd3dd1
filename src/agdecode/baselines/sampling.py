"""Temperature + nucleus (top-p) sampling with a seeded generator: the ``sample`` method.

The warpers are transformers' own (``TemperatureLogitsWarper``, ``TopPLogitsWarper``), so the
distribution is exactly the one ``model.generate(do_sample=True, temperature=..., top_p=...)``
samples from; the draw uses a private CPU ``torch.Generator``, so a seed reproduces a run without
touching the global RNG, on any device.
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

__all__ = ["Sampler"]


class Sampler:
    """Draws the next token from ``softmax(top_p(logits / temperature))``.

    Example:
        >>> sampler = Sampler(temperature=0.7, top_p=0.9, seed=0)
        >>> token = sampler(logits); sampler.info()
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
        self.generator = torch.Generator().manual_seed(seed)
        self._info: dict = {}

    def __call__(self, logits: torch.Tensor) -> int:
        scores = logits.float()[None]
        for warp in self.warpers:
            scores = warp(None, scores)  # neither warper reads input_ids
        probs = torch.softmax(scores[0], dim=-1).cpu()  # drawn on the CPU: same tokens on every device
        token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._info = {"p_sampled": float(probs[token]), "nucleus_size": int((probs > 0).sum())}
        return token

    def info(self) -> dict:
        """The probability of the drawn token after warping, and how many tokens the nucleus kept."""
        return dict(self._info)

    def describe(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
