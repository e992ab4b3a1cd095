"""Linear layers in the execution formats the runtime offers.

- ``DenseLinear``: float32 or bfloat16 weights through ``F.linear``.
- ``Int4Linear``: GGUF 4-bit groups run by PyTorch's CPU int4 kernel, which streams a quarter
  of bf16's bytes; on this 2-core machine it is ~5x faster per step. Its rows are computed
  independently of how many rows are batched, so a k-token verify forward gives bit-identical
  results to k single steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.model.quant import GROUP_SIZE, Int4Groups

# innerKTiles of the int4 packing; the CPU kernel ignores it but the op requires it.
_INNER_K_TILES = 2


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int4Linear(torch.nn.Module):
    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q = torch.from_numpy(groups.q).to(torch.int32)  # [out, in]
        self.out_features, self.in_features = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        self.register_buffer("packed", packed)
        # [in // 32, out, 2]: the kernel's layout of (scale, zero) per group and output row.
        scales_zeros = torch.stack(
            [torch.from_numpy(groups.scale), torch.from_numpy(groups.zero)], dim=-1
        )
        self.register_buffer(
            "scales_zeros", scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), self.packed, GROUP_SIZE, self.scales_zeros
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
