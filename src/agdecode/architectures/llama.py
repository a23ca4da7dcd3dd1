"""Llama (SmolLM2, Llama 2/3): RMSNorm, gated SiLU MLP, rotary attention with o_proj."""
from .spec import MLP, Norm, Spec

SPEC = Spec("llama", ("llama",), "llama.modeling_llama", Norm(("LlamaRMSNorm",)), MLP("LlamaMLP"),
            oracle="reference AttnLRP relevances (upstream LXT, tests/data/attnlrp-golden/llama)")
