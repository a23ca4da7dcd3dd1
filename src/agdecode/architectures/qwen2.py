"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k, v (the forward engine puts them on primal rows)."""
from .spec import MLP, Norm, Spec

SPEC = Spec("qwen2", ("qwen2",), "qwen2.modeling_qwen2", Norm(("Qwen2RMSNorm",)), MLP("Qwen2MLP"),
            oracle="reference AttnLRP relevances (upstream LXT, tests/data/attnlrp-golden/qwen2)")
