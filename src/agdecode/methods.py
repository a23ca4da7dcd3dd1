"""Decoding methods as registered objects: what a method is, in one place.

A :class:`DecodingMethod` owns everything that differs between methods: its settings check, where
its next-token logits come from (a :class:`~agdecode.sources.Source`: an attribution engine or a
baseline), what it needs of each conversation (a :class:`~agdecode.sources.Row`) and the chain of
policies that picks each row's token. The decoding loop, the CLI, the server, ``agd eval`` and
``agdecode.hf`` ask the registry (:func:`get_method`) and never compare method names, the way
transformers dispatches its generation modes and lm-eval registers its models.

==========  ====================================================================  ===================
method      next token                                                            source
==========  ====================================================================  ===================
``greedy``  argmax of the model's logits                                          ``CachedForward``
``agd``     AGD: entropy gate (optional), then the candidate whose logit depends  an attribution
            most on the ROI (signed relevance)                                    engine
``sample``  temperature + top-p, a seeded generator per sequence                  ``CachedForward``
``cad``     argmax of ``(1 + a) * logits(prompt) - a * logits(prompt without ROI)``  ``CADSource``
``dola``    argmax of DoLa's layer-contrast scores                                ``DoLaSource``
``steer``   argmax of the logits with a steering vector added at one layer        ``SteeringSource``
==========  ====================================================================  ===================

**Adding a method** is one class and one registration (README, "Adding a method")::

    class Lowest(DecodingMethod):                 # a toy: the least likely of the top-k
        name = "lowest"
        def policies(self, cfg):
            return [LowestOfTopK()]

    register_method(Lowest())

Installed packages register theirs through the entry-point group ``agdecode.methods`` (the value
names a :class:`DecodingMethod` subclass or instance), loaded at the first lookup.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import nn

from .baselines.cad import CADSource, context_free_prompt
from .baselines.dola import DoLaSource
from .baselines.steering import SteeringSource, as_steering_vector
from .engines import make_engine
from .errors import MethodError
from .policies import AttributionChoice, EntropyGate, Greedy, Sample
from .prompt import Prompt
from .roi import Region
from .sources import CachedForward, Row, Source

__all__ = ["DecodingMethod", "register_method", "get_method", "method_names", "MethodError", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "agdecode.methods"


class DecodingMethod:
    """One decoding method. Subclass it, set ``name``, override what differs, :func:`register_method` it.

    Class attributes say what the rest of the package needs to know without asking the name:
    ``guided`` (tokens chosen by attribution over ROI regions: the job builder resolves the ROIs
    against each prompt and the source is an attribution engine), ``uses_roi`` (the method reads
    ``roi``: the CLI insists on one), ``stochastic`` (it draws random numbers: ``agd eval`` seeds it
    per item, the server lets ``temperature`` through), ``owns`` (settings no other method reads:
    setting one with another method is refused) and ``repetition_penalty`` (its default when the
    user sets none).

    Example:
        >>> class Lowest(DecodingMethod):
        ...     name = "lowest"
        ...     def policies(self, cfg):
        ...         return [LowestOfTopK()]
        >>> register_method(Lowest())
        >>> agdecode.generate(model, tok, messages, method="lowest")
    """

    name: ClassVar[str] = ""
    about: ClassVar[str] = ""
    guided: ClassVar[bool] = False
    uses_roi: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    owns: ClassVar[tuple[str, ...]] = ()
    repetition_penalty: ClassVar[float | None] = None

    def validate(self, cfg) -> None:
        """Method-specific checks of an :class:`~agdecode.AGDConfig` (raise :class:`~agdecode.AgdError`)."""

    def source(self, cfg, model: nn.Module, n_rois: int, heads: bool) -> Source:
        """Where this method's next-token logits (and scores) come from, for a batch of sequences."""
        return CachedForward(model)

    def row(self, cfg, tokenizer, prompt: Prompt | None, input_ids, regions: list[Region],
            messages: list[dict] | None = None, documents: list[dict] | None = None) -> Row:
        """What the source needs of one sequence (``input_ids`` ``(T,)``, its resolved ``regions``)."""
        return Row(input_ids)

    def policies(self, cfg) -> list:
        """The chain of policies (:mod:`agdecode.policies`) that picks each row's token, in order."""
        return [Greedy(self.name)]

    def __repr__(self) -> str:
        return f"<decoding method {self.name!r}>"


# --- the built-in methods ------------------------------------------------------------------------

class GreedyMethod(DecodingMethod):
    name, about = "greedy", "the most probable token"


class AGDMethod(DecodingMethod):
    name, about = "agd", "Attribution-Guided Decoding (AGD; AGD_e with entropy_threshold)"
    guided = uses_roi = True

    def source(self, cfg, model, n_rois, heads):
        return make_engine(cfg.engine, model, n_rois, cfg.attribution, heads)

    def row(self, cfg, tokenizer, prompt, input_ids, regions, messages=None, documents=None):
        return engine_row(input_ids, regions)

    def policies(self, cfg):
        gate = [] if cfg.entropy_threshold is None else [EntropyGate(cfg.entropy_threshold)]
        return gate + [AttributionChoice(cfg.min_prob, cfg.min_prob_ratio)]


class SampleMethod(DecodingMethod):
    name, about = "sample", "temperature + top-p sampling (seeded per sequence)"
    stochastic = True

    def policies(self, cfg):
        return [Sample(cfg.temperature, cfg.top_p, cfg.seed)]


class CADMethod(DecodingMethod):
    name, about = "cad", "context-aware decoding (Shi et al., 2024): contrast with the prompt without the ROI"
    uses_roi = True

    def validate(self, cfg):
        if cfg.roi is None:
            raise MethodError("method 'cad' needs a ROI to leave out (roi=, e.g. 'context')")

    def source(self, cfg, model, n_rois, heads):
        return CADSource(model, cfg.cad_alpha)

    def row(self, cfg, tokenizer, prompt, input_ids, regions, messages=None, documents=None):
        if prompt is None:
            raise MethodError("method 'cad' needs a rendered prompt (a conversation), not bare token ids")
        negative = context_free_prompt(tokenizer, prompt, cfg.roi_list()[0], messages, documents)[0]
        return Row(input_ids, negative_ids=negative)


class DoLaMethod(DecodingMethod):
    name, about = "dola", "DoLa (Chuang et al., 2024): contrast the final layer with a premature one"
    repetition_penalty = 1.2  # what the DoLa authors recommend (and transformers used) with DoLa

    def source(self, cfg, model, n_rois, heads):
        return DoLaSource(model, cfg.dola_layers)


class SteerMethod(DecodingMethod):
    name, about = "steer", "activation steering: a vector added to the residual stream at one layer"
    owns = ("steer_vector", "steer_layer")

    def validate(self, cfg):
        if cfg.steer_vector is None:
            raise MethodError("method='steer' needs steer_vector: a file saved by `agd steer fit` (or "
                              "agdecode.baselines.steering.fit_steering_vector), a SteeringVector or a tensor")

    def source(self, cfg, model, n_rois, heads):
        return SteeringSource(model, as_steering_vector(cfg.steer_vector), cfg.steer_layer, cfg.steer_weight)


# --- the registry --------------------------------------------------------------------------------

_REGISTRY: dict[str, DecodingMethod] = {}
_entry_points_loaded = False


def register_method(method: DecodingMethod | type, *, replace: bool = False) -> DecodingMethod:
    """Make ``method`` (a :class:`DecodingMethod` instance or subclass) available by its name everywhere:
    ``generate(method=NAME)``, ``agd generate/eval --method NAME``, the server's ``agd.method``.

    Example:
        >>> register_method(Lowest())
        <decoding method 'lowest'>
    """
    if isinstance(method, type) and issubclass(method, DecodingMethod):
        method = method()
    if not isinstance(method, DecodingMethod):
        raise MethodError(f"register_method takes a DecodingMethod (instance or subclass), got {type(method).__name__}")
    name = method.name
    if not isinstance(name, str) or not name or any(c in name for c in "@, \t\n"):
        raise MethodError(f"a decoding method needs a name without '@', ',' or spaces, got {name!r}")
    if name in _REGISTRY and not replace and type(_REGISTRY[name]) is not type(method):
        raise MethodError(f"a decoding method named {name!r} is already registered ({_REGISTRY[name]!r}); "
                          "pass replace=True to replace it")
    _REGISTRY[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests, plugins that clean up after themselves)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_method(ep.load())
        except Exception as e:  # a broken plugin must not break agdecode: say which and go on
            warnings.warn(f"agdecode: the decoding method entry point {ep.name!r} ({ep.value}) failed to load: {e}",
                          stacklevel=2)


def get_method(name: str) -> DecodingMethod:
    """The registered method called ``name``.

    Example:
        >>> get_method("agd").guided, get_method("dola").repetition_penalty
        (True, 1.2)
    """
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodError(f"method must be one of {', '.join(method_names())}, got {name!r:.80}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method's name, built-ins first.

    Example:
        >>> method_names()[:3]
        ('agd', 'greedy', 'cad')
    """
    _load_entry_points()
    return tuple(_REGISTRY)


def engine_row(input_ids, regions) -> Row:
    """An attribution engine's row: the token weights ``(R, T)`` and head weights ``(R, L, H)`` of the ROIs."""
    heads = None
    if any(r.heads is not None for r in regions):
        shape = next(r.heads.shape for r in regions if r.heads is not None)
        heads = torch.stack([r.heads if r.heads is not None else torch.zeros(shape) for r in regions])
    return Row(input_ids, torch.stack([r.tokens for r in regions]), heads)


for _m in (AGDMethod, GreedyMethod, CADMethod, DoLaMethod, SteerMethod, SampleMethod):
    register_method(_m)
