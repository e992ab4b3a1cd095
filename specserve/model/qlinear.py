"""``PackedLinear``: a linear layer computed by the native kernels on packed GGUF blocks.

The extension (``specserve.model._native``, built from ``native/`` by the package's own
build) is optional: ``native_available()`` says whether it loaded, and the loader falls back
to the PyTorch formats when it did not. Inputs are float32; each row is quantized to int8 per
block of 32 inside the kernel, and every output row is bit-identical whatever else is in the
batch (see native/qmatmul.cpp).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from specserve.model.packing import Packed

_native: ModuleType | None
try:
    from specserve.model import _native  # type: ignore[attr-defined,no-redef]
except ImportError:  # not compiled on this machine: the PyTorch formats still work
    _native = None

# Force a slower kernel path (avx2 or generic), as a machine without AVX-512 would run it
# (on 64-bit Arm: neon, the dot-product path, or generic).
ISA_ENV = "SPECSERVE_NATIVE_ISA"
_isa_env_applied = False


def _apply_isa_env(native: ModuleType) -> None:
    """``$SPECSERVE_NATIVE_ISA``, applied when the kernels are first asked for: a value this
    CPU cannot run is a clear error for the command that needs the kernels, not a traceback
    at import for every command."""
    global _isa_env_applied
    value = os.environ.get(ISA_ENV, "")
    if value:
        try:
            native.set_isa(value)
        except ValueError as exc:
            runs = ", ".join(native.supported_isas())
            raise ValueError(f"{ISA_ENV}={value}: {exc}; this CPU runs: {runs}") from None
    _isa_env_applied = True


def native_available() -> bool:
    return _native is not None


def native_module() -> ModuleType:
    if _native is None:
        raise RuntimeError(
            "the native kernels were not built on this machine; reinstall the package with a "
            "C++ compiler present (`pip install -e .`), or choose --dtype int4 / bfloat16"
        )
    if not _isa_env_applied:
        _apply_isa_env(_native)
    return _native


def kernel_path() -> str:
    """The native kernels' path on this CPU (``avx512``, ``avx2``, ``neon`` or ``generic``), as the
    logs and ``generate``'s statistics name it."""
    return str(native_module().isa())


def kernels_summary() -> str:
    """The native kernels in one line, for ``specserve models``: the path this CPU runs and
    the ones it could, or why none runs."""
    if _native is None:
        return (
            "not built: GGUF models run in PyTorch's int4 format instead (reinstall with a C++ "
            "compiler present: pip install -e .)"
        )
    try:
        isa = kernel_path()
    except ValueError as exc:  # a $SPECSERVE_NATIVE_ISA this CPU cannot run
        return str(exc)
    runs = ", ".join(_native.supported_isas())
    slow = "; the portable path is several times slower" if isa == "generic" else ""
    return f"native, {isa} path on this CPU (it runs: {runs}){slow}"


def set_threads(threads: int) -> None:
    """Threads per native matmul (the caller's thread is one of them)."""
    if _native is not None:
        _native.set_threads(threads)


def park_threads() -> None:
    """Let the native matmul's workers sleep at once (the model is idle), rather than spin
    for the next call for a few milliseconds, taking a core from whoever carries the answer
    out."""
    if _native is not None:
        _native.park()


def native_threads() -> int:
    return int(_native.threads()) if _native is not None else 0


class PackedLinear(torch.nn.Module):
    """Outputs of one or more packed tensors side by side (e.g. q, k and v fused).

    >>> layer = PackedLinear([pack(decompose(raw, qtype, 1536))])   # doctest: +SKIP
    >>> layer(torch.randn(3, 1536)).shape                          # doctest: +SKIP
    torch.Size([3, 256])
    """

    def __init__(self, parts: Sequence[Packed], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        native_module()
        self.in_features = parts[0].cols
        if any(p.cols != self.in_features for p in parts):
            raise ValueError("fused packed tensors must share their input width")
        self.out_features = sum(p.rows for p in parts)
        self.padded = sum(p.tiles * 16 for p in parts)
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        self._buffers_kept: list[torch.Tensor] = []
        specs = []
        col0 = 0
        for part in parts:
            q, s, d = (self._keep(a) for a in (part.q, part.s, part.d))
            specs.append((part.mode, part.qbits, q, s, d, part.tiles, col0))
            col0 += part.tiles * 16
        # Column ranges of the real outputs inside the padded result.
        self._real = [(spec[6], part.rows) for spec, part in zip(specs, parts, strict=True)]
        self.spec = tuple(specs)  # what _native.linear / layer_forward read

    def _keep(self, array: np.ndarray) -> int:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        self._buffers_kept.append(tensor)
        return int(tensor.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.empty(rows.shape[0], self.padded, dtype=torch.float32)
        native_module().linear(
            rows.data_ptr(), rows.shape[0], self.in_features, out.data_ptr(), self.padded,
            self.spec,
        )  # fmt: skip
        if self.padded != self.out_features:
            out = torch.cat([out[:, start : start + n] for start, n in self._real], dim=1)
        out = out.reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parts={len(self.spec)}"
