"""Gemma 3 (text): RMSNorm written as ``_norm`` with a (1 + w) scale, norms before and after attention
and MLP, q/k norms, GELU-gated MLP, sliding-window layers."""
from .spec import MLP, Norm, Spec

SPEC = Spec("gemma3", ("gemma3_text", "gemma3"), "gemma3.modeling_gemma3",
            Norm(("Gemma3RMSNorm",), kind="rms-gemma", eps="eps"), MLP("Gemma3MLP"),
            oracle="reference AttnLRP relevances (upstream LXT, tests/data/attnlrp-golden/gemma3)")
