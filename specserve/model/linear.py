"""Linear layers in the execution formats the runtime offers.

- ``DenseLinear``: float32 or bfloat16 weights through ``F.linear``.
- ``Int4Linear``: GGUF 4-bit groups run by PyTorch's CPU int4 kernel, which streams a quarter
  of bf16's bytes; on this 2-core machine it is ~5x faster per step. Its rows are computed
  independently of how many rows are batched, so a k-token verify forward gives bit-identical
  results to k single steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from specserve.model.quant import GROUP_SIZE, Int4Groups

# CPU GEMM kernels take a different (GEMV-like) path below 4 rows, which sums in another
# order; padding to 4 rows makes every row's result independent of how many rows are
# batched, so a k-token verify forward equals k single-token steps bit for bit.
MIN_GEMM_ROWS = 4

# float32 GEMMs also sum in an order that changes with the row count above that, in the last
# bits: attention scores over heads of 128 or 256 (Qwen, Gemma 3) from 6-12 rows on, dense
# layers from 16 rows on (measured on an Intel Xeon VM, family 6 model 167). So float32
# products run as calls of exactly this many rows, each from a fresh zero-padded buffer:
# every row then goes through the same call, whatever else the forward carries.
FLOAT32_CALL_ROWS = 16

# innerKTiles of the int4 packing; the CPU kernel ignores it but the op requires it.
_INNER_K_TILES = 2


def matmul_rows_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` whose rows do not depend on how many rows ``a`` has, nor on what the other
    rows hold (see MIN_GEMM_ROWS and FLOAT32_CALL_ROWS). Leading dimensions broadcast."""
    rows = a.shape[-2]
    if a.dtype != torch.float32:
        return a @ b if rows >= MIN_GEMM_ROWS else _padded_call(a, b, MIN_GEMM_ROWS)
    if rows <= FLOAT32_CALL_ROWS:
        return _padded_call(a, b, FLOAT32_CALL_ROWS)
    # Separate calls: one batched call over the row blocks would be folded back into one
    # GEMM over all the rows (b is shared), which is the product this avoids.
    calls = range(0, rows, FLOAT32_CALL_ROWS)
    parts = [
        _padded_call(a[..., s : s + FLOAT32_CALL_ROWS, :], b, FLOAT32_CALL_ROWS) for s in calls
    ]
    return torch.cat(parts, dim=-2)


def _padded_call(a: torch.Tensor, b: torch.Tensor, call_rows: int) -> torch.Tensor:
    """``a @ b`` computed as one product of ``call_rows`` rows, ``a``'s rows copied into a
    fresh buffer (same layout and alignment in every call) with zeros below them."""
    rows = a.shape[-2]
    block = F.pad(a, (0, 0, 0, call_rows - rows)).contiguous()  # same layout in every call
    out = block @ b
    return out if rows == call_rows else out[..., :rows, :]


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        y = matmul_rows_exact(rows, self.weight.t())
        y = y.reshape(*shape[:-1], self.weight.shape[0])
        return y if self.bias is None else y + self.bias


class Int4Linear(torch.nn.Module):
    """A linear layer over ``rows`` output rows, built from 4-bit groups a block at a time
    (so a 262k-row LM head never exists as one int32 or float32 copy)."""

    def __init__(
        self, chunks: Iterable[Int4Groups], rows: int, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features = rows
        start = 0
        for groups in chunks:
            q = torch.from_numpy(groups.q)  # [chunk rows, in * input_repeats] uint8
            if start == 0:
                self.input_repeats = groups.input_repeats
                self.in_features = q.shape[1] // groups.input_repeats
                packed = torch.empty((rows, q.shape[1] // 2), dtype=torch.uint8)
                # [in // 32, out, 2]: the kernel's layout of (scale, zero) per group and row.
                scales_zeros = torch.empty((groups.scale.shape[1], rows, 2), dtype=torch.bfloat16)
            block = slice(start, start + q.shape[0])
            # The packing op wants int32 input; packed rows are independent of each other.
            packed[block] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), _INNER_K_TILES
            )
            scales_zeros[:, block, 0] = torch.from_numpy(groups.scale).t()
            scales_zeros[:, block, 1] = torch.from_numpy(groups.zero).t()
            start += q.shape[0]
        if start != rows:
            raise ValueError(f"int4 linear expected {rows} rows, got {start}")
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.input_repeats > 1:
            rows = rows.repeat(1, self.input_repeats)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, GROUP_SIZE, self.scales_zeros
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
