"""Mistral: the Llama layout (optionally sliding-window attention, which comes from the mask)."""
from .spec import MLP, Norm, Spec

SPEC = Spec("mistral", ("mistral",), "mistral.modeling_mistral", Norm(("MistralRMSNorm",)), MLP("MistralMLP"),
            oracle="equals the Llama path on a Llama model with the same weights")
