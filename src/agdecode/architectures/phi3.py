"""Phi-3: fused q/k/v projection (linear: no rule) and fused gate/up projection (gate = first half)."""
from .spec import MLP, Norm, Spec

SPEC = Spec("phi3", ("phi3",), "phi3.modeling_phi3", Norm(("Phi3RMSNorm",)),
            MLP("Phi3MLP", kind="fused-gated", inputs=("gate_up_proj",), act="activation_fn"),
            oracle="equals the Llama path on a Llama model with the fused weights split into q/k/v and gate/up")
