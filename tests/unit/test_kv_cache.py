"""Rollback by position, batches of different lengths, and k-token vs single-step forwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specserve.model.builder import FORMATS
from specserve.model.errors import ModelLoadError
from specserve.model.kv_cache import KVCache
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from tests.paths import SHARED_DATA
from tests.tiny import TinySpec, write_tiny_gguf

SPEC_BENCH = SHARED_DATA / "spec_bench" / "question.jsonl"


def _forward(model: Model, cache, tokens: list[int], start: int, slot: int = 0) -> torch.Tensor:
    return model.lm(ForwardBatch(torch.tensor([tokens]), [slot], [start]), cache)[0]


def test_rollback_then_reforward_gives_identical_logits(tiny_model: Model) -> None:
    cache = tiny_model.lm.new_cache()
    prompt = list(range(10, 30))
    _forward(tiny_model, cache, prompt, 0)
    first = _forward(tiny_model, cache, [40, 41, 42, 43], len(prompt))
    _forward(tiny_model, cache, [99, 98, 97, 96, 95, 94], len(prompt))  # a rejected draft
    again = _forward(tiny_model, cache, [40, 41, 42, 43], len(prompt))  # rollback = same start
    assert torch.equal(first, again)


# Heads of 128 and 256 in groups of 4: shapes where a float32 GEMM's summation order changed
# with the row count (attention scores, 4 x T rows) before matmul_rows_exact split it. The
# Gemma 3 model (native layers in gguf, PyTorch ones in the other formats) has a sliding
# window of 8 that the verify windows cross.
_TINY_Q4 = {
    "llama": TinySpec(linear_type=Q.Q4_0, hidden=512, heads=4, kv_heads=1, head_dim=128),
    "gemma3": TinySpec(
        architecture="gemma3", linear_type=Q.Q4_0, heads=4, kv_heads=1, head_dim=256
    ),
}


@pytest.fixture(scope="module", params=sorted(_TINY_Q4))
def q4_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model stored in 4-bit groups, so every execution format can load it."""
    path = tmp_path_factory.mktemp("q4") / f"tiny-{request.param}-q4_0.gguf"
    return write_tiny_gguf(path, _TINY_Q4[request.param])


def _load_or_skip(path: Path, fmt: str) -> Model:
    """The model in ``fmt``, or a skip where this machine or model cannot run that format."""
    try:
        return load_model(str(path), dtype=fmt, progress=False)
    except (ModelLoadError, ValueError, RuntimeError, OSError, ImportError) as exc:
        pytest.skip(f"format {fmt} cannot run the tiny 4-bit model here: {exc}")


def _poison(cache: KVCache, slot: int, start: int, length: int) -> None:
    """NaN in the positions a forward must write: if it failed to, attention would read NaN."""
    cache.keys[:, slot, :, start : start + length] = float("nan")
    cache.values[:, slot, :, start : start + length] = float("nan")


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_of_different_lengths_equals_each_alone(q4_gguf: Path, fmt: str) -> None:
    """Rows of one forward, from sequences of different lengths, are bit-identical to each
    sequence run alone, in every execution format the loader offers (a new kernel too)."""
    model = _load_or_skip(q4_gguf, fmt)
    prompts = [list(range(5, 25)), list(range(50, 57)), list(range(100, 112))]
    alone = []
    for prompt in prompts:
        cache = model.lm.new_cache()
        _forward(model, cache, prompt, 0)
        _poison(cache, 0, len(prompt), 3)
        alone.append(_forward(model, cache, [7, 8, 9], len(prompt)))
    cache = model.lm.new_cache(num_slots=4)
    for slot, prompt in zip([2, 0, 3], prompts, strict=True):
        _forward(model, cache, prompt, 0, slot)
        _poison(cache, slot, len(prompt), 3)
    batch = ForwardBatch(torch.tensor([[7, 8, 9]] * 3), [2, 0, 3], [len(p) for p in prompts])
    together = model.lm(batch, cache)
    for b in range(3):
        assert torch.equal(together[b], alone[b]), (fmt, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_rows_equal_each_alone(q4_gguf: Path, fmt: str) -> None:
    """A packed forward (rows of 5, 1 and 3 real tokens, no padding computed where the
    runtime allows) returns each row's real positions, bit-identical to the row alone; the
    native runtime leaves the cache past a row's real tokens as it was (zeros)."""
    model = _load_or_skip(q4_gguf, fmt)
    prompts = [list(range(5, 25)), list(range(50, 57)), list(range(100, 112))]
    feeds = [[7, 8, 9, 10, 11], [12], [13, 14, 15]]
    alone = []
    for prompt, feed in zip(prompts, feeds, strict=True):
        cache = model.lm.new_cache()
        _forward(model, cache, prompt, 0)
        _poison(cache, 0, len(prompt), len(feed))
        alone.append(_forward(model, cache, feed, len(prompt)))
    cache = model.lm.new_cache(num_slots=4)
    for slot, prompt, feed in zip([2, 0, 3], prompts, feeds, strict=True):
        _forward(model, cache, prompt, 0, slot)
        _poison(cache, slot, len(prompt), len(feed))
    rows = torch.tensor([f + [f[-1]] * (5 - len(f)) for f in feeds])
    lengths = [len(f) for f in feeds]
    batch = ForwardBatch(rows, [2, 0, 3], [len(p) for p in prompts], lengths)
    logits, features = model.lm.forward_with_features(batch, cache)
    assert logits.shape[0] == features.shape[0] == sum(lengths)
    packed = torch.split(logits, lengths)
    for b in range(3):
        assert torch.equal(packed[b], alone[b]), (fmt, b)
    if model.lm.packs_rows(cache):  # the padding was never computed, so never written
        assert not cache.keys[:, 0, :, len(prompts[1]) + 1 :].any()
    with pytest.raises(ValueError, match="row lengths"):
        model.lm(ForwardBatch(rows, [2, 0, 3], [30, 30, 30], [5, 0, 3]), cache)


@pytest.mark.parametrize("fmt", FORMATS)
def test_k_token_forward_matches_single_steps_on_tiny(q4_gguf: Path, fmt: str) -> None:
    """A k-token forward on a cache whose k positions hold NaN (it must write them itself)
    gives bit-identical logits to k single steps, in every execution format."""
    model = _load_or_skip(q4_gguf, fmt)
    prompt = list(range(20, 90))  # the verify window crosses the 64-position block
    cache = model.lm.new_cache(max_len=128)
    tokens = [int(_forward(model, cache, prompt, 0)[-1].argmax())]
    single = []
    for i in range(8):
        single.append(_forward(model, cache, [tokens[-1]], len(prompt) + i)[-1])
        tokens.append(int(single[-1].argmax()))
    for k in range(1, 9):
        _poison(cache, 0, len(prompt), k)
        multi = _forward(model, cache, tokens[:k], len(prompt))
        for i, (row, ref) in enumerate(zip(multi, single[:k], strict=True)):
            assert torch.equal(row, ref), (fmt, k, i)


def _real_prompts(model: Model, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()[:: 480 // count]]
    return [
        model.tokenizer.encode_chat([{"role": "user", "content": row["turns"][0]}])
        for row in rows[:count]
    ]


def _k_token_forwards_against_single_steps(model: Model, prompts: int) -> tuple[int, int, int]:
    """(bit-identical rows, rows with the same argmax, rows) of k-token forwards, k = 1..16,
    against the greedy continuation computed one token at a time, on real prompts of many
    lengths (so verify windows cross the attention's 64-position blocks)."""
    identical = agree = total = 0
    for prompt in _real_prompts(model, prompts):
        cache = model.lm.new_cache(max_len=len(prompt) + 64)
        logits = _forward(model, cache, prompt, 0)
        tokens = [int(logits[-1].argmax())]
        single = []  # the reference: greedy continuation one token at a time
        for i in range(16):
            single.append(_forward(model, cache, [tokens[-1]], len(prompt) + i)[-1])
            tokens.append(int(single[-1].argmax()))
        for k in range(1, 17):
            # The single steps filled these positions with the same K/V: poison them, so a
            # forward that failed to write its own keys and values would read NaN.
            _poison(cache, 0, len(prompt), k)
            multi = _forward(model, cache, tokens[:k], len(prompt))
            for row, ref in zip(multi, single[:k], strict=True):
                identical += torch.equal(row, ref)
                agree += int(row.argmax()) == int(ref.argmax())
                total += 1
    print(
        f"k-token vs single steps over {total} positions: {identical} bit-identical logits, "
        f"{agree} equal argmax"
    )
    return identical, agree, total


@pytest.mark.slow
def test_k_token_forward_matches_single_steps_on_smollm2(smollm2: Model) -> None:
    """Speculative output equals plain output only if a k-token verify forward computes what
    k single-token steps compute: in the default format the logits must be bit-identical,
    not merely agree on the argmax."""
    identical, _, total = _k_token_forwards_against_single_steps(smollm2, 8)
    assert identical == total


@pytest.mark.slow
def test_k_token_forward_matches_single_steps_on_gemma3() -> None:
    """The same on Gemma 3 270M (heads of 256, sliding windows, native layers). When its
    layers ran in PyTorch, attention's float32 GEMMs summed 12 or more rows in another order
    than 4, and verify forwards of 3 or more tokens differed, up to 1.0 in a logit; the
    PyTorch formats keep that fix (matmul_rows_exact), tested on tiny models above."""
    model = load_model("gemma-3-270m", progress=False)
    identical, _, total = _k_token_forwards_against_single_steps(model, 3)
    assert identical == total


def _onednn_isa_after_import(env: dict[str, str]) -> str:
    code = "import os, specserve; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_specserve_keeps_onednn_off_amx_unless_the_user_chose() -> None:
    """oneDNN's AMX bfloat16 kernels round a row differently with the row count (seen on an
    Emerald Rapids machine by test_prefill_drafts' bfloat16 case), so the package caps oneDNN
    at AVX-512 with BF16 before any model runs; a value the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    assert _onednn_isa_after_import(env) == "AVX512_CORE_BF16"
    assert _onednn_isa_after_import({**env, "ONEDNN_MAX_CPU_ISA": "AVX2"}) == "AVX2"
