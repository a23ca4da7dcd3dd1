"""Attribution engines: how ROI scores are computed. The decoding loop only sees this protocol.

An engine is a :class:`~agdecode.sources.Source` (the protocol baselines share): it follows a batch
of sequences as they grow, inside a ``with engine:`` block (the forward engines hold module
overrides for its duration). ``prefill`` and ``step`` return the next-token logits; ``scores``
returns, for the current position, the signed ROI relevance of each candidate's pre-softmax logit.
Three engines implement it:

- :class:`~agdecode.engines.reverse.ReverseEngine`: one forward with gradients over the whole
  sequence, then one batched backward for the candidates (the paper's method; the oracle; gives
  per-token relevance maps).
- :class:`~agdecode.engines.forward.ForwardEngine` (default): forward mode with primal and
  tangents stacked in one batch, through the KV cache; one pass per token gives the score of every
  vocabulary token.
- :class:`~agdecode.engines.forward_ad.ForwardADEngine`: the same with ``torch.autograd.forward_ad``
  and the rules' ``jvp``; exact and slow, a cross-check.
"""
from __future__ import annotations


from torch import nn

from ..adapters import check_plain_weights
from ..errors import AgdError
from .common import ATTRIBUTIONS, frozen, rules_for  # noqa: F401 (re-exported)
from .forward import ForwardEngine
from .forward_ad import ForwardADEngine
from .reverse import ReverseEngine
from ..sources import Source

__all__ = ["make_engine", "ENGINES", "ATTRIBUTIONS", "rules_for", "frozen"]

_ENGINES = {"forward": ForwardEngine, "reverse": ReverseEngine, "forward-ad": ForwardADEngine}
ENGINES = tuple(_ENGINES)


def make_engine(name: str, model: nn.Module, n_rois: int = 1, attribution: str = "lrp",
                heads: bool = False) -> Source:
    """Build engine ``name`` for ``model`` scoring ``n_rois`` ROIs per sequence (``heads``: some are
    head ROIs). Each sequence brings its own ROI weights (:class:`~agdecode.sources.Row`).

    Example:
        >>> with make_engine("reverse", model) as eng:
        ...     logits = eng.prefill([Row(ids, token_weights=mask[None])])
        ...     scores = eng.scores(logits.topk(3).indices, torch.tensor([0]))   # (1, 1, 3)
    """
    engines = _ENGINES
    if name not in engines:
        raise AgdError(f"engine must be one of {tuple(engines)}, got {name!r}")
    if attribution not in ATTRIBUTIONS:
        raise AgdError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
    # Every engine differentiates through the LM head (the forward ones read its weight): a packed
    # head is refused here, before it is read. Other layers are checked where a rule reads them.
    head = model.get_output_embeddings()
    check_plain_weights(model, [(n, m) for n, m in model.named_modules() if m is head])
    return engines[name](model, n_rois, attribution, heads)
