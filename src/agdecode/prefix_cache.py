"""Prefix reuse: the KV cache of prompt prefixes, kept across prefills and requests.

The AGD counterpart of vLLM's automatic prefix caching. A shared system prompt, a conversation's
earlier turns or a document set re-sent with every question all start with the same tokens; their
keys and values (the primal rows and, for the forward engine, the tangent rows) need computing once.

Exact by construction. Causal attention makes position t's keys and values a function of tokens
``0..t`` only, and the tangent rows a function of the ROI weights over ``0..t`` too; so an entry
serves a prompt for as many leading positions as both agree on. The reused length is a multiple of
the source's prefill chunk: the rest of the prompt is then computed in exactly the chunks a prefill
without reuse computes, on exactly the same cached keys, and on a CPU (one prompt per pass) the
outputs are bit-for-bit the same (tests/test_prefix_cache.py). ``space`` holds what else must
match (the source, its rows per sequence, attribution, head ROIs, dtype, model and the version of
its weights, attention implementation, chunk size).

Entries are kept least-recently-used first out within ``max_bytes`` (the keys and values held).

Example:
    >>> cache = PrefixCache(max_bytes=2**30)
    >>> agdecode.generate(model, tok, [conv1, conv2, conv3], prefix_cache=cache)   # one system prompt
    >>> cache.stats()["hits"], cache.stats()["tokens_reused"]
    (2, 512)
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .checks import is_int
from .errors import AgdError

__all__ = ["PrefixCache"]

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (rows, heads, P, head_dim)


@dataclass
class _Entry:
    space: tuple
    ids: torch.Tensor                 # (P,) the prefix's tokens, on the CPU
    weights: torch.Tensor | None      # (R, P) ROI weights over them (None: the source has no tangents)
    heads: torch.Tensor | None        # (R, L, H) head ROI weights (they seed every position)
    layers: Layers
    nbytes: int


def _agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading columns (last dimension) ``a`` and ``b`` agree on (up to the shorter)."""
    n = min(a.shape[-1], b.shape[-1])
    if n == 0:
        return 0
    same = (a[..., :n] == b[..., :n]).reshape(-1, n).all(0)            # (n,)
    return n if bool(same.all()) else int((~same).int().argmax())


class PrefixCache:
    """A bounded LRU of prompt prefixes' KV caches, shared by the prefills that use it (thread-safe).

    ``max_bytes``: the most keys and values it holds (a prompt larger than that keeps the blocks that fit).
    Counters for monitoring: :meth:`stats`.

    Example:
        >>> cache = PrefixCache(max_bytes=512 * 2**20)
        >>> agdecode.generate(model, tok, conversations, prefix_cache=cache)
    """

    def __init__(self, max_bytes: int = 1 << 30):
        if not is_int(max_bytes) or max_bytes < 0:
            raise AgdError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache (``if cache:`` must not skip it)
        return True

    def stats(self) -> dict:
        """Counters: ``entries``, ``bytes``, ``hits``, ``misses``, ``tokens_reused``, ``evictions``."""
        return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "tokens_reused": self.tokens_reused, "evictions": self.evictions}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def lookup(self, space: tuple, ids: torch.Tensor, weights: torch.Tensor | None, heads: torch.Tensor | None,
               block: int) -> tuple[Layers, int] | None:
        """The longest reusable prefix of a prompt ``ids`` ``(T,)``: ``(layers, n)``, ``n`` a multiple of
        ``block`` below ``T`` (a prompt's last token is always computed: its logits are needed). None: no entry serves it."""
        ids = ids.cpu()
        weights = None if weights is None else weights.cpu().float()
        best, best_n = None, 0
        with self._lock:
            for key, e in self._entries.items():
                n = _shared(e, space, ids[:-1], weights, heads)
                n -= n % block
                if n > best_n:
                    best, best_n = key, n
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            self.tokens_reused += best_n
            return [(k[:, :, :best_n], v[:, :, :best_n]) for k, v in self._entries[best].layers], best_n

    def store(self, space: tuple, ids: torch.Tensor, weights: torch.Tensor | None, heads: torch.Tensor | None,
              layers: Layers, block: int) -> None:
        """Keep the first whole blocks of a prefilled prompt: ``ids`` ``(T,)``, ``layers`` its keys and
        values over those ``T`` positions (copied here as far as they are kept)."""
        n = (len(ids) // block) * block
        # Its size before anything is dropped for it; a prefix too large for the whole cache keeps
        # the blocks that fit (the shared system prompt at its start is what later prompts reuse).
        per_position = sum((k[:, :, :1].nbytes + v[:, :, :1].nbytes) for k, v in layers)
        n = min(n, (self.max_bytes // max(per_position, 1)) // block * block)
        if n == 0:
            return
        ids = ids[:n].cpu()
        weights = None if weights is None else weights[:, :n].cpu().float()
        heads = None if heads is None else heads.cpu()
        with self._lock:
            for key, e in list(self._entries.items()):  # an entry this one covers goes; one covering it stays
                m = _shared(e, space, ids, weights, heads)
                if m >= len(ids):
                    self._entries.move_to_end(key)
                    return
                if m >= len(e.ids):
                    self._drop(key)
        kept = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in layers]
        nbytes = sum(k.nbytes + v.nbytes for k, v in kept)
        with self._lock:
            while self._entries and self.nbytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[self._next] = _Entry(space, ids, weights, heads, kept, nbytes)
            self._next += 1
            self.nbytes += nbytes

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def _shared(e: _Entry, space: tuple, ids: torch.Tensor, weights: torch.Tensor | None,
            heads: torch.Tensor | None) -> int:
    """How many leading positions of a prompt (``ids``, ROI ``weights``) entry ``e`` holds exactly."""
    if e.space != space or not _same(e.heads, heads):
        return 0
    n = _agree(e.ids, ids)
    return min(n, _agree(e.weights, weights[:, :n])) if weights is not None and n else n


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a.cpu() == b.cpu()).all())
