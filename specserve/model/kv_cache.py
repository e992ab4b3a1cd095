"""A preallocated, position-indexed KV cache for a batch of sequences.

Each sequence owns a *slot* (a row of the cache). A forward writes the keys and values of
its new tokens at their positions; attention only reads positions up to the query's own,
so rolling back a rejected draft is just starting the next forward at a smaller position —
the stale entries are overwritten then (gpt-fast's ``KVCache.update`` idea).
"""

from __future__ import annotations

import numpy as np
import torch

from specserve.model.config import ModelConfig

# Attention reads keys in whole blocks of this many positions (masked past the query). The
# softmax and the probs @ values sums then run over a length that does not depend on how many
# queries a forward has: summation tails are where a k-token verify forward would otherwise
# round differently from k single steps. Trailing masked keys contribute exact zeros.
POSITION_BLOCK = 64


def round_up_to_block(length: int) -> int:
    return -(-length // POSITION_BLOCK) * POSITION_BLOCK


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros that cost nothing until written, on CPU: numpy's large zeroed arrays are the
    kernel's zero pages until touched, where ``torch.zeros`` writes every byte. A server's
    cache (8 slots x 4096 positions: 1.9 GB for the 1.5B coder model) then neither delays
    its start by seconds nor holds memory for positions no request has reached."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return torch.zeros(shape, dtype=dtype, device=device)
    count = int(np.prod(shape))
    flat = np.zeros(count + 16, np.float32)
    skip = (-flat.ctypes.data % 64) // 4  # start on a cache line, as torch's allocator does
    return torch.from_numpy(flat[skip : skip + count].reshape(shape))


class KVCache:
    """Keys/values of all layers: ``[layers, slots, kv_heads, max_len, head_dim]``."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        max_len = round_up_to_block(max_len)
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_len, config.head_dim)
        self.keys = _zeros(shape, dtype, device)
        self.values = _zeros(shape, dtype, device)
        self.num_slots = num_slots
        self.max_len = max_len

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy positions ``0 .. length`` of slot ``source`` into slot ``target`` (choices of
        one prompt share its prefill)."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]

    def update(
        self,
        layer: int,
        slots: list[int],
        starts: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
        read_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k``, ``v`` and return all keys/values up to ``read_len``.

        k, v: ``[B, kv_heads, T, head_dim]``; row ``b`` is written at positions
        ``starts[b] .. starts[b] + T`` of slot ``slots[b]`` (padding rows past the end of a
        sequence write harmless garbage that is never read).
        Returns keys and values ``[B, kv_heads, read_len, head_dim]``.
        """
        keys, values = self.keys[layer], self.values[layer]
        new = k.shape[2]
        for b, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            keys[slot, :, start : start + new] = k[b]
            values[slot, :, start : start + new] = v[b]
        if len(slots) == 1:
            slot = slots[0]
            return keys[slot : slot + 1, :, :read_len], values[slot : slot + 1, :, :read_len]
        index = torch.tensor(slots, device=keys.device)
        return keys[index, :, :read_len], values[index, :, :read_len]
