"""matmul_rows_exact: each row's product the same bits whatever else the call carries."""

from __future__ import annotations

import pytest
import torch

from specserve.model.linear import matmul_rows_exact

# (rows' width, columns, leading dimensions): a dense layer (1.5B's gate/up shape) and the
# attention scores of heads of 128 (Qwen2.5) and 256 (Gemma 3) against 576 / 640 keys, where
# plain float32 GEMMs summed 6 or 12 rows in another order than 4 on an Intel Xeon VM.
SHAPES = [(1536, 8960, ()), (128, 576, (1, 2)), (256, 640, (1, 1)), (64, 128, (2, 3))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("width", "columns", "lead"), SHAPES)
def test_rows_are_the_same_bits_alone_and_in_any_batch(
    dtype: torch.dtype, width: int, columns: int, lead: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(width + columns)
    a = torch.randn(*lead, 70, width, generator=generator).to(dtype)
    b = torch.randn(*lead, columns, width, generator=generator).to(dtype).transpose(-1, -2)
    alone = torch.cat([matmul_rows_exact(a[..., i : i + 1, :], b) for i in range(70)], dim=-2)
    for rows in (2, 4, 6, 8, 12, 16, 17, 21, 32, 33, 64, 70):
        assert torch.equal(matmul_rows_exact(a[..., :rows, :], b), alone[..., :rows, :]), rows
    # Rows that start mid-call elsewhere: the same bits too.
    assert torch.equal(matmul_rows_exact(a[..., 5:, :], b), alone[..., 5:, :])
    assert torch.allclose(alone.float(), (a @ b).float(), rtol=1e-2, atol=1e-2)
