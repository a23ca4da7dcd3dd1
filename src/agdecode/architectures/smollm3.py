"""SmolLM3: the Llama layout; some layers skip the rotary embedding (``no_rope_layers``), which
changes no rule."""
from .spec import MLP, Norm, Spec

SPEC = Spec("smollm3", ("smollm3",), "smollm3.modeling_smollm3", Norm(("SmolLM3RMSNorm",)), MLP("SmolLM3MLP"),
            oracle="with rotary embeddings in every layer, equals the Llama path on the same weights")
