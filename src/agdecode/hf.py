"""AGD inside transformers' ``generate``: its input preparation, logits processors, stopping criteria and streamers.

Three ways in, from the most to the least complete:

- ``agdecode.hf.generate(model, **inputs, roi=..., tokenizer=tok, streamer=..., stop_strings=[...])``,
  the same thing as ``model.generate(..., custom_generate="PATH_OR_HUB_ID", trust_remote_code=True)``
  with the shipped ``custom_generate/`` folder (its ``generate.py`` calls this function);
- ``model.generate(**inputs, custom_generate=agdecode.hf.agd_generate, roi_mask=...)``: transformers
  prepares everything and hands the decoding loop to AGD. transformers (5.x) does not pass
  ``tokenizer=`` and ``streamer=`` on to a custom_generate callable, so ``stop_strings``, ``roi=``
  strings and streaming need the first way (or ``functools.partial(agd_generate, tokenizer=tok)``);
- :func:`prepare` renders chat conversations into ``input_ids``, ``attention_mask`` and ``roi_mask``.

Each sequence of the (left-padded) batch is decoded on its own tokens (padding stripped), so a
batch gives the same tokens as its rows one at a time; transformers' processors and criteria are
called per row, with their length settings moved to that row's own length.
"""
from __future__ import annotations

import copy
import functools
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import StopStringCriteria

from .config import resolve_config
from .decoding import Decoder, Job, as_conversations, make_jobs, run
from .errors import AgdError
from .prefix_cache import PrefixCache
from .prompt import Prompt, render_prompt
from .roi import Region, ROIError, resolve_region
from .sources import left_pad

__all__ = ["agd_generate", "generate", "prepare", "AGDGenerateOutput"]

from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class AGDGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate``'s ``GenerateDecoderOnlyOutput`` plus ``agd``: one :class:`~agdecode.GenerationResult` per row
    (steps, candidates, ROI scores, overrides)."""

    agd: list | None = None


# Processors transformers adds only when sampling; AGD is deterministic, so they do not apply.
_WARPERS = ("TemperatureLogitsWarper", "TopHLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
            "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper")
_SETTINGS = ("k", "min_prob", "entropy_threshold", "attribution", "engine")


def prepare(tokenizer, conversations, roi: str = "system", documents=None, chat_template_kwargs: dict | None = None,
            device=None) -> dict[str, torch.Tensor]:
    """Render conversations with the chat template: left-padded ``input_ids``, ``attention_mask`` and ``roi_mask``.

    ``conversations`` is one conversation (a list of ``{"role", "content"}`` messages) or a list of
    them; ``roi`` is any token ROI (``"system"``, ``"context"``, ``"context - user"``, ...; head
    ROIs cannot be a mask: pass ``roi=`` to :func:`generate` instead); ``documents`` as in
    :func:`agdecode.generate`. ``roi_mask`` holds the ROI's token weights (1, or -1 for a
    subtracted part), aligned with ``input_ids``.

    Example:
        >>> inputs = prepare(tok, [{"role": "system", "content": "Answer in French."},
        ...                        {"role": "user", "content": "Hi"}])
        >>> out = model.generate(**inputs, custom_generate=agd_generate, max_new_tokens=20)
    """
    _, convs = as_conversations(conversations)
    docs = [None] * len(convs) if documents is None else ([documents] if len(convs) == 1 and _is_docs(documents)
                                                          else list(documents))
    if len(docs) != len(convs):
        raise AgdError(f"documents has {len(docs)} entries for {len(convs)} conversations")
    if not isinstance(roi, str):
        raise AgdError(f"prepare() takes one ROI string (roi_mask holds one region), got {roi!r}")
    prompts = [render_prompt(tokenizer, c, documents=d, chat_template_kwargs=chat_template_kwargs)
               for c, d in zip(convs, docs)]
    regions = [resolve_region(roi, p) for p in prompts]
    if any(r.heads is not None for r in regions):
        raise AgdError(f"ROI {roi!r} weights attention heads, which a token mask cannot hold: "
                       "pass roi= (and messages=) to agdecode.hf.generate instead")
    ids, mask = left_pad([p.input_ids[0] for p in prompts], value=_pad_id(tokenizer))
    roi_mask, _ = left_pad([r.tokens for r in regions])
    return {k: v.to(device) if device is not None else v
            for k, v in (("input_ids", ids), ("attention_mask", mask), ("roi_mask", roi_mask))}


def generate(model: nn.Module, *args, tokenizer=None, streamer=None, stop_strings=None, **kwargs):
    """``model.generate`` with Attribution-Guided Decoding as its decoding loop; everything ``generate`` takes works.

    AGD's own keywords: ``roi_mask`` (``(B, T)`` bool/float token weights aligned with
    ``input_ids``, e.g. from :func:`prepare`) or ``roi`` (an agdecode ROI string or list, resolved
    with ``tokenizer``; role, message and document ROIs also need ``messages=``: the conversation,
    or one per row, that ``input_ids`` were rendered from), ``k``, ``min_prob``,
    ``entropy_threshold``, ``attribution``, ``engine``, ``batch_size``. transformers' keywords
    (``max_new_tokens``, ``repetition_penalty``, ``stop_strings`` with ``tokenizer``,
    ``logits_processor``, ``stopping_criteria``, ``streamer``, ``return_dict_in_generate``,
    ``output_scores``, ...) behave as in ``generate``; sampling settings are ignored (AGD is
    deterministic). Returns what ``generate`` returns: a LongTensor ``(B, T + new)`` or, with
    ``return_dict_in_generate=True``, an :class:`AGDGenerateOutput`.

    This is also what ``custom_generate="PATH_OR_HUB_ID"`` runs (the shipped ``custom_generate/`` folder).

    Example:
        >>> inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
        ...                                  return_dict=True)
        >>> out = agdecode.hf.generate(model, **inputs, roi="system", messages=messages, tokenizer=tok,
        ...                            max_new_tokens=40, stop_strings=["\\n\\n"])
    """
    kwargs.pop("custom_generate", None)
    kwargs.pop("trust_remote_code", None)
    config = kwargs.get("generation_config") or model.generation_config
    if stop_strings is None and getattr(config, "stop_strings", None):
        # transformers would build this criterion itself, but it drops tokenizer= before a custom loop.
        stop_strings = config.stop_strings
        kwargs["generation_config"] = copy.deepcopy(config)
        kwargs["generation_config"].stop_strings = None
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    if stop_strings:
        if tokenizer is None:
            raise AgdError("stop_strings need the tokenizer: pass tokenizer=")
        criteria.append(StopStringCriteria(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings))
    loop = functools.partial(agd_generate, tokenizer=tokenizer, streamer=streamer)
    # The partial keeps agd_generate's signature, from which transformers learns which keywords are AGD's.
    return GenerationMixin.generate(model, *args, custom_generate=loop, streamer=streamer, stopping_criteria=criteria,
                                    **kwargs)


def agd_generate(model: nn.Module, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                 synced_gpus: bool = False, streamer=None, *, roi_mask: torch.Tensor | None = None,
                 roi: str | list | None = None, messages: list | None = None, k: int | None = None,
                 min_prob: float | None = None, entropy_threshold: float | str | None = None,
                 attribution: str | None = None, engine: str | None = None, batch_size: int | None = None,
                 tokenizer=None, **model_kwargs):
    """AGD as transformers' decoding loop: pass it as ``model.generate(..., custom_generate=agd_generate)``.

    transformers has prepared ``input_ids`` (left-padded), the attention mask (``model_kwargs``),
    the logits processors, the stopping criteria and ``generation_config``; AGD decodes every row
    on its own tokens with those processors and criteria. See :func:`generate` for the keywords.
    ``streamer`` has already been given the prompt (as transformers does before its loops).

    Example:
        >>> out = model.generate(**agdecode.hf.prepare(tok, messages), custom_generate=agd_generate,
        ...                      k=5, entropy_threshold=1.734, max_new_tokens=40, repetition_penalty=1.2)
    """
    gen = generation_config
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise AgdError("AGD needs input_ids (inputs_embeds alone cannot be attributed to prompt tokens)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise AgdError("AGD supports decoder-only models; this model is an encoder-decoder")
    if (gen.num_beams or 1) > 1:
        raise AgdError(f"AGD is a greedy-style decoder: num_beams must be 1, got {gen.num_beams}")
    if gen.return_dict_in_generate and (gen.output_attentions or gen.output_hidden_states):
        raise AgdError("AGD does not return attentions or hidden states: drop output_attentions/output_hidden_states")
    batch, width = input_ids.shape
    if streamer is None and _dropped_streamer():
        warnings.warn("model.generate(custom_generate=agd_generate, streamer=...) does not stream: transformers "
                      "passes a callable custom_generate no streamer (the streamer gets the prompt only); use "
                      "agdecode.hf.generate(model, ..., streamer=...) or functools.partial(agd_generate, "
                      "streamer=...)", stacklevel=3)
    if streamer is not None and batch > 1:
        raise AgdError("streamer= streams one sequence; pass a batch of 1")
    mask = _take_model_kwargs(model_kwargs, input_ids)
    pads = (mask == 0).sum(1).tolist()
    seqs = [input_ids[i, p:].cpu() for i, p in enumerate(pads)]
    max_new = int(gen.max_length) - width
    if max_new < 1:
        raise AgdError(f"max_length={gen.max_length} leaves no room after the {width}-token prompt: set max_new_tokens")
    regions, prompts = _regions(model, tokenizer, seqs, pads, roi_mask, roi, messages)
    settings = {n: v for n, v in zip(_SETTINGS, (k, min_prob, entropy_threshold, attribution, engine)) if v is not None}
    # roi_mask=: the regions come with the jobs (no ROI to resolve), so the config names none.
    cfg = resolve_config(model, tokenizer, roi=roi, max_new_tokens=max_new, **settings)
    criteria = [c for c in stopping_criteria if type(c).__name__ != "MaxLengthCriteria"]  # = each job's max_new_tokens
    jobs = [make_jobs(model, tokenizer, cfg, [s], stopping_criteria=criteria, regions=rs, prompt=p)[0]
            for s, rs, p in zip(seqs, regions, prompts)]
    rows = _PerRow(_processors(logits_processor, gen), jobs, pads, gen.return_dict_in_generate and gen.output_scores,
                   gen.return_dict_in_generate and gen.output_logits)
    # As generate(): rows that start alike (one system prompt) compute that prefix once, exactly.
    decoder = Decoder(model, tokenizer, cfg, prefix_cache=PrefixCache() if batch > 1 else None)
    if streamer is not None:
        jobs[0].on_token = lambda t: streamer.put(torch.tensor([t]))
    run(decoder, jobs, batch_size or batch)
    if streamer is not None:
        streamer.end()
    n = max(len(j.out_ids) for j in jobs)
    pad = _pad_value(gen)
    new = torch.tensor([j.out_ids + [pad] * (n - len(j.out_ids)) for j in jobs], dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if not gen.return_dict_in_generate:
        return sequences
    return AGDGenerateOutput(sequences=sequences, scores=rows.stacked("scores", jobs, n),
                             logits=rows.stacked("logits", jobs, n), agd=[decoder.result(j) for j in jobs])


# --- pieces --------------------------------------------------------------------------------------

def _dropped_streamer() -> bool:
    """Whether transformers' ``generate``, which called :func:`agd_generate`, was given a streamer.

    transformers (5.x) hands a callable custom_generate only the keywords its signature adds to
    ``_sample``'s, so ``streamer=`` never arrives; the caller's frame still holds it. Looked at only
    to warn: where the frame is not transformers' ``generate`` the answer is False.
    """
    frame = sys._getframe(2)  # 0: here, 1: agd_generate, 2: its caller (a partial adds no frame)
    if frame.f_code.co_name != "generate" or frame.f_globals.get("__name__") != "transformers.generation.utils":
        return False
    return frame.f_locals.get("streamer") is not None


def _is_docs(documents) -> bool:
    return isinstance(documents, (list, tuple)) and bool(documents) and isinstance(documents[0], dict)


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _pad_value(gen) -> int:
    for t in (getattr(gen, "_pad_token_tensor", None), gen.pad_token_id, getattr(gen, "_eos_token_tensor", None)):
        if t is not None:
            t = torch.as_tensor(t).reshape(-1)
            if t.numel():
                return int(t[0])
    return 0


def _take_model_kwargs(model_kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """The left-padding mask ``(B, T)``; refuses model inputs AGD cannot use (images, a filled cache, ...)."""
    mask = model_kwargs.pop("attention_mask", None)
    for name in ("position_ids", "logits_to_keep", "use_cache", "cache_position"):
        model_kwargs.pop(name, None)
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.pop(name, None)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise AgdError("AGD starts from the prompt: a filled past_key_values/cache cannot be reused")
    rest = sorted(k for k, v in model_kwargs.items() if v is not None)
    if rest:
        raise AgdError(f"AGD does not support these generate inputs: {', '.join(rest)}")
    if mask is None:
        return torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise AgdError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    mask = (mask != 0).long().cpu()
    if (mask.cummax(1).values != mask).any() or (mask[:, -1] == 0).any():
        raise AgdError("attention_mask must be left padding (tokenizer padding_side='left'), with no gaps")
    return mask


def _regions(model, tokenizer, seqs: list, pads: list, roi_mask, roi, messages) -> tuple[list, list]:
    """Each row's resolved ROIs and (when known) its rendered prompt."""
    if roi_mask is not None and roi is not None:
        raise AgdError("pass roi_mask= or roi=, not both")
    if roi_mask is not None:
        roi_mask = torch.as_tensor(roi_mask)
        if roi_mask.dim() == 1 and len(seqs) == 1:
            roi_mask = roi_mask[None]
        width = pads[0] + len(seqs[0])
        if roi_mask.shape != (len(seqs), width):
            raise AgdError(f"roi_mask has shape {tuple(roi_mask.shape)}; it must match input_ids {(len(seqs), width)}")
        weights = [roi_mask[i, p:].float().cpu() for i, p in enumerate(pads)]
        empty = [i for i, w in enumerate(weights) if not w.any()]
        if empty:
            raise AgdError(f"roi_mask selects no prompt token in row(s) {empty}")
        return [[Region("mask", w)] for w in weights], [None] * len(seqs)
    if roi is None:
        raise AgdError("AGD needs a region of interest: pass roi_mask= (e.g. from agdecode.hf.prepare) or roi=")
    if tokenizer is None:
        raise AgdError("roi= needs the tokenizer, which transformers does not pass to a custom_generate callable: "
                       "use agdecode.hf.generate(model, ..., tokenizer=tok), custom_generate=PATH_OR_HUB_ID, or "
                       "roi_mask=")
    specs = list(roi) if isinstance(roi, (list, tuple)) else [roi]
    if messages is not None:
        _, convs = as_conversations(messages)
        if len(convs) != len(seqs):
            raise AgdError(f"messages has {len(convs)} conversations for a batch of {len(seqs)}")
        prompts = [render_prompt(tokenizer, c) for c in convs]
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            if p.input_ids[0].tolist() != s.tolist():
                raise AgdError(f"row {i}'s input_ids are not messages[{i}] rendered with the chat template "
                               "(add_generation_prompt=True); render them with agdecode.hf.prepare or pass roi_mask=")
    else:
        prompts = [_decoded_prompt(tokenizer, s) for s in seqs]
    try:
        return [[resolve_region(r, p, model) for r in specs] for p in prompts], prompts
    except ROIError as e:
        if messages is None:
            raise AgdError(f"{e} Pass messages= (the conversation(s) input_ids were rendered from) or roi_mask=.") from e
        raise


def _decoded_prompt(tokenizer, ids: torch.Tensor) -> Prompt:
    """The prompt as its decoded text, with character offsets when re-tokenising the text gives the same ids."""
    text = tokenizer.decode(ids.tolist())
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = ([tuple(o) for o in enc["offset_mapping"]] if enc["input_ids"] == ids.tolist()
               else [(0, 0)] * len(ids))  # chars: ROIs then select nothing and say so
    return Prompt(text, ids[None], offsets)


def _processors(processors, gen) -> list:
    names = [type(p).__name__ for p in processors]
    if "UnbatchedClassifierFreeGuidanceLogitsProcessor" in names:
        raise AgdError("guidance_scale (classifier-free guidance) runs its own model passes; it cannot be combined with AGD")
    dropped = [n for n in names if n in _WARPERS]
    if dropped:
        warnings.warn(f"AGD decodes deterministically: the sampling settings ({', '.join(dropped)}) are ignored",
                      stacklevel=3)
    return [p for p in processors if type(p).__name__ not in _WARPERS]


def _for_row(p, i: int, pad: int):
    """A copy of processor ``p`` for row ``i``, which is called on that row's tokens without its ``pad`` padding."""
    q = copy.copy(p)
    ignore = getattr(p, "prompt_ignore_length", None)  # recent transformers: each row's padding length
    if isinstance(p, lp.RepetitionPenaltyLogitsProcessor) and ignore is not None:
        ignore = int(ignore[i]) if isinstance(ignore, torch.Tensor) else int(ignore)
        q.prompt_ignore_length = max(0, ignore - pad)
    elif isinstance(p, lp.MinLengthLogitsProcessor):
        q.min_length = p.min_length - pad
    elif isinstance(p, lp.MinNewTokensLengthLogitsProcessor):
        q.prompt_length_to_skip = p.prompt_length_to_skip - pad
    elif isinstance(p, lp.ForcedEOSTokenLogitsProcessor):
        q.max_length = p.max_length - pad
    elif isinstance(p, lp.ExponentialDecayLengthPenalty):
        q.regulation_start = p.regulation_start - pad
    elif isinstance(p, lp.SuppressTokensAtBeginLogitsProcessor):
        q.begin_index = p.begin_index - pad
    elif isinstance(p, lp.PrefixConstrainedLogitsProcessor):
        fn = p._prefix_allowed_tokens_fn
        q._prefix_allowed_tokens_fn = lambda _, sent: fn(i, sent)  # the row's own batch id
    return q


class _PerRow:
    """transformers' processors, one adjusted copy per row, given to each row's job (the decoding
    loop calls a job's processors on that row's own tokens); also keeps each row's logits and
    scores when ``generate`` asked for them."""

    def __init__(self, processors: list, jobs: list[Job], pads: list[int], keep_scores: bool, keep_logits: bool):
        self.kept = {"scores": {} if keep_scores else None, "logits": {} if keep_logits else None}
        for i, (job, pad) in enumerate(zip(jobs, pads)):
            job.processors = [functools.partial(self._row, i, LogitsProcessorList(_for_row(p, i, pad)
                                                                                  for p in processors))]

    def _row(self, i: int, processors, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.kept["logits"] is not None:
            self.kept["logits"].setdefault(i, []).append(scores[0].detach().clone())
        scores = processors(input_ids, scores)
        if self.kept["scores"] is not None:
            self.kept["scores"].setdefault(i, []).append(scores[0].detach().clone())
        return scores

    def stacked(self, name: str, jobs: list, n: int) -> tuple | None:
        """``generate``'s tuple of ``n`` tensors ``(B, V)``; rows that had finished hold ``-inf``."""
        kept = self.kept[name]
        if kept is None:
            return None
        first = next(iter(kept.values()))[0]
        out = []
        for t in range(n):
            step = torch.full((len(jobs), first.shape[-1]), float("-inf"), dtype=first.dtype, device=first.device)
            for i in range(len(jobs)):
                if t < len(kept.get(i, [])):
                    step[i] = kept[i][t]
            out.append(step)
        return tuple(out)
