"""A lean GGUF reader: metadata as plain Python values, tensors as memory-mapped arrays.

The ``gguf`` package's ``GGUFReader`` parses every metadata item into numpy arrays of its
own: for Gemma 3's 262k-token vocabulary that is ~0.7 GB and ~10 s before any weight is
read, which would dominate peak memory while loading. This reader walks the same format
(GGUF v2/v3: header, key/values, tensor infos, aligned data) keeping values as Python
objects, and takes the type enums and block sizes from ``gguf`` itself. The tests check it
against ``GGUFReader`` on every file they use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SIZE = struct.Struct("<Q")  # a string's length
# Unquantized types whose data the dequantizer takes as typed arrays, not raw bytes.
_TYPED = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file (truncated, corrupt, unknown version)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``shape`` in GGML order (``shape[0]`` is the row length)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    # [rows, row length] float32/float16 for F32/F16, else [rows, bytes per row] uint8;
    # 1-D tensors are 1-D. A read-only view of the memory map.
    data: np.ndarray


class _Cursor:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.pos = 0

    def take(self, size: int) -> memoryview:
        end = self.pos + size
        if end > len(self.buffer):
            raise GGUFFormatError(f"truncated: needs byte {end}, file has {len(self.buffer)}")
        view = self.buffer[self.pos : end]
        self.pos = end
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8")

    def value(self, kind: int) -> Any:
        value_type = GGUFValueType(kind)
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == GGUFValueType.STRING:
            return self.string()
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if GGUFValueType(item_type) in _SCALARS:  # numeric arrays in one unpack
            fmt = _SCALARS[GGUFValueType(item_type)]
            return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * struct.calcsize(fmt))))
        if GGUFValueType(item_type) == GGUFValueType.STRING:
            return self.strings(count)
        return [self.value(item_type) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row: a vocabulary's ~150k tokens and merges each, so the
        loop is kept tight (a tenth of the time of `string` per item)."""
        buffer, pos, size_at = self.buffer, self.pos, _SIZE.unpack_from
        out: list[str] = []
        for _ in range(count):
            start = pos + 8
            pos = start + size_at(buffer, pos)[0]
            if pos > len(buffer):
                raise GGUFFormatError(f"truncated: needs byte {pos}, file has {len(buffer)}")
            out.append(str(buffer[start:pos], "utf-8"))
        self.pos = pos
        return out


class GGUFFile:
    """Metadata (``{key: value}``) and tensors (``{name: GGUFTensor}``) of one GGUF file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        cursor = _Cursor(self._map.data)
        try:
            if bytes(cursor.take(4)) != GGUF_MAGIC:
                raise GGUFFormatError("not a GGUF file (bad magic)")
            version = cursor.scalar("<I")
            if version not in (2, 3):
                raise GGUFFormatError(f"unsupported GGUF version {version}")
            tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
            self.metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cursor.string()
                self.metadata[key] = cursor.value(cursor.scalar("<I"))
            infos = []
            for _ in range(tensor_count):
                name = cursor.string()
                dims = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
                infos.append(
                    (name, dims, GGMLQuantizationType(cursor.scalar("<I")), cursor.scalar("<Q"))
                )
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise GGUFFormatError(str(exc)) from None
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = {
            name: self._tensor(name, dims, qtype, data_start + offset)
            for name, dims, qtype, offset in infos
        }

    def _tensor(
        self, name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType, start: int
    ) -> GGUFTensor:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims)) if dims else 1
        nbytes = count // block_elems * block_bytes
        if start + nbytes > len(self._map):
            raise GGUFFormatError(
                f"truncated: tensor {name} ends at byte {start + nbytes}, "
                f"the file has {len(self._map)}"
            )
        raw = self._map[start : start + nbytes]
        if qtype in _TYPED:
            data = raw.view(_TYPED[qtype]).reshape(tuple(reversed(dims)))
        else:
            rows = count // dims[0] if dims else 1
            data = raw.reshape(rows, nbytes // rows) if len(dims) > 1 else raw
        return GGUFTensor(name, dims, qtype, data)
