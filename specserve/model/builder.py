"""Build a ``CausalLM`` from a weight source in a chosen execution format."""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from specserve.model.config import ModelConfig
from specserve.model.embedding import EmbeddingRows
from specserve.model.errors import ModelLoadError
from specserve.model.linear import DenseLinear, Int4Linear
from specserve.model.qlinear import PackedLinear
from specserve.model.transformer import Block, CausalLM
from specserve.model.weights import WeightSource

# Execution formats: how linear layers run.
# - gguf: the native kernels on the file's own quantized blocks (float32 activations);
# - int4: PyTorch's int4 kernel for GGUF 4-bit tensors, bfloat16 for the rest;
# - bfloat16 / float32: every tensor dequantized to that dtype.
FORMATS = ("gguf", "int4", "bfloat16", "float32")
DEFAULT_CONTEXT = 8192  # preallocated RoPE tables / cache length unless asked otherwise

_NORMS_LLAMA = ("attn_norm", "ffn_norm")
_NORMS_GEMMA = (
    "attn_norm",
    "ffn_norm",
    "post_attention_norm",
    "post_ffw_norm",
    "attn_q_norm",
    "attn_k_norm",
)


def compute_dtype(fmt: str) -> torch.dtype:
    return torch.float32 if fmt in ("float32", "gguf") else torch.bfloat16


class _Builder:
    def __init__(self, source: WeightSource, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown execution format {fmt!r}; choose one of {FORMATS}")
        self.source = source
        self.fmt = fmt
        self.dtype = compute_dtype(fmt)
        self.names = set(source.names())

    def require(self, name: str) -> str:
        if name not in self.names:
            raise ModelLoadError(f"{self.source.path}: missing tensor {name}")
        return name

    def bias(self, names: list[str]) -> torch.Tensor | None:
        biases = [n.replace(".weight", ".bias") for n in names]
        if not any(b in self.names for b in biases):
            return None
        return torch.cat([self.source.load(self.require(b)) for b in biases]).to(self.dtype)

    def int4_linear(self, names: list[str]) -> Int4Linear | None:
        """A fused int4 linear over the rows of ``names``, if all are stored 4-bit-compatibly."""
        if self.fmt != "int4":
            return None
        layouts = [self.source.int4_layout(self.require(n)) for n in names]
        if any(lay is None for lay in layouts) or len({lay[1] for lay in layouts if lay}) != 1:
            return None
        rows = sum(lay[0] for lay in layouts if lay)
        chunks = itertools.chain.from_iterable(self.source.load_int4(n) for n in names)
        return Int4Linear(chunks, rows, self.bias(names))

    def embedding(self) -> torch.Tensor | EmbeddingRows:
        """The token embedding: in the gguf format a quantized table stays the file's rows."""
        name = self.require("token_embd.weight")
        rows = self.source.raw_rows(name) if self.fmt == "gguf" else None
        return EmbeddingRows(*rows) if rows is not None else self.source.load(name, self.dtype)

    def packed_linear(self, names: list[str]) -> PackedLinear | None:
        """A fused native linear over ``names``, if every tensor's type has a kernel."""
        if self.fmt != "gguf":
            return None
        parts = [self.source.packed(self.require(n)) for n in names]
        if any(p is None for p in parts):
            return None
        return PackedLinear([p for p in parts if p is not None], self.bias(names))

    def linear(self, names: list[str]) -> torch.nn.Module:
        """A fused linear over the rows of ``names`` (e.g. q, k, v)."""
        packed = self.packed_linear(names)
        if packed is not None:
            return packed
        int4 = self.int4_linear(names)
        if int4 is not None:
            return int4
        weight = torch.cat([self.source.load(self.require(n), self.dtype) for n in names])
        return DenseLinear(weight, self.bias(names))

    def block(self, config: ModelConfig, layer: int) -> Block:
        p = f"blk.{layer}."
        modules = {
            "qkv": self.linear([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]),
            "attn_output": self.linear([p + "attn_output.weight"]),
            "gate_up": self.linear([p + "ffn_gate.weight", p + "ffn_up.weight"]),
            "ffn_down": self.linear([p + "ffn_down.weight"]),
        }
        norm_names = _NORMS_GEMMA if config.architecture == "gemma3" else _NORMS_LLAMA
        norms = {n: self.source.load(self.require(f"{p}{n}.weight")) for n in norm_names}
        return Block(config, layer, modules, norms)


def build_model(
    source: WeightSource, fmt: str, max_len: int | None = None, progress: bool = True
) -> CausalLM:
    """Materialize every layer of ``source`` in format ``fmt`` (one tensor at a time)."""
    config = source.config
    builder = _Builder(source, fmt)
    steps = tqdm(
        total=config.num_layers + 2,
        desc=f"loading {source.path.name} ({fmt})",
        unit="layer",
        disable=None if progress else True,
        leave=False,
    )
    embedding = builder.embedding()
    if embedding.shape[0] < config.vocab_size:
        raise ModelLoadError(
            f"{source.path}: embedding has {embedding.shape[0]} rows, "
            f"vocabulary {config.vocab_size}"
        )
    steps.update()
    blocks = []
    for layer in range(config.num_layers):
        blocks.append(builder.block(config, layer))
        steps.update()
    output_norm = source.load(builder.require("output_norm.weight"))
    lm_head: torch.nn.Module | None
    if config.tie_embeddings:
        tied = ["token_embd.weight"]
        lm_head = builder.packed_linear(tied) or builder.int4_linear(tied)
        if lm_head is None:
            dense = embedding.dense() if isinstance(embedding, EmbeddingRows) else embedding
            lm_head = DenseLinear(dense)
    else:
        lm_head = builder.linear(["output.weight"])
    steps.update()
    steps.close()
    context = min(max_len or DEFAULT_CONTEXT, config.max_context)
    return CausalLM(config, embedding, blocks, output_norm, lm_head, builder.dtype, context)
