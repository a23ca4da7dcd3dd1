"""OLMo-2: norms after attention and after the MLP (not before), q/k norms over all heads, and the
norm weight applied before the cast back to the input dtype."""
from .spec import MLP, Norm, Spec

SPEC = Spec("olmo2", ("olmo2",), "olmo2.modeling_olmo2", Norm(("Olmo2RMSNorm",), weight_in_float32=True),
            MLP("Olmo2MLP"),
            oracle="no weight-equivalent Llama model (norms sit elsewhere): forward = reverse engine, k=1 = greedy, "
                   "restoration, batch = single")
