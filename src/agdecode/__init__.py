"""agdecode: Attribution-Guided Decoding (Komorowski et al., ICLR 2026) for Hugging Face models.

Example:
    >>> import agdecode
    >>> model, tok = agdecode.load_model("smollm2")
    >>> out = agdecode.generate(model, tok, [{"role": "system", "content": "Always answer in French."},
    ...                                      {"role": "user", "content": "Tell me about cats."}])
    >>> out.text
"""
from ._version import __version__
from .adapters import UnsupportedArchitectureError, attnlrp
from .architectures import get_spec
from .errors import AgdError
from .config import AGDConfig
from .decoding import NonFiniteLogitsError, compare, entropy, generate
from .models import ModelNotFoundError, load_model
from .prefix_cache import PrefixCache
from .prompt import render_prompt
from .roi import ROI, ROIError, resolve_roi
from .trace import GenerationResult

__all__ = [
    "AGDConfig", "AgdError", "GenerationResult", "ModelNotFoundError", "NonFiniteLogitsError", "PrefixCache", "ROI", "ROIError",
    "UnsupportedArchitectureError", "attnlrp", "compare", "entropy", "generate", "get_spec", "load_model",
    "render_prompt", "resolve_roi", "__version__",
]
