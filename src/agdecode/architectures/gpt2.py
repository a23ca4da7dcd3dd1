"""GPT-2: LayerNorm (stop-gradient through its standard deviation, as LXT's GPT-2 map; the centering
keeps its gradient), a GELU MLP without a gate (identity rule on the activation), Conv1D projections
with biases (weights stored transposed), learned position embeddings (a constant added inside the
model: no tangent), layers in ``transformer.h``, heads read at ``attn.c_proj``."""
from .spec import MLP, Norm, Spec

SPEC = Spec("gpt2", ("gpt2",), "gpt2.modeling_gpt2", Norm(("torch.nn.LayerNorm",), kind="layer", eps="eps"),
            MLP("GPT2MLP", kind="plain", inputs=("c_fc",), act="act", output="c_proj"),
            layers_path="h", final_norm_path="ln_f", attention_output_path="attn.c_proj", learned_positions="wpe",
            oracle="reference AttnLRP relevances (upstream LXT's GPT-2 map, tests/data/attnlrp-golden/gpt2)")
