"""Qwen3: the Llama layout with per-head q and k norms (RMSNorm, the same rule)."""
from .spec import MLP, Norm, Spec

SPEC = Spec("qwen3", ("qwen3",), "qwen3.modeling_qwen3", Norm(("Qwen3RMSNorm",)), MLP("Qwen3MLP"),
            oracle="reference AttnLRP relevances (upstream LXT, tests/data/attnlrp-golden/qwen3)")
