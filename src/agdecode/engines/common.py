"""What every engine shares: the attribution context (AttnLRP rules or plain I x G) and frozen parameters."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..adapters import attnlrp
from ..errors import AgdError

__all__ = ["ATTRIBUTIONS", "rules_for", "frozen"]

ATTRIBUTIONS = ("lrp", "ixg")


def rules_for(model: nn.Module, attribution: str, attention: str | None = None):
    """The context in which gradients are attributions: AttnLRP rules, or plain autograd for I x G."""
    if attribution == "lrp":
        return attnlrp(model, attention=attention)
    if attribution == "ixg":
        return contextlib.nullcontext(model)
    raise AgdError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients (saves the activations they would need); flags restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
