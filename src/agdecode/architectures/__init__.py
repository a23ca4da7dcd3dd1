"""Architectures as data: one spec per family, read by the autograd rules and the forward engine.

Each module here holds one :class:`~agdecode.architectures.spec.Spec`: which module classes get
which rule (norm kind, MLP kind; attention always gets the AttnLRP attention), where the decoder
layers, the attention output projection and the final norm are. No other file names model structure.

Example:
    >>> from agdecode.architectures import get_spec
    >>> spec = get_spec(model)
    >>> spec.name, len(spec.layers(model)), spec.attention_output(spec.layers(model)[0])
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from . import gemma3, gpt2, granite, llama, mistral, olmo2, phi3, qwen2, qwen3, smollm3
from .spec import MLP, Norm, Spec

__all__ = ["Spec", "Norm", "MLP", "SPECS", "ARCHITECTURES", "get_spec", "layout", "UnsupportedArchitectureError"]

SPECS: tuple[Spec, ...] = tuple(m.SPEC for m in (llama, qwen2, qwen3, gemma3, mistral, phi3, olmo2, granite,
                                                 smollm3, gpt2))
# config.model_type -> spec
ARCHITECTURES: dict[str, Spec] = {t: s for s in SPECS for t in s.model_types}


def get_spec(model: nn.Module) -> Spec:
    """The spec of ``model``'s architecture, or a one-line refusal listing the supported ones.

    Example:
        >>> get_spec(model).name
        'llama'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(s.name for s in SPECS))
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported for attribution; supported: {supported} "
            f"(config.model_type one of {', '.join(ARCHITECTURES)})."
        )
    return ARCHITECTURES[model_type]


def layout(model: nn.Module) -> Spec:
    """Where the layers and the final norm are, for baselines that need no rules (DoLa, steering): the
    model's spec, or for an unmapped architecture the common layout (``layers``, ``norm``) if it has it.

    Example:
        >>> layout(model).final_norm(model)
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    decoder = Spec.decoder(model)
    if not (hasattr(decoder, llama.SPEC.layers_path) and hasattr(decoder, llama.SPEC.final_norm_path)):
        get_spec(model)  # raises, listing the supported architectures
    return llama.SPEC
