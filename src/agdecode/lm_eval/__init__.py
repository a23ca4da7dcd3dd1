"""lm-evaluation-harness model type ``agd``: Hugging Face models that generate with Attribution-Guided Decoding.

``AGDLM`` is lm-eval's ``HFLM`` (loading, batching, truncation, chat templates, stop sequences,
log-likelihoods) whose generation step is :func:`agdecode.hf.generate`. It remembers the chat
messages behind every prompt that ``--apply_chat_template`` renders, so ROIs such as ``system``
(with ``--system_instruction``) resolve against them. Log-likelihood requests go to the plain model.

lm-eval 0.4 finds model types only in its own registry, so run it through this module, which
registers ``agd`` and then starts lm-eval's command line::

    python -m agdecode.lm_eval --model agd --model_args pretrained=PATH,roi=system,k=5 \\
        --tasks ifeval --apply_chat_template --system_instruction "Answer in French."

(``agd-lm-eval`` is the same command; in Python, ``import agdecode.lm_eval`` before
``lm_eval.simple_evaluate(model="agd", ...)``.)
"""
from __future__ import annotations

import torch

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import hf
from ..config import make_config
from ..errors import AgdError
from ..models import DEFAULT_MODEL, builtin_model_folder
from ..prompt import render_prompt
from ..roi import resolve_region

__all__ = ["AGDLM", "main"]


@register_model("agd")
class AGDLM(HFLM):
    """``HFLM`` generating with AGD; ``--model_args`` adds ``roi`` (default ``system``), ``k``,
    ``min_prob``, ``entropy_threshold`` (nats or ``auto``), ``attribution``, ``engine``.

    ``pretrained`` is a model folder, a Hub id, or ``"smollm2"`` (the built-in SmolLM2-135M-Instruct).
    The model folder's own code is never run (``trust_remote_code`` stays False) and weights load
    from safetensors only (``use_safetensors=False`` in ``--model_args`` allows other formats).

    Example:
        >>> lm = AGDLM(pretrained="path/to/model", roi="system", k=5, device="cpu")
        >>> lm_eval.simple_evaluate(model=lm, tasks=["ifeval"], apply_chat_template=True,
        ...                         system_instruction="Answer in French.")
    """

    def __init__(self, pretrained, roi: str = "system", k: int = 5, min_prob: float = 0.05,
                 entropy_threshold: float | str | None = None, attribution: str = "lrp", engine: str | None = None,
                 trust_remote_code: bool | None = False, **kwargs):
        if trust_remote_code:
            raise AgdError("the agd model type never runs a model folder's code: drop trust_remote_code")
        settings = dict(k=k, min_prob=min_prob, entropy_threshold=entropy_threshold, attribution=attribution)
        if engine is not None:
            settings["engine"] = engine
        make_config(roi=roi, **settings)  # bad settings fail before the model loads
        kwargs.setdefault("use_safetensors", True)
        if pretrained == DEFAULT_MODEL:  # the built-in name, as everywhere else: its local folder, not the Hub
            pretrained = str(builtin_model_folder())
        super().__init__(pretrained=pretrained, trust_remote_code=False, **kwargs)
        self.roi, self.agd_settings = roi, settings
        self._chats: dict[str, tuple[list[dict], bool]] = {}  # rendered prompt -> (messages, add_generation_prompt)
        self._batch: list[str] = []  # the prompts of the batch being encoded for generation

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        self._chats[text] = ([dict(m) for m in chat_history], add_generation_prompt)
        return text

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        # generate_until encodes each batch's prompts just before generating them: keep them for the ROIs.
        self._batch = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        mask = generation_kwargs.pop("attention_mask", None)
        if len(self._batch) != context.shape[0]:
            raise RuntimeError("agdecode.lm_eval: the prompts of this batch are not known")
        roi = self._roi_mask(context, mask)
        roi_args = {"roi_mask": roi} if roi is not None else {"roi": self.roi}
        generation_kwargs.pop("use_cache", None)
        if not generation_kwargs.get("do_sample"):  # as HFLM: greedy settings carry no temperature
            generation_kwargs.pop("temperature", None)
        try:
            return hf.generate(self.model, input_ids=context, attention_mask=mask, max_length=max_length,
                               stop_strings=list(stop) or None, tokenizer=self.tokenizer,
                               pad_token_id=self.tokenizer.pad_token_id, **roi_args, **self.agd_settings,
                               **generation_kwargs)
        except AgdError as e:
            if roi is None and "messages=" in str(e):
                raise AgdError(f"roi={self.roi!r} needs chat prompts: run lm_eval with --apply_chat_template "
                               "(and --system_instruction for roi=system)") from e
            raise

    def _roi_mask(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ROI as token weights aligned with ``context``, from the remembered chat messages (None: not chats)."""
        if not all(s in self._chats for s in self._batch):
            return None
        weights = torch.zeros(context.shape, dtype=torch.float)
        mask = torch.ones_like(context) if mask is None else mask
        for i, text in enumerate(self._batch):
            messages, generation_prompt = self._chats[text]
            options = dict(self.chat_template_args or {})
            if not generation_prompt:
                options["continue_final_message"] = True
            prompt = render_prompt(self.tokenizer, messages, add_generation_prompt=generation_prompt,
                                   chat_template_kwargs=options)
            if prompt.text != text:  # HFLM retried without the system message
                prompt = render_prompt(self.tokenizer, [m for m in messages if m["role"] != "system"],
                                       add_generation_prompt=generation_prompt, chat_template_kwargs=options)
            ids = context[i][mask[i].bool()].tolist()
            if prompt.text != text or prompt.input_ids[0].tolist() != ids:
                raise AgdError(f"prompt {i} of the batch is not its chat messages as agdecode renders them "
                               "(truncated, or encoded with extra special tokens); the ROI cannot be placed")
            region = resolve_region(self.roi, prompt, self.model)
            if region.heads is not None:
                return None  # head ROIs need no messages: agdecode.hf resolves them itself
            weights[i, context.shape[1] - len(ids):] = region.tokens
        return weights


def main() -> None:
    """lm-eval's command line (``sys.argv``) with the ``agd`` model type registered."""
    cli_evaluate()
