"""DoLa: decoding by contrasting layers (Chuang et al., 2023, arXiv 2309.03883).

Per step, every candidate premature layer ``j`` gets early-exit logits
``lm_head(final_norm(h_j))`` at the last position; the one whose distribution has the largest
Jensen-Shannon divergence from the final layer's is contrasted with it:

    scores = log p_final - log p_j    for tokens with p_final >= 0.1 * max p_final, -inf elsewhere

then a repetition penalty (default 1.2, as the authors recommend; the loop's
``repetition_penalty`` processor) is applied over the whole sequence and the argmax taken. transformers 5.x no longer ships DoLa; this follows its former
implementation (``dola_layers`` buckets, relative-top filter, penalty after the contrast) with two
deliberate differences: premature logits go through the final norm (the paper's early exit; HF's
code applied ``lm_head`` to the raw hidden state), and the divergence is the textbook JSD,
``(KL(p||m) + KL(q||m)) / 2``, where the original code computed ``KL(m||p) + KL(m||q)``.

Layer ``j`` indexes ``output_hidden_states``: 0 is the embedding output, ``j < L`` the residual
stream entering decoder layer ``j``, ``L`` the final (normed) layer. Contrasting the final layer
with itself carries no information, so when it is selected the step is plain greedy over the final
distribution: ``dola_layers=[L]`` with ``repetition_penalty=1.0`` reproduces greedy exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import final_norm
from ..architectures import layout
from ..sources import CachedForward
from . import BaselineError

__all__ = ["DoLaSource", "candidate_layers", "js_divergence", "RELATIVE_TOP"]

RELATIVE_TOP = 0.1


def candidate_layers(model: nn.Module, layers: "str | list[int]") -> list[int]:
    """Resolve ``"low"``, ``"high"`` or an explicit list to premature layer indices, as HF did.

    The buckets are the even layers of the lower / upper half (of the first / last 20 layers for
    models deeper than 40); with tied embeddings layer 0 is skipped in favour of 2, because the
    early exit of the embeddings then mostly predicts the input token.

    Example:
        >>> candidate_layers(smollm2_model, "high")   # 30 layers
        [15, 17, 19, 21, 23, 25, 27, 29]
    """
    cfg = model.config.get_text_config()
    n = layout(model).n_layers(model)
    start = 2 if getattr(cfg, "tie_word_embeddings", False) else 0
    if layers == "low":
        if start >= n // 2:  # very shallow models: one layer
            return [min(start, n)]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    if layers == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    if isinstance(layers, str) or not layers:
        raise BaselineError(f"dola_layers must be 'low', 'high' or a non-empty list of layer indices, got {layers!r}")
    bad = [j for j in layers if not 0 <= j <= n]
    if bad:
        raise BaselineError(f"dola_layers {bad} out of range: this model's layers are 0..{n} "
                            f"(0 = embeddings, {n} = the final layer)")
    return sorted(set(layers))


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between ``softmax`` of the last dims; broadcasts.

    Example:
        >>> float(js_divergence(torch.tensor([0., 0.]), torch.tensor([0., 50.])))   # ~log 2
        0.6931...
    """
    p, q = torch.softmax(p_logits.float(), -1), torch.softmax(q_logits.float(), -1)
    log_m = torch.log((p + q) / 2)

    def kl_to_m(x: torch.Tensor) -> torch.Tensor:  # x log(x/m), with 0 log 0 = 0 where softmax underflows
        return torch.where(x > 0, x * (torch.log(x) - log_m), 0.0).sum(-1)

    return (kl_to_m(p) + kl_to_m(q)) / 2


class DoLaSource(CachedForward):
    """DoLa next-token scores for a batch, from one cached forward with hidden states per step.

    The repetition penalty DoLa is used with is applied by the decoding loop's logits processors
    (``repetition_penalty``), after these scores, where DoLa applied it.

    Example:
        >>> with DoLaSource(model, "high") as src:
        ...     scores = src.prefill([Row(ids)]); src.info(0)["premature_layer"]
    """

    def __init__(self, model: nn.Module, layers: "str | list[int]" = "high", relative_top: float = RELATIVE_TOP):
        super().__init__(model)
        self.kv.extra = {"output_hidden_states": True}
        self.n_layers = layout(model).n_layers(model)
        self.layers = candidate_layers(model, layers)
        self.relative_top = relative_top
        self.log_relative_top = math.log(relative_top)
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.scale = layout(model).logits_scale(model)  # Granite divides its logits by logits_scaling
        self.softcap = layout(model).final_softcap(model)
        self._info: list[dict] = []

    def _early_exit(self, h: torch.Tensor) -> torch.Tensor:
        """What the model's head would say if the network stopped at ``h``: same norm, head, softcap."""
        logits = self.head(self.norm(h)).float() * self.scale
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def _logits(self, out, start: int) -> torch.Tensor:
        final = out.logits[:, -1].float()                                          # (B, V)
        premature = torch.stack([final if j == self.n_layers else self._early_exit(out.hidden_states[j][:, -1])
                                 for j in self.layers], dim=1)                      # (B, n_candidates, V)
        jsd = js_divergence(final[:, None], premature)                             # (B, n_candidates)
        pick = jsd.argmax(-1)                                                      # ties go to the lower layer
        log_final = torch.log_softmax(final, -1)
        contrast = log_final - torch.log_softmax(premature[torch.arange(len(final)), pick], -1)
        contrast[log_final < log_final.max(-1, keepdim=True).values + self.log_relative_top] = -math.inf
        # Contrasting the final layer with itself carries no information: plain greedy over it.
        is_final = torch.tensor([self.layers[p] == self.n_layers for p in pick.tolist()], device=final.device)
        scores = torch.where(is_final[:, None], log_final, contrast)
        info = [{"premature_layer": self.layers[p], "model_top": int(f.argmax()),
                 "js_divergence": {str(j): float(d) for j, d in zip(self.layers, row)}}
                for p, f, row in zip(pick.tolist(), final, jsd)]
        self._info = self._info[:start] + info if start else info
        return scores

    def keep(self, index: torch.Tensor) -> None:
        super().keep(index)
        self._info = [self._info[i] for i in index.tolist()]

    def info(self, i: int) -> dict:
        """The chosen premature layer, each candidate's JSD from the final layer, the final layer's top token."""
        return dict(self._info[i])

    def describe(self) -> dict:
        return {"candidate_layers": self.layers, "final_layer": self.n_layers, "relative_top": self.relative_top}
