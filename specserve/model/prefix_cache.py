"""Prompt prefixes reused across requests: the KV of recent prompts, found by their token ids.

Requests to one deployment often open alike: the chat template's system message, then a
fixed instruction ("Fix the bug in this function ...") before the part that changes; a chat's
next turn repeats the conversation so far. After a prompt's prefill, and again when its
request finishes (prompt and output), the engine keeps the keys and values of its positions
(and the target's features there, which EAGLE drafters read) in a byte-bounded,
least-recently-used store. A later prompt copies the KV of its longest common prefix with
any kept prompt into its own cache slot and prefills only the rest (at least its last token,
whose logits pick the first output token). vLLM's automatic prefix caching and llama.cpp's
``cache_prompt`` do the same.

Lossless: the kept KV are the very values a prefill of those tokens writes. Every row of a
forward computes the same bits whatever else is in the forward (the kernels' batch
invariance, tested in ``tests/unit/test_native_kernels.py``), and the suffix's attention
reads the prefix from the cache either way; ``tests/engine/test_prefix_cache.py`` checks
that outputs and logits are the same with and without a hit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Ids
from dataclasses import dataclass
from functools import cached_property

import torch

from specserve.model.kv_cache import KVCache

MIB = 1024 * 1024


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Segment:
    """Keys, values and target features of consecutive positions (copies, never changed)."""

    keys: torch.Tensor  # [layers, kv_heads, T, head_dim]
    values: torch.Tensor
    features: torch.Tensor  # [T, C]

    @property
    def length(self) -> int:
        return self.features.shape[0]


@dataclass
class CachedPrompt:
    """One kept prompt: its ids and its positions' KV and features, in segments. A prompt
    kept again with more tokens (its output, at the end of its request) shares the earlier
    segments and copies only the new positions."""

    token_ids: torch.Tensor  # [P] int64
    segments: list[Segment]

    @property
    def nbytes(self) -> int:
        parts = [self.token_ids] + [t for g in self.segments for t in (g.keys, g.values)]
        return _nbytes(*parts, *(g.features for g in self.segments))


@dataclass
class PrefixHit:
    """A lookup's result: the first ``length`` prompt positions come from ``entry``."""

    entry: CachedPrompt
    length: int

    @cached_property
    def features(self) -> torch.Tensor:
        """The target features ``[length, C]`` of the hit's positions."""
        segments = self.entry.segments
        whole = (
            segments[0].features
            if len(segments) == 1
            else torch.cat([g.features for g in segments])
        )
        return whole[: self.length]


@dataclass
class PrefixCacheStats:
    hits: int = 0
    reused_tokens: int = 0  # prompt tokens whose prefill a hit saved
    stored_bytes: int = 0


class PrefixCache:
    """Least-recently-used store of prompts' KV, bounded to ``budget_bytes`` (see module doc).

    Not thread-safe: each engine uses its own from its compute thread.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("the prefix cache's budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # oldest first
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: Ids[int]) -> PrefixHit | None:
        """The kept prompt sharing the longest prefix with ``prompt_ids``, that length capped
        at ``len(prompt_ids) - 1`` (the last prompt token is always forwarded)."""
        limit = len(prompt_ids) - 1
        if limit < 1 or not self._entries:
            return None
        ids = torch.tensor(prompt_ids[:limit], dtype=torch.int64)
        best_key, best = -1, 0
        for key, entry in self._entries.items():
            length = _common_prefix(ids, entry.token_ids)
            if length > best:
                best_key, best = key, length
        if best == 0:
            return None
        self._entries.move_to_end(best_key)
        self.stats.hits += 1
        self.stats.reused_tokens += best
        return PrefixHit(self._entries[best_key], best)

    def restore(self, hit: PrefixHit, cache: KVCache, slot: int) -> None:
        """Write the hit's keys and values into positions ``0 .. hit.length`` of ``slot``."""
        start = 0
        for segment in hit.entry.segments:
            n = min(segment.length, hit.length - start)
            if n <= 0:
                break
            cache.keys[:, slot, :, start : start + n] = segment.keys[:, :, :n]
            cache.values[:, slot, :, start : start + n] = segment.values[:, :, :n]
            start += n

    def store(
        self, prompt_ids: Ids[int], cache: KVCache, slot: int, features: torch.Tensor
    ) -> None:
        """Keep the KV of a prefilled prompt (all of ``slot``'s first ``len(prompt_ids)``
        positions) and its features ``[len(prompt_ids), C]``. A kept prompt that this one
        extends is replaced by it, sharing its segments; nothing is kept when a kept prompt
        already covers this one, or when it alone exceeds the budget."""
        n = len(prompt_ids)
        if n < 2 or features.shape[0] != n:
            return
        ids = torch.tensor(prompt_ids, dtype=torch.int64)
        keys, values = cache.keys[:, slot, :, :n], cache.values[:, slot, :, :n]
        if _nbytes(ids, keys, values, features) > self.budget_bytes:
            return
        shared: list[Segment] = []
        for key, kept in list(self._entries.items()):
            common = _common_prefix(ids, kept.token_ids)
            if common == n:  # already covered by a longer (or equal) kept prompt
                self._entries.move_to_end(key)
                return
            if common == kept.token_ids.numel():  # extended by this one: replaced
                if common > sum(g.length for g in shared):  # share the longest one's
                    shared = kept.segments
                self._drop(key)
        done = sum(g.length for g in shared)
        new = Segment(
            keys[:, :, done:].clone(), values[:, :, done:].clone(), features[done:].detach().clone()
        )
        entry = CachedPrompt(ids, [*shared, new])
        while self._entries and self.stats.stored_bytes + entry.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.stats.stored_bytes += entry.nbytes

    def _drop(self, key: int) -> None:
        self.stats.stored_bytes -= self._entries.pop(key).nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D id tensors.

    >>> _common_prefix(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5]))
    2
    >>> _common_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    2
    """
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n
