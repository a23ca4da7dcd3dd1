"""Granite: the Llama layout with scalar multipliers on the embeddings, residual branches, attention
scores and logits. All are linear, so they need no rule and the modules run as they are."""
from .spec import MLP, Norm, Spec

SPEC = Spec("granite", ("granite",), "granite.modeling_granite", Norm(("GraniteRMSNorm",)), MLP("GraniteMLP"),
            logits_divisor="logits_scaling",
            oracle="with neutral multipliers (attention 1/sqrt(head_dim), the others 1.0), equals the Llama path on "
                   "the same weights")
