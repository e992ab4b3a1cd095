"""Tiny random-weight models written as real GGUF files, so the real loaders run in tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from specserve.model.tokenizer import _bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Offsets of the fp16 scale fields in K-quant blocks (gguf cannot quantize these in Python).
_K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@dataclass(frozen=True)
class TinySpec:
    architecture: str = "llama"  # or "gemma3"
    hidden: int = 256
    ffn: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    context: int = 512
    sliding_window: int = 8
    linear_type: Q = Q.F32
    embedding_type: Q = Q.F32  # token_embd (quantized GGUFs store it quantized too)
    seed: int = 0
    extra_tokens: int = 0  # appended ordinary tokens: a different vocabulary, same merges
    merges: bool = True  # False: no BPE merges, text encodes to one token per byte
    # An LM head (untied) that only ever picks printable ASCII byte tokens: with merges=False
    # the generated text re-encodes to exactly the generated ids.
    printable_output: bool = False
    chat_template: str = CHATML


def vocabulary(extra_tokens: int = 0, merges: bool = True) -> tuple[list[str], list[int]]:
    byte_chars = list(_bytes_to_unicode().values())
    # Without merges: one merge of two control bytes (never in test text) keeps the file valid.
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"] if merges else ["Āā"]
    extra = [f"xtra{i}" for i in range(extra_tokens)]  # spelled in the byte alphabet
    tokens = byte_chars + merged + SPECIALS + extra
    types = [1] * (len(byte_chars) + len(merged)) + [3] * len(SPECIALS) + [1] * len(extra)
    return tokens, types


def _quantize(array: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return array
    if qtype in _K_SCALE_OFFSETS:
        rows, cols = array.shape
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in _K_SCALE_OFFSETS[qtype]:
            scale = np.full((rows, cols // block_elems), 0.002, dtype=np.float16)
            blocks[..., offset : offset + 2] = scale[..., None].view(np.uint8)
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(array, qtype)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random model of ``spec`` with a byte-level BPE vocabulary to ``path``."""
    rng = np.random.default_rng(spec.seed)
    tokens, types = vocabulary(spec.extra_tokens, spec.merges)
    arch = spec.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(spec.layers)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_vocab_size(len(tokens))
    if arch == "gemma3":
        writer.add_sliding_window(spec.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES if spec.merges else ["Ā ā"])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(spec.chat_template)

    def add(name: str, shape: tuple[int, ...], scale: float, qtype: Q = Q.F32) -> None:
        array = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            array = 1.0 + array  # norm weights near 1
        data = _quantize(array, qtype, rng) if len(shape) == 2 else array
        writer.add_tensor(
            name, data, raw_dtype=qtype if len(shape) == 2 and qtype != Q.F32 else None
        )

    h, d = spec.hidden, spec.head_dim
    lin = spec.linear_type
    add("token_embd.weight", (len(tokens), h), 0.05, spec.embedding_type)
    add("output_norm.weight", (h,), 0.1)
    for i in range(spec.layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (h,), 0.1)
        add(p + "ffn_norm.weight", (h,), 0.1)
        add(p + "attn_q.weight", (spec.heads * d, h), h**-0.5, lin)
        add(p + "attn_k.weight", (spec.kv_heads * d, h), h**-0.5, lin)
        add(p + "attn_v.weight", (spec.kv_heads * d, h), h**-0.5, lin)
        add(p + "attn_output.weight", (h, spec.heads * d), (spec.heads * d) ** -0.5, lin)
        add(p + "ffn_gate.weight", (spec.ffn, h), h**-0.5, lin)
        add(p + "ffn_up.weight", (spec.ffn, h), h**-0.5, lin)
        add(p + "ffn_down.weight", (h, spec.ffn), spec.ffn**-0.5, lin)
        if arch == "gemma3":
            add(p + "post_attention_norm.weight", (h,), 0.1)
            add(p + "post_ffw_norm.weight", (h,), 0.1)
            add(p + "attn_q_norm.weight", (d,), 0.1)
            add(p + "attn_k_norm.weight", (d,), 0.1)
    if spec.printable_output:
        byte_char = _bytes_to_unicode()
        printable = [tokens.index(byte_char[b]) for b in range(0x20, 0x7F)]
        head = np.zeros((len(tokens), h), dtype=np.float32)
        head[printable] = rng.standard_normal((len(printable), h)).astype(np.float32)
        writer.add_tensor("output.weight", head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
