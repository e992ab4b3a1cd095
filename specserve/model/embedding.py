"""A quantized GGUF embedding kept as the file's rows, dequantized on lookup.

A float32 copy of Qwen2.5-Coder-1.5B's 151,936 x 1,536 embedding is 933 MB, for a forward
that reads a handful of rows. ``EmbeddingRows`` keeps the tensor's bytes (memory-mapped from
the GGUF file, 131 MB of page cache) and dequantizes the rows a forward asks for with the
``gguf`` package's reference dequantizer, so the values are exactly the file's, as in the
float32 copy (tested).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

# Rows dequantized at a time when the whole table is asked for (bounded temporaries).
DENSE_CHUNK_ROWS = 8192


class EmbeddingRows:
    """``[V, C]`` embedding rows from raw GGUF rows ``[V, bytes_per_row]`` of ``qtype``."""

    def __init__(self, raw: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> None:
        self.raw = raw
        self.qtype = qtype
        self.shape = (raw.shape[0], cols)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [...]`` int64 -> float32 ``[..., C]``."""
        ids = tokens.reshape(-1).cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"token id outside the embedding's {self.shape[0]} rows")
        rows = dequantize(self.raw[ids], self.qtype).astype(np.float32, copy=False)
        return torch.from_numpy(rows).reshape(*tokens.shape, self.shape[1])

    def dense(self) -> torch.Tensor:
        """The whole table in float32 (for code that needs every row, e.g. EAGLE heads)."""
        table = torch.empty(self.shape, dtype=torch.float32)
        for start in range(0, self.shape[0], DENSE_CHUNK_ROWS):
            stop = min(start + DENSE_CHUNK_ROWS, self.shape[0])
            table[start:stop] = torch.from_numpy(dequantize(self.raw[start:stop], self.qtype))
        return table
