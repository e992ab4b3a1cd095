"""Loading: every supported GGUF type, safetensors, and clear errors for broken files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specserve.model.errors import ModelLoadError, UnknownModelError
from specserve.model.linear import Int4Linear
from specserve.model.loader import load_model
from specserve.model.quant import INT4_TYPES, int4_groups
from specserve.model.transformer import ForwardBatch
from specserve.model.weights import GGUFSource, open_weights
from tests.tiny import TinySpec, write_tiny_gguf

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_type_loads_and_matches_reference_dequantization(tmp_path: Path, qtype: Q) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=qtype))
    source = open_weights(path)
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    reference = gguf.quants.dequantize(raw.data, raw.tensor_type)
    assert torch.equal(source.load("blk.0.ffn_up.weight"), torch.from_numpy(np.array(reference)))
    if qtype in INT4_TYPES:
        groups = int4_groups(np.asarray(raw.data), qtype, reference.shape[1])
        np.testing.assert_array_equal(groups.dequantize(), reference)
    model = load_model(str(path), dtype="int4", progress=False)
    assert isinstance(model.lm.blocks[0].gate_up, Int4Linear) == (qtype in INT4_TYPES)
    logits = model.lm(ForwardBatch(torch.tensor([[1, 2, 3]]), [0], [0]), model.lm.new_cache())
    assert logits.shape == (1, 3, model.lm.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_int4_format_matches_float32_on_4bit_weights(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=Q.Q4_1))
    batch = ForwardBatch(torch.tensor([[5, 9, 200, 14, 77]]), [0], [0])
    exact = load_model(str(path), dtype="float32", progress=False)
    int4 = load_model(str(path), dtype="int4", progress=False)
    ref = exact.lm(batch, exact.lm.new_cache())
    out = int4.lm(batch, int4.lm.new_cache())
    # Same weights; only bf16 activations and bf16 group scales differ.
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_truncated_file_names_file_and_problem(tmp_path: Path, tiny_gguf: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf"):
        load_model(str(broken), progress=False)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"junk\.gguf"):
        open_weights(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        open_weights(text)


def test_unsupported_architecture_and_type(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"falcon.gguf: unsupported architecture 'falcon'"):
        open_weights(path)

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 256)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("w", np.zeros((1, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"iq\.gguf"):
        GGUFSource(path)


def test_unknown_model_lists_catalog() -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        load_model("no-such-model", progress=False)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_lean_reader_matches_gguf_reader(tmp_path: Path, qtype: Q) -> None:
    """Our metadata/tensor reader (which avoids GGUFReader's memory cost) reads the same."""
    from specserve.model.gguf_file import GGUFFile

    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=qtype))
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for tensor in reference.tensors:
        mine = ours.tensors[tensor.name]
        assert mine.tensor_type == tensor.tensor_type
        assert mine.shape == tuple(int(d) for d in tensor.shape)
        np.testing.assert_array_equal(mine.data, tensor.data)
