"""Where next-token logits come from: the one protocol shared by attribution engines and baselines.

The decoding loop drives a :class:`Source` over a *batch* of sequences that changes as it runs:
``prefill`` adds sequences (at the start, or while others are decoding), ``step`` appends one token
to every live sequence, ``keep`` drops the finished ones. Each call returns next-token logits
``(B, V)`` in the order of the live sequences. A source may also score candidates (``scores``:
attribution engines), say what it computed (``info``: baselines) and keep relevance maps
(``relevance``: the reverse engine); the defaults say "nothing", so the loop never asks ``hasattr``.

Sequences of different lengths share one KV cache, left-padded, with a 2-D attention mask and
explicit position ids (:class:`KVBatch`, as ``model.generate`` batches). A source may give each
sequence several cache rows (``width``): the forward engine 1 + R (primal and one tangent per ROI),
CAD 2 (the prompt with and without its ROI). Dropping a sequence removes its rows from the cache.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Generator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models import forward_cached, input_device

__all__ = ["Row", "Source", "KVBatch", "CachedForward", "left_pad", "prefill_groups", "drain"]


def drain(gen: Generator):
    """Run a generator to its end; return its return value (a chunked prefill run in one go).

    Example:
        >>> logits = drain(source.prefill_iter(rows))      # = source.prefill(rows)
    """
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


@dataclass
class Row:
    """One sequence to decode, as a source needs it.

    ``token_weights`` ``(R, T)`` and ``head_weights`` ``(R, layers, heads)`` are the ROIs of an
    attribution engine; ``negative_ids`` ``(T',)`` is CAD's prompt without its ROI.
    """

    input_ids: torch.Tensor                       # (T,)
    token_weights: torch.Tensor | None = None     # (R, T)
    head_weights: torch.Tensor | None = None      # (R, L, H)
    negative_ids: torch.Tensor | None = None      # (T',)


def left_pad(seqs: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors ``(..., T_i)`` into ``(n, ..., T)`` padded on the left; return it and the mask ``(n, T)``.

    Example:
        >>> left_pad([torch.tensor([1, 2]), torch.tensor([3])])
        (tensor([[1, 2], [0, 3]]), tensor([[1, 1], [0, 1]]))
    """
    t = max(s.shape[-1] for s in seqs)
    padded = torch.stack([F.pad(s, (t - s.shape[-1], 0), value=value) for s in seqs])
    mask = torch.stack([F.pad(torch.ones(s.shape[-1], dtype=torch.long), (t - s.shape[-1], 0)) for s in seqs])
    return padded, mask


def prefill_groups(device: torch.device, n: int) -> list[slice]:
    """The groups of consecutive sequences, out of ``n`` being added, that one prefill pass runs together.

    On a CPU each sequence runs alone, at its own length: a left-padded batch computes every padding
    position too (prompts of 256-512 tokens: a quarter of the work), while the matrices of one
    sequence's chunk are already large enough to run the CPU at full speed. A GPU wants the largest
    kernels it can get: one group.

    Example:
        >>> prefill_groups(torch.device("cpu"), 3)
        [slice(0, 1, None), slice(1, 2, None), slice(2, 3, None)]
    """
    size = 1 if device.type == "cpu" else max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


@functools.cache
def _growing_cache_class() -> type:
    """A ``DynamicCache`` whose layers append into spare room (``_GrowingLayer``); defined on first
    use, so importing this module does not import transformers' cache code."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # start-up: ~10 ms, see the docstring

    class _GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new keys and values into spare columns of a buffer.

        ``DynamicLayer`` concatenates: every decode step copies the whole cache into a fresh tensor
        (measured on SmolLM2, batch 16 with two rows per sequence, 512-token prompts: 30 layers x 2 x
        13 MB per step, three quarters of a decode step). Here ``keys``/``values`` are views of a
        buffer with room for a quarter more columns (at least 64), reallocated when full.
        ``replace`` (:meth:`KVBatch.keep`, :meth:`KVBatch.merge`) frees the buffers at once; keys or values
        replaced any other way are copied into a new buffer at the next append. Under gradients it
        concatenates, as ``DynamicLayer`` does. Not for callers that crop and then append while
        holding older, longer views (assisted generation; nothing here does): the append writes
        over columns such a view still shows.
        """

        reserve = 0  # columns of the first buffer, at least (set by ``_GrowingCache``)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or key_states.requires_grad or value_states.requires_grad:
                return super().update(key_states, value_states, *args, **kwargs)
            self.keys = self._append(self.keys, key_states, "_key_buffer")
            self.values = self._append(self.values, value_states, "_value_buffer")
            return self.keys, self.values

        def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """New keys and values (other rows or columns); the old buffers are freed now, not at the next append."""
            self.keys, self.values = keys, values
            self._key_buffer = self._value_buffer = None

        def _append(self, old: torch.Tensor, new: torch.Tensor, name: str) -> torch.Tensor:
            buf = getattr(self, name, None)
            n, t = (old.shape[-2] if old.numel() else 0), new.shape[-2]
            fits = (buf is not None and n and old.data_ptr() == buf.data_ptr() and old.stride() == buf.stride()
                    and old.shape[:-2] == buf.shape[:-2] and n + t <= buf.shape[-2])
            if not fits:  # first append, full, or replaced from outside: a new buffer with room to spare
                setattr(self, name, None)  # the old buffer goes now (``old`` keeps what is still needed)
                # The reserve when it holds them: a prefill then keeps one buffer of one shape however
                # its prompt was split (a prefix reused from a PrefixCache computes bit for bit the same).
                cap = self.reserve if n + t <= self.reserve else n + t + max(64, (n + t) // 4)
                buf = new.new_empty(*new.shape[:-2], cap, new.shape[-1])   # (N, H, cap, d)
                if n:
                    buf[..., :n, :] = old
                setattr(self, name, buf)
            buf[..., n:n + t, :] = new
            return buf[..., :n + t, :]

    class _GrowingCache(DynamicCache):
        """``reserve``: columns each layer's first buffer holds (a chunked prefill's whole prompt, so
        its chunks append without moving the cache: measured on a 2048-token prompt, the moves were
        7 % of the forward engine's prefill)."""

        def __init__(self, reserve: int = 0):
            Cache.__init__(self, layer_class_to_replicate=_GrowingLayer)
            self.reserve = reserve

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            while len(self.layers) <= layer_idx:  # layers are created on first use; they learn the reserve
                self.layers.append(_GrowingLayer())
                self.layers[-1].reserve = self.reserve
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return _GrowingCache


class KVBatch:
    """Cache rows of left-padded sequences: the KV cache, a 2-D mask ``(N, S)`` and next positions ``(N,)``.

    Sequences are added by a prefill into a fresh cache that is then merged (both sides left-padded
    to the longer one), so new sequences can join a batch that is decoding. A
    ``DynamicCache`` without sliding-window layers (one that appends in place, see
    ``_growing_cache_class``) keeps every layer's keys aligned column by column,
    which the merge and the trimming of dead padding rely on; sliding-window attention still comes
    from the mask.

    Example:
        >>> kv = KVBatch(model)
        >>> out = kv.prefill(embeds, mask)          # (n, T, D), (n, T)
        >>> out = kv.step(next_embeds)              # (N, 1, D)
        >>> kv.keep(torch.tensor([0, 2]))           # rows to keep
    """

    def __init__(self, model: nn.Module, prefill_chunk: int | None = None):
        self.model = model
        self.device = input_device(model)
        self.prefill_chunk = prefill_chunk
        self.cache = None
        self.mask: torch.Tensor | None = None  # (N, S) 1 = real token
        self.extra: dict = {}                  # keywords for every forward (e.g. output_hidden_states)

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _forward(self, cache, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        out, cache = forward_cached(self.model, cache, inputs_embeds=embeds, attention_mask=mask,
                                    position_ids=positions, logits_to_keep=1, **self.extra)
        return out, cache

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor):
        """Run new rows ``(n, T, D)`` with mask ``(n, T)`` and add them to the batch; returns the last output."""
        out, part = self.run(embeds, mask)
        self.merge([part])
        return out

    def run(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: tuple[list, int] | None = None):
        """Run new rows ``(n, T, D)`` with mask ``(n, T)`` into a cache of their own; returns the last
        output and the part (cache, mask) for :meth:`merge`, which adds it to the batch.

        ``prefix`` ``(layers, P)``: the keys and values of the first ``P`` positions (a multiple of
        ``prefill_chunk``, from a :class:`~agdecode.prefix_cache.PrefixCache`), which are then not computed."""
        return drain(self.run_iter(embeds, mask, prefix))

    def run_iter(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: tuple[list, int] | None = None,
                 context=contextlib.nullcontext) -> Generator[None, None, tuple]:
        """:meth:`run`, one chunk at a time: pauses (yields) between chunks, returns what ``run`` returns.
        Each chunk's forward runs inside ``context()`` (the engine's model patches, held only that long),
        so the batch may decode steps in between (:meth:`Decoder.advance`)."""
        mask = mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)        # left padding: each row counts from its first token
        # Room for the whole prompt and some generated tokens from the start.
        cache, out = _growing_cache_class()(reserve=embeds.shape[1] + 64), None
        chunk = self.prefill_chunk or embeds.shape[1]
        first = 0
        if prefix is not None:
            layers, first = prefix
            for i, (k, v) in enumerate(layers):
                cache.update(k.to(self.device), v.to(self.device), i)
        # Chunked prefill bounds the attention matrices (and their tangents) to chunk x T.
        starts = range(first, embeds.shape[1], chunk)
        for start in starts:
            if start > first:
                yield  # between chunks, never after the last: its output is read before anything else runs
            end = start + chunk
            with context():
                out, cache = self._forward(cache, embeds[:, start:end], mask[:, :end], positions[:, start:end])
        return out, (cache, mask)

    def step(self, embeds: torch.Tensor):
        """Append one token to every row: ``embeds`` ``(N, 1, D)``."""
        positions = self.mask.sum(1, keepdim=True)           # (N, 1): the next position of each row
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out, self.cache = self._forward(self.cache, embeds, self.mask, positions)
        return out

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (indices); padding columns no row needs any more are cut."""
        rows = rows.to(self.device)
        self.mask = self.mask[rows]
        dead = int((self.mask.sum(0) == 0).int().cumprod(0).sum())  # leading columns that are padding in every row
        self.mask = self.mask[:, dead:]
        for layer in self.cache.layers:
            # Slicing alone would keep the old storage alive: copy, so the freed rows' memory is released.
            layer.replace(layer.keys[rows, :, dead:].contiguous(), layer.values[rows, :, dead:].contiguous())

    def merge(self, parts: Sequence[tuple]) -> None:
        """Add the rows of :meth:`run` parts ``(cache, mask)`` to the batch, in order, with one copy:
        every part and the batch are left-padded to the longest of them."""
        if self.cache is not None and len(self):
            parts = [(self.cache, self.mask), *parts]
        if len(parts) == 1:
            self.cache, self.mask = parts[0]
            return
        s = max(m.shape[1] for _, m in parts)
        for i, layer in enumerate(parts[0][0].layers):
            layer.replace(*(torch.cat([F.pad(getattr(c.layers[i], name), (0, 0, s - m.shape[1], 0)) for c, m in parts])
                            for name in ("keys", "values")))
            for c, _ in parts[1:]:  # freed layer by layer: the peak stays near one copy of the cache
                c.layers[i].replace(None, None)
        self.cache, self.mask = parts[0][0], torch.cat([F.pad(m, (s - m.shape[1], 0)) for _, m in parts])

    def clear(self) -> None:
        self.cache, self.mask = None, None


class Source:
    """Base of every logits source: the protocol the decoding loop drives (see the module docstring).

    Subclasses implement ``prefill``, ``step`` and ``keep``; engines add ``scores``. Use as a
    context manager around a generation (engines hold module overrides for its duration).
    """

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        """Add sequences; return their next-token logits ``(n, V)``."""
        raise NotImplementedError

    def prefill_iter(self, rows: Sequence[Row]) -> Generator[None, None, torch.Tensor]:
        """:meth:`prefill` in pieces: a generator that pauses (yields) between pieces of work, during
        which the live sequences may ``step`` and ``keep``; it returns the logits when the sequences
        have joined. This default does the whole prefill in one piece."""
        return self.prefill(rows)
        yield  # noqa: unreachable; makes this a generator

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append ``token_ids`` ``(B,)`` to the live sequences; return next-token logits ``(B, V)``."""
        raise NotImplementedError

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the live sequences at ``index`` (in this order); the others are freed."""
        raise NotImplementedError

    def scores(self, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """ROI scores ``(n, R, k)`` of candidates ``(n, k)`` of the live sequences at ``index``."""
        raise NotImplementedError(f"{type(self).__name__} does not attribute")

    def relevance(self, i: int, j: int = 0) -> list[float] | None:
        """Per-token relevance of candidate ``j`` of live sequence ``i`` at its last scoring (reverse engine)."""
        return None

    def info(self, i: int) -> dict | None:
        """What the method computed for live sequence ``i`` at the current step (JSON-serialisable)."""
        return None

    def describe(self) -> dict | None:
        """The method's settings as resolved for this model (JSON-serialisable)."""
        return None

    def use_prefix_cache(self, cache) -> None:
        """Reuse prompt prefixes' KV from ``cache`` (a :class:`~agdecode.prefix_cache.PrefixCache`) in
        later prefills, and keep theirs there. A source that cannot reuse them ignores it."""


class CachedForward(Source):
    """Plain KV-cached next-token logits for a batch, exactly as ``model.generate`` computes them.

    Also keeps each live sequence's token ids (``ids``), which baselines and the reverse engine need.

    Example:
        >>> with CachedForward(model) as lm:
        ...     logits = lm.prefill([Row(ids1), Row(ids2)])       # (2, V)
        ...     logits = lm.step(logits.argmax(-1))               # (2, V)
    """

    width = 1  # cache rows per sequence

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = input_device(model)
        self.kv = KVBatch(model)
        self.ids: list[torch.Tensor] = []  # each live sequence's tokens so far (prompt + generated)

    def __exit__(self, *exc) -> None:
        self.kv.clear()
        self.ids = []

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def _logits(self, out, start: int) -> torch.Tensor:
        """Next-token scores ``(n, V)`` of the sequences in ``out``: the live sequences from position
        ``start`` on (0 for a step; a prefill's new ones follow those already live). Sources that keep
        per-sequence state (CAD, DoLa, steering) keep theirs for positions ``:start`` and replace the rest."""
        return out.logits[:, -1]

    def _rows(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """The token ids of each cache row of these sequences (``width`` per sequence)."""
        return [r.input_ids for r in rows]

    @torch.no_grad()
    def prefill(self, rows: Sequence[Row]) -> torch.Tensor:
        live = len(self.ids)
        self.ids += [r.input_ids.to(self.device) for r in rows]
        parts, logits = [], []
        # In prefill_groups: on a CPU each sequence alone, at its own length, as the forward engine does.
        for group in prefill_groups(self.device, len(rows)):
            ids, mask = left_pad([t.to(self.device) for t in self._rows(rows[group])])
            out, part = self.kv.run(self._embed(ids), mask)
            parts.append(part)
            logits.append(self._logits(out, live + group.start))
        self.kv.merge(parts)
        return torch.cat(logits)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids = token_ids.to(self.device)
        self.ids = [torch.cat([s, t[None]]) for s, t in zip(self.ids, token_ids)]
        out = self.kv.step(self._embed(token_ids.repeat_interleave(self.width)[:, None]))
        return self._logits(out, 0)

    def keep(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.ids = [self.ids[i] for i in index.tolist()]
        w = self.width
        self.kv.keep((index[:, None] * w + torch.arange(w, device=self.device)).flatten())
