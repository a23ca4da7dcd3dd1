"""Granite: the Llama layout with scalar multipliers on the embeddings, residual branches, attention
scores and logits. All are linear, so they need no rule and the modules run as they are."""
from .spec import MLP, Norm, Spec

SPEC = Spec("granite", ("granite",), "granite.modeling_granite", Norm(("GraniteRMSNorm",)), MLP("GraniteMLP"),
            oracle="with every multiplier 1.0, equals the Llama path on the same weights")
