"""The native quantized matmul against its slow, obvious twin (STYLE.md 16).

- Packing: every supported GGUF type decomposes into integers and scale codes whose
  dequantization equals the ``gguf`` package's reference dequantizer bit for bit.
- Values: the kernel equals ``quantize(x) @ dequantize(W).T`` computed in float64 within a
  float32 summation tolerance, and a plain float matmul within the activation quantization
  error (int8 per block of 32, as llama.cpp's Q8 activations).
- Exactness: each output row is bit-identical whatever the number of rows, the rows it is
  batched with, the thread count and the ISA path (AVX-512, AVX2, generic).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from specserve import cli
from specserve.model import packing, qlinear
from specserve.model.errors import ModelLoadError
from specserve.model.loader import Model, load_model
from specserve.model.qlinear import PackedLinear, native_available, native_module
from specserve.model.transformer import ForwardBatch
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.skipif(not native_available(), reason="native kernels not built")

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_QUANTS = {Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}
# float32 accumulation over K/32 block terms, relative to sum |x_q| |w| (measured ~1e-7).
SUM_TOLERANCE = 1e-5
# int8 activations per block of 32: relative error of the product (measured ~5e-3).
QUANT_TOLERANCE = 2e-2


def random_raw(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF rows of ``qtype``: quantized by gguf where it can, random blocks (with
    small fp16 scales) for the K-quants, which gguf cannot quantize in Python."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANTS:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block_bytes, scale_offsets = K_QUANTS[qtype]
    raw = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scale = rng.uniform(1e-3, 1e-2, (rows, cols // 256)).astype(np.float16)
        raw[..., offset : offset + 2] = scale[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def packed_linear(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[PackedLinear, np.ndarray]:
    raw = random_raw(qtype, rows, cols, seed)
    layer = PackedLinear([packing.pack(packing.decompose(raw, qtype, cols))])
    return layer, dequantize(raw, qtype)


def quantize_rows_reference(x: np.ndarray) -> np.ndarray:
    """The kernels' activation quantization, dequantized: per block of 32, scale amax/127,
    round half to even; a block whose amax is below 1e-30 (where 127/amax nears overflow)
    quantizes to zeros."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    usable = amax >= np.float32(1e-30)
    inv = np.where(usable, np.float32(127) / np.where(usable, amax, 1), 0).astype(np.float32)
    q = np.round(blocks * inv)  # numpy rounds half to even
    return (q * (amax / np.float32(127))).reshape(x.shape)


@pytest.fixture
def each_isa() -> Iterator[list[str]]:
    native = native_module()
    before = native.isa()
    yield list(native.supported_isas())
    native.set_isa(before)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packing_dequantizes_exactly_as_gguf(qtype: Q) -> None:
    raw = random_raw(qtype, 40, 512)
    decomposed = packing.decompose(raw, qtype, 512)
    assert np.array_equal(decomposed.dequantize(), dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_shapes_are_what_pack_gives(qtype: Q) -> None:
    """The packed-weights cache checks a file's arrays against `packed_shapes`."""
    p = packing.pack(packing.decompose(random_raw(qtype, 40, 512), qtype, 512))
    shapes = packing.packed_shapes(p.mode, p.qbits, p.rows, p.cols)
    assert (p.q.shape, p.s.shape, p.d.shape) == shapes


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_dequantize_and_float_matmul(qtype: Q, each_isa: list[str]) -> None:
    layer, weights = packed_linear(qtype, 72, 512)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(1))
    xq = quantize_rows_reference(x.numpy()).astype(np.float64)
    exact = xq @ weights.T.astype(np.float64)
    bound = SUM_TOLERANCE * (np.abs(xq) @ np.abs(weights.T.astype(np.float64)))
    plain = x.numpy().astype(np.float64) @ weights.T.astype(np.float64)
    for isa in each_isa:
        native_module().set_isa(isa)
        y = layer(x).numpy()
        assert np.all(np.abs(y - exact) <= bound), (isa, np.abs(y - exact).max())
        assert np.linalg.norm(y - plain) <= QUANT_TOLERANCE * np.linalg.norm(plain), isa


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_are_bit_identical_whatever_the_batch(qtype: Q, each_isa: list[str]) -> None:
    """Every row of an M-row product (M = 1..70, across the 64-row chunk) equals that row
    computed alone, and every ISA path gives the same bits."""
    layer, _ = packed_linear(qtype, 40, 512, seed=3)  # 40 outputs: a padded last tile
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(2))
    by_isa = {}
    for isa in each_isa:
        native_module().set_isa(isa)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for m in (1, 2, 3, 8, 17, 33, 64, 70):
            batch = layer(x[:m])
            assert torch.equal(batch, alone[:m]), (isa, m)
        shuffled = torch.randperm(70, generator=torch.Generator().manual_seed(4))
        assert torch.equal(layer(x[shuffled]), alone[shuffled]), isa
        by_isa[isa] = alone
    first = next(iter(by_isa.values()))
    for isa, rows in by_isa.items():
        assert torch.equal(rows, first), isa


def test_activation_rounding_ties_and_zero_blocks_agree_on_every_path(each_isa: list[str]) -> None:
    """The activation quantizer's edge cases, which random rows never meet: codes exactly
    halfway (each path must round half to even), all-zero and negative-zero blocks, a block
    whose largest magnitude is negative, and one of subnormal values (127 / amax would be
    infinite: it quantizes to zeros). Every path equals the reference in value and the
    generic path in bits."""
    layer, weights = packed_linear(Q.Q8_0, 32, 256, seed=6)
    x = torch.zeros(4, 256)
    x[0, :32] = torch.arange(32) - 15.5  # amax 16.5 ... scaled so halves land on .5
    x[0, :32] *= 127 / 16.5
    x[0, 32:64] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # ties at inv = 1
    x[1, 64:96] = -0.0
    x[1, 96:128] = torch.tensor([1e-39, 0.0] * 16)  # alone in its row: any code shows
    x[2, 96:128] = torch.linspace(-3, 2, 32)  # the largest |v| is negative
    x[3] = torch.randn(256, generator=torch.Generator().manual_seed(7))
    x[3, 128:160] = 0.0
    exact = quantize_rows_reference(x.numpy()).astype(np.float64) @ weights.astype(np.float64).T
    bound = SUM_TOLERANCE * (np.abs(quantize_rows_reference(x.numpy())) @ np.abs(weights.T))
    by_isa = {}
    for isa in each_isa:
        native_module().set_isa(isa)
        y = layer(x)
        assert np.all(np.abs(y.numpy() - exact) <= bound + 1e-30), isa
        by_isa[isa] = y
    first = next(iter(by_isa.values()))
    assert all(torch.equal(y, first) for y in by_isa.values())


# Where each type's quantized weight codes sit in its GGUF block, and the byte that makes
# them extreme: largest codes, or Q8_0's -128 (whose sign trick has the largest products).
CODE_BYTES = {
    Q.Q4_0: (slice(2, 18), 0xFF),
    Q.Q4_1: (slice(4, 20), 0xFF),
    Q.Q5_0: (slice(2, 22), 0xFF),
    Q.Q8_0: (slice(2, 34), 0x80),
    Q.Q4_K: (slice(16, 144), 0xFF),
    Q.Q5_K: (slice(16, 176), 0xFF),
    Q.Q6_K: (slice(0, 192), 0xFF),
}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes_do_not_saturate_any_path(qtype: Q, each_isa: list[str]) -> None:
    """All weight codes at their extreme and activations at +-127 in every position: the
    largest integer sums the kernels can meet. The AVX2 path adds 16-bit partial sums
    (vpmaddubsw saturates at 32767), so one group too many in a run would show here."""
    codes, byte = CODE_BYTES[qtype]
    raw = random_raw(qtype, 32, 512, seed=5)
    blocks = raw.reshape(32, 512 // (32 if qtype not in K_QUANTS else 256), -1)
    blocks[..., codes] = byte
    layer = PackedLinear([packing.pack(packing.decompose(raw, qtype, 512))])
    weights = dequantize(raw, qtype).astype(np.float64)
    x = torch.ones(4, 512)  # rows 0 and 1: every product of one sign, the largest sums
    x[1] = -1
    x[2, ::2] = -1  # rows 2 and 3: mixed signs
    x[3] = torch.linspace(-1, 1, 512)
    exact = quantize_rows_reference(x.numpy()).astype(np.float64) @ weights.T
    bound = SUM_TOLERANCE * (np.abs(quantize_rows_reference(x.numpy())) @ np.abs(weights.T))
    for isa in each_isa:
        native_module().set_isa(isa)
        y = layer(x).numpy()
        assert np.all(np.abs(y - exact) <= bound), (isa, np.abs(y - exact).max())


def test_thread_count_and_parked_workers_do_not_change_results() -> None:
    native = native_module()
    layer, _ = packed_linear(Q.Q4_K, 256, 512)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(5))
    threads = native.threads()
    try:
        native.set_threads(1)
        one = layer(x)
        native.set_threads(3)
        assert torch.equal(layer(x), one)
        for pause in (0.0, 0.01, 0.0):  # parked at once, asleep, parked while still spinning
            native.park()
            time.sleep(pause)
            assert torch.equal(layer(x), one)
    finally:
        native.set_threads(threads)


def test_fused_parts_of_different_types_equal_each_alone() -> None:
    """q, k and v of different GGUF types (Qwen's attn_v is Q6_K) side by side."""
    parts = [(Q.Q4_K, 48), (Q.Q6_K, 40), (Q.Q8_0, 24)]
    packed = [
        packing.pack(packing.decompose(random_raw(t, rows, 256, seed=i), t, 256))
        for i, (t, rows) in enumerate(parts)
    ]
    bias = torch.randn(112)
    fused = PackedLinear(packed, bias)
    x = torch.randn(3, 256)
    alone = torch.cat([PackedLinear([p])(x) for p in packed], dim=1) + bias
    assert fused(x).shape == (3, 112)
    assert torch.equal(fused(x), alone)


def test_bad_arguments_are_refused() -> None:
    native = native_module()
    with pytest.raises(ValueError, match="multiple of 32"):
        native.linear(0, 1, 48, 0, 16, ())
    with pytest.raises(ValueError, match="unknown ISA"):
        native.set_isa("sse2")
    with pytest.raises(ValueError, match="invalid packed weight"):
        native.linear(0, 1, 64, 0, 16, ((1, 8, 0, 0, 0, 1, 0),))  # K-quant needs K % 256
    with pytest.raises(ValueError, match="share their input width"):
        a = packing.pack(packing.decompose(random_raw(Q.Q8_0, 16, 64), Q.Q8_0, 64))
        b = packing.pack(packing.decompose(random_raw(Q.Q8_0, 16, 32), Q.Q8_0, 32))
        PackedLinear([a, b])


# Attention shapes whose native loops differ: head width 64 or 128; groups of 2, 4 or 7
# query heads per KV head (the AVX-512 scores take heads in pairs, an odd one alone; its
# value sums take up to 6 heads per pass, so 7 is a pass of 6 and one of 1).
# Gemma 3: heads of 256, norms on each head and on both outputs, tanh-GELU, and a sliding
# window (8 keys here) that the prompts outgrow on both layers. (Its global layers differ in
# their RoPE base, which a tiny file does not set apart: the real model's test covers it.)
HEAD_SHAPES: list[dict[str, Any]] = [
    {"heads": 4, "kv_heads": 2, "head_dim": 64},
    {"heads": 8, "kv_heads": 2, "head_dim": 128},
    {"heads": 14, "kv_heads": 2, "head_dim": 128},
    {"architecture": "gemma3", "heads": 4, "kv_heads": 1, "head_dim": 256, "layers": 2},
]
HEAD_SHAPE_IDS = ["d64-group2", "d128-group4", "d128-group7", "gemma3-d256-window"]


@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=HEAD_SHAPE_IDS)
def test_native_layers_match_the_pytorch_path(tmp_path: Path, shape: dict[str, int]) -> None:
    """The one-call native decoder layer computes what the PyTorch ops compute on the same
    packed matmuls (attention, RoPE, norms and MLP summed in another order). Where the two
    orders differ in a last bit right at an int8 rounding boundary, a later matmul's
    activation rounds the other way and that row moves by a few tenths of a percent; a bug
    in attention, RoPE or the MLP moves the logits by tens of percent."""
    spec = TinySpec(linear_type=Q.Q4_0, **shape)
    path = write_tiny_gguf(tmp_path / "tiny-q4_0.gguf", spec)
    model = load_model(str(path), dtype="gguf", progress=False)
    assert model.lm.native_plans() is not None, "the tiny model should run natively"
    prompts = [list(range(5, 75)), list(range(80, 91))]  # crosses a 64-position block
    batch = ForwardBatch(torch.tensor([p[:11] for p in prompts]), [1, 0], [0, 0])
    native = model.lm(batch, model.lm.new_cache(num_slots=2))
    model.lm._plans = None  # the PyTorch layers, same weights
    reference = model.lm(batch, model.lm.new_cache(num_slots=2))
    assert torch.linalg.norm(native - reference) <= 1e-2 * torch.linalg.norm(reference)
    # Most rows see no such rounding: they agree to float32 summation order.
    close_rows = torch.isclose(native, reference, rtol=1e-4, atol=1e-4).all(-1)
    assert close_rows.float().mean() >= 0.5
    assert not torch.equal(native, reference)  # the native path did run


def test_a_type_without_kernel_is_named_or_avoided(tmp_path: Path) -> None:
    """--dtype gguf on a file with a Q5_1 matrix (no kernel) names the file and the type;
    auto picks a format that runs it."""
    path = write_tiny_gguf(tmp_path / "tiny-q5_1.gguf", TinySpec(linear_type=Q.Q5_1))
    with pytest.raises(ModelLoadError, match=r"tiny-q5_1\.gguf: tensor .* Q5_1, which has no"):
        load_model(str(path), dtype="gguf", progress=False)
    assert load_model(str(path), progress=False).fmt == "int4"


def test_a_forced_isa_path_is_taken_or_refused_clearly(
    monkeypatch: pytest.MonkeyPatch, each_isa: list[str]
) -> None:
    """$SPECSERVE_NATIVE_ISA: a path this CPU runs is taken; any other is an error that names
    the variable and the paths this CPU runs, raised when the kernels are asked for."""
    native = native_module()
    monkeypatch.setenv(qlinear.ISA_ENV, "generic")
    qlinear._apply_isa_env(native)
    assert qlinear.kernel_path() == "generic"
    monkeypatch.setenv(qlinear.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"SPECSERVE_NATIVE_ISA=sse9: .*this CPU runs: generic"):
        qlinear._apply_isa_env(native)


def test_a_bad_forced_isa_path_fails_only_the_commands_that_need_kernels(tmp_path: Path) -> None:
    """A value set once broke every command with a traceback at import; now `models` runs and
    `generate` on a GGUF says what is wrong, as an error (exit 2)."""
    path = write_tiny_gguf(tmp_path / "tiny-q4_0.gguf", TinySpec(linear_type=Q.Q4_0))
    env = {**os.environ, qlinear.ISA_ENV: "sse9"}
    listing = subprocess.run([sys.executable, "-m", "specserve", "models"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert "\nkernels: SPECSERVE_NATIVE_ISA=sse9: " in listing.stdout  # said, not raised
    command = [sys.executable, "-m", "specserve", "generate", str(path), "--prompt", "x",
               "--max-tokens", "2", "--dtype", "gguf"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "specserve: error: SPECSERVE_NATIVE_ISA=sse9" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_models_listing_names_the_kernel_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from specserve.cli import main

    monkeypatch.delenv(qlinear.ISA_ENV, raising=False)
    qlinear._apply_isa_env(native_module())
    assert main(["models"]) == 0
    runs = ", ".join(native_module().supported_isas())
    expected = f"\nkernels: native, {native_module().isa()} path on this CPU (it runs: {runs})"
    assert expected in capsys.readouterr().out
    monkeypatch.setattr(qlinear, "_native", None)
    assert qlinear.kernels_summary().startswith("not built: GGUF models run in PyTorch's int4")


def test_loading_names_the_kernel_path_and_warns_on_the_portable_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from specserve.model import loader

    monkeypatch.delenv(qlinear.ISA_ENV, raising=False)
    with caplog.at_level("INFO", logger=loader.__name__):
        loader._report_kernel_path(Path("m.gguf"))
    assert f"m.gguf: native kernels, {native_module().isa()} path" in caplog.text
    monkeypatch.setattr(loader, "kernel_path", lambda: "generic")
    caplog.clear()
    loader._report_kernel_path(Path("m.gguf"))
    assert "portable C++ kernels run, several times slower" in caplog.text
    monkeypatch.setenv(qlinear.ISA_ENV, "generic")  # asked for: no warning
    caplog.clear()
    loader._report_kernel_path(Path("m.gguf"))
    assert "WARNING" not in caplog.text and "slower" not in caplog.text


def test_generate_names_the_kernel_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_tiny_gguf(tmp_path / "tiny-q4_0.gguf", TinySpec(linear_type=Q.Q4_0))
    argv = ["generate", str(path), "--prompt", "x", "--max-tokens", "2", "--dtype", "gguf"]
    assert cli.main(argv) == 0
    assert f"gguf, {native_module().isa()} kernels]" in capsys.readouterr().err


@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=HEAD_SHAPE_IDS)
def test_native_layers_give_the_same_bits_on_every_isa_path(
    tmp_path: Path, each_isa: list[str], shape: dict[str, int]
) -> None:
    spec = TinySpec(linear_type=Q.Q4_K, **shape)
    path = write_tiny_gguf(tmp_path / "tiny-q4_k.gguf", spec)
    model = load_model(str(path), dtype="gguf", progress=False)
    batch = ForwardBatch(torch.tensor([list(range(3, 40))]), [0], [0])
    logits = {}
    for isa in each_isa:
        native_module().set_isa(isa)
        logits[isa] = model.lm(batch, model.lm.new_cache())
    first = next(iter(logits.values()))
    assert all(torch.equal(v, first) for v in logits.values()), list(logits)


def test_embedding_rows_are_the_files_values(tmp_path: Path) -> None:
    """The gguf format keeps a quantized embedding as the file's rows: lookups and the
    table materialized on first whole-table use equal the float32 format's table exactly."""
    spec = TinySpec(linear_type=Q.Q4_K, embedding_type=Q.Q6_K)
    path = write_tiny_gguf(tmp_path / "tiny-q4_k.gguf", spec)
    rows = load_model(str(path), dtype="gguf", progress=False).lm
    table = load_model(str(path), dtype="float32", progress=False).lm.embedding
    assert rows.embedding_rows is not None
    tokens = torch.tensor([[5, 0, 260], [7, 7, 1]])
    assert torch.equal(rows.embed(tokens), table[tokens])
    with pytest.raises(IndexError, match="outside the embedding"):
        rows.embed(torch.tensor([[table.shape[0]]]))
    assert torch.equal(rows.embedding, table)  # materialized on first use (EAGLE heads)


# int8 activations per block of 32 (as llama.cpp's Q8): relative logit error against float32
# weights without activation quantization (measured 1.3% to 3.9% on SmolLM2 and Qwen 0.5B
# chat prompts; a wrong kernel is off by ~100%).
REAL_MODEL_TOLERANCE = 6e-2


def _assert_close_to_float32(model: Model, name: str, text: str) -> None:
    """``model`` (gguf) against the float32 format of the same file (itself within 2e-3 of
    transformers, test_logits_vs_transformers): relative logit error, same greedy choices."""
    assert model.fmt == "gguf" and model.lm.native_plans() is not None
    reference = load_model(name, dtype="float32", progress=False)
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": text}])
    batch = ForwardBatch(torch.tensor([prompt]), [0], [0])
    ours = model.lm(batch, model.lm.new_cache())
    theirs = reference.lm(batch, reference.lm.new_cache())
    assert (ours - theirs).norm() <= REAL_MODEL_TOLERANCE * theirs.norm()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree >= 0.95, agree


@pytest.mark.slow
def test_real_model_logits_close_to_float32(smollm2: Model) -> None:
    _assert_close_to_float32(smollm2, "smollm2-135m-instruct", "What is a GGUF file?")


@pytest.mark.slow
def test_real_gemma3_logits_close_to_float32() -> None:
    """Gemma 3 270M in native layers: 2.6% from float32 on a 649-token prompt, which its
    512-key sliding window does not cover (by hand, on a longer prompt, each global layer
    given the local layers' RoPE base instead: 39%, and 10% of the greedy choices changed)."""
    text = "Write a Python function that returns the n-th Fibonacci number, with tests. " * 40
    model = load_model("gemma-3-270m", progress=False)
    _assert_close_to_float32(model, "gemma-3-270m", text)


def test_exp_fixed_is_close_to_exp_and_the_same_on_every_isa_path(each_isa: list[str]) -> None:
    """The layer's own exp (SiLU, softmax): relative error below 1e-7 (float32's own
    rounding is 6e-8) over the whole range it takes, the same bits on every ISA path, and
    clamped to [-87, 88] (a normal float, never inf or a subnormal)."""
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_003), torch.randn(10_000) * 4])
    reference = torch.exp(x.double())
    results = {}
    for isa in each_isa:
        native_module().set_isa(isa)
        out = torch.empty_like(x)
        native_module().exp_fixed(x.data_ptr(), x.numel(), out.data_ptr())
        relative = ((out.double() - reference) / reference).abs().max().item()
        assert relative < 1e-7, (isa, relative)
        results[isa] = out
    first = next(iter(results.values()))
    assert all(torch.equal(v, first) for v in results.values()), list(results)
    edges = torch.tensor([-1000.0, -87.0, 88.0, 1000.0])
    out = torch.empty_like(edges)
    native_module().exp_fixed(edges.data_ptr(), 4, out.data_ptr())
    assert torch.equal(out[:2], out[:2].flip(0)) and torch.equal(out[2:], out[2:].flip(0))
    assert torch.isfinite(out).all() and (out > 1e-38).all()
