"""Weight sources: GGUF files and Hugging Face safetensors directories, never pickle.

Both present tensors under GGUF's names (``blk.N.attn_q.weight``...) in PyTorch's
``[out_features, in_features]`` order, so the model builder has one vocabulary. A source
hands out one tensor at a time, so peak memory while loading stays near the loaded model
plus its largest tensor in float32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from specserve.model.config import ModelConfig, config_from_gguf, config_from_hf
from specserve.model.errors import ModelLoadError
from specserve.model.gguf_file import GGUFFile, GGUFFormatError
from specserve.model.packed_cache import PackedCache
from specserve.model.packing import PACKED_TYPES, Packed, decompose, pack
from specserve.model.quant import INT4_TYPES, Int4Groups, int4_groups

# The types the loader accepts: what the issue requires plus what common GGUFs mix in.
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        [
            "F32",
            "F16",
            "BF16",
            "Q8_0",
            "Q4_0",
            "Q4_1",
            "Q5_0",
            "Q5_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
        ]
    )
)


# Large tensors are converted this many rows at a time, so peak memory while loading stays
# near the loaded model instead of several float32 copies of the largest tensor.
LOAD_CHUNK_ROWS = 4096


class WeightSource(Protocol):
    """Where a model's tensors come from."""

    path: Path
    config: ModelConfig
    metadata: dict[str, Any]

    def names(self) -> list[str]: ...

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to ``dtype``, ``[out, in]`` for matrices."""
        ...

    def int4_layout(self, name: str) -> tuple[int, int] | None:
        """(rows, input_repeats) when the tensor is stored as 4-bit-compatible groups."""
        ...

    def load_int4(self, name: str) -> Iterator[Int4Groups]:
        """The tensor's affine 4-bit groups, a block of rows at a time (see int4_layout)."""
        ...

    def packed(self, name: str) -> Packed | None:
        """The tensor in the native kernels' layout, if its type has a kernel."""
        ...

    def finished(self) -> None:
        """Called once the model is built from this source."""
        ...

    def types_without_kernel(self) -> dict[str, str]:
        """Quantized matrices whose type has no native kernel: tensor name -> type name."""
        ...

    def raw_rows(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType, int] | None:
        """A quantized matrix's file rows ``[rows, bytes]``, its type and its width."""
        ...

    def type_name(self, name: str) -> str: ...


def _reverse_permute(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved -> rotate-half RoPE).

    convert_hf_to_gguf.py reorders each head's rows from [first half | second half] to
    interleaved pairs for GGML's "normal" RoPE; we run the rotate-half form, so put them back.
    """
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)


class GGUFSource:
    """Tensors of one GGUF file, read through a memory map (see ``gguf_file``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            file = GGUFFile(path)
        except (GGUFFormatError, OSError) as exc:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from None
        self.metadata: dict[str, Any] = file.metadata
        self._tensors = file.tensors
        self.config = config_from_gguf(self.metadata, set(self._tensors), str(path))
        self._check_types()
        self._cache = PackedCache.for_gguf(path)  # packed tensors from an earlier load

    def _check_types(self) -> None:
        for tensor in self._tensors.values():
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name} has unsupported quantization type "
                    f"{tensor.tensor_type.name}; supported: "
                    + ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
                )

    def names(self) -> list[str]:
        return list(self._tensors)

    def type_name(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        if self.config.architecture != "llama" or self.metadata["general.architecture"] == "qwen2":
            return None
        if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
            return _reverse_permute(rows, self.config.num_heads)
        if name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
            return _reverse_permute(rows, self.config.num_kv_heads)
        return None

    def _dequantize(self, name: str, rows: np.ndarray) -> torch.Tensor:
        try:
            array = dequantize(rows, self._tensors[name].tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: cannot read tensor {name} ({exc})") from None
        # np.array copies: F32 tensors come back as read-only views of the memory map.
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        data = np.asarray(self._tensors[name].data)
        if data.ndim < 2 or data.shape[0] <= LOAD_CHUNK_ROWS:
            out = self._dequantize(name, data).to(dtype)
        else:  # large matrices (embeddings) in row chunks: bounded float32 temporaries
            first = self._dequantize(name, data[:1])
            out = torch.empty((data.shape[0], first.shape[1]), dtype=dtype)
            for start in range(0, data.shape[0], LOAD_CHUNK_ROWS):
                out[start : start + LOAD_CHUNK_ROWS] = self._dequantize(
                    name, data[start : start + LOAD_CHUNK_ROWS]
                )
        order = self._row_order(name, out.shape[0])
        return out if order is None else out[torch.from_numpy(order)]

    def int4_layout(self, name: str) -> tuple[int, int] | None:
        tensor = self._tensors[name]
        if tensor.tensor_type not in INT4_TYPES or len(tensor.shape) != 2:
            return None
        repeats = 2 if tensor.tensor_type == GGMLQuantizationType.Q8_0 else 1
        return int(tensor.shape[1]), repeats

    def load_int4(self, name: str) -> Iterator[Int4Groups]:
        tensor = self._tensors[name]
        data, cols = np.asarray(tensor.data), int(tensor.shape[0])
        order = self._row_order(name, data.shape[0])
        if order is not None:  # Q/K rows are permuted per head: small, one block
            yield int4_groups(data, tensor.tensor_type, cols).permute_rows(order)
            return
        for start in range(0, data.shape[0], LOAD_CHUNK_ROWS):
            yield int4_groups(data[start : start + LOAD_CHUNK_ROWS], tensor.tensor_type, cols)

    def raw_rows(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType, int] | None:
        tensor = self._tensors[name]
        if tensor.tensor_type not in PACKED_TYPES or len(tensor.shape) != 2:
            return None
        if self._row_order(name, int(tensor.shape[1])) is not None:
            return None
        return np.asarray(tensor.data), tensor.tensor_type, int(tensor.shape[0])

    def types_without_kernel(self) -> dict[str, str]:
        unquantized = (
            GGMLQuantizationType.F32,
            GGMLQuantizationType.F16,
            GGMLQuantizationType.BF16,
        )
        return {
            t.name: t.tensor_type.name
            for t in self._tensors.values()
            if len(t.shape) == 2 and t.tensor_type not in (*PACKED_TYPES, *unquantized)
        }

    def packed(self, name: str) -> Packed | None:
        tensor = self._tensors[name]
        if tensor.tensor_type not in PACKED_TYPES or len(tensor.shape) != 2:
            return None
        cached = self._cache.get(name) if self._cache is not None else None
        if cached is not None:
            return cached
        packed = self._pack(name)
        if self._cache is not None:
            self._cache.put(name, packed)
        return packed

    def finished(self) -> None:
        """The model is built: keep what was packed for the next load."""
        if self._cache is not None:
            self._cache.save()

    def _pack(self, name: str) -> Packed:
        tensor = self._tensors[name]
        data, cols = np.asarray(tensor.data), int(tensor.shape[0])
        order = self._row_order(name, data.shape[0])
        if order is not None:  # Q/K rows are permuted per head
            data = data[order]
        # LOAD_CHUNK_ROWS is a whole number of tiles, so chunks concatenate tile by tile.
        chunks = [
            pack(decompose(data[start : start + LOAD_CHUNK_ROWS], tensor.tensor_type, cols))
            for start in range(0, data.shape[0], LOAD_CHUNK_ROWS)
        ]
        first = chunks[0]
        if len(chunks) == 1:
            return first
        return Packed(
            first.mode,
            first.qbits,
            data.shape[0],
            cols,
            np.concatenate([c.q for c in chunks]),
            np.concatenate([c.s for c in chunks]),
            np.concatenate([c.d for c in chunks]) if first.d.size else first.d,
        )


# Hugging Face parameter names -> GGUF names (the layer index is substituted).
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _gguf_name(hf_name: str, architecture: str) -> str | None:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    match = _HF_LAYER.match(hf_name)
    if not match:
        return None
    layer, module, kind = match.groups()
    if module == "post_attention_layernorm" and architecture == "llama":
        return f"blk.{layer}.ffn_norm.{kind}"  # Llama's norm before the MLP
    mapped = _HF_LAYER_TO_GGUF.get(module)
    return f"blk.{layer}.{mapped}.{kind}" if mapped else None


class SafetensorsSource:
    """Tensors of a Hugging Face directory: config.json + *.safetensors (+ tokenizer.json)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        config_path = path / "config.json"
        try:
            hf_config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{config_path}: cannot read config.json ({exc})") from None
        self.metadata: dict[str, Any] = hf_config
        self.config = config_from_hf(hf_config, str(config_path))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no *.safetensors files")
        self._where: dict[str, tuple[Any, str]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
            for hf_name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                name = _gguf_name(hf_name, self.config.architecture)
                if name is not None:
                    self._where[name] = (handle, hf_name)
        # Gemma's RMSNorm scales by (1 + w); GGUF files store 1 + w already, so add it here.
        self._norm_offset = 1.0 if self.config.architecture == "gemma3" else 0.0

    def names(self) -> list[str]:
        return list(self._where)

    def type_name(self, name: str) -> str:
        handle, hf_name = self._where[name]
        return str(handle.get_slice(hf_name).get_dtype())

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        handle, hf_name = self._where[name]
        try:
            tensor = handle.get_tensor(hf_name).to(dtype)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: cannot read tensor {hf_name} ({exc})") from None
        if "norm" in name and self._norm_offset:
            tensor = tensor + self._norm_offset
        return tensor

    def int4_layout(self, name: str) -> tuple[int, int] | None:
        return None

    def load_int4(self, name: str) -> Iterator[Int4Groups]:
        return iter(())

    def packed(self, name: str) -> Packed | None:
        return None

    def raw_rows(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType, int] | None:
        return None

    def finished(self) -> None:
        pass

    def types_without_kernel(self) -> dict[str, str]:
        return {}  # float weights: the gguf format runs them as float32 matmuls


def open_weights(path: Path) -> WeightSource:
    """Open a GGUF file or a safetensors directory, with an error naming what is wrong."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        return SafetensorsSource(path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (magic {magic!r}) nor a model directory")
    return GGUFSource(path)
