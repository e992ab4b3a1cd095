"""The packed-weights cache: a second load maps what the first packed, with the same bits,
and a cache that is cut short, wrong, stale or unwritable never stops a model loading."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from specserve.model import packed_cache, weights
from specserve.model.loader import load_model
from specserve.model.transformer import ForwardBatch
from tests.tiny import TinySpec, write_tiny_gguf

# One type per packed mode: KAFFINE, K6, SYM16 (no d array), AFFINE16 (64-byte scales).
MODES = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_1]
DAMAGES = ["cut short", "not safetensors", "a wrong shape", "another format"]


@pytest.fixture
def cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory of its own, and every GGUF file large enough to be cached."""
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(packed_cache.CACHE_ENV, raising=False)
    monkeypatch.setattr(packed_cache, "CACHE_MIN_BYTES", 0)
    return tmp_path / "home" / "packed"


def _logits(path: Path) -> torch.Tensor:
    model = load_model(str(path), progress=False)
    assert model.lm.native_plans() is not None
    batch = ForwardBatch(torch.tensor([[5, 9, 2, 7]]), [0], [0])
    return model.lm(batch, model.lm.new_cache())


def _no_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("packed again although the cache holds the tensor")

    monkeypatch.setattr(weights, "pack", refuse)


@pytest.mark.parametrize("qtype", MODES, ids=lambda t: t.name)
def test_second_load_maps_the_cache_with_the_same_bits(
    tmp_path: Path, cached: Path, monkeypatch: pytest.MonkeyPatch, qtype: Q
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=qtype))
    first = _logits(path)
    files = list(cached.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("m-")
    with monkeypatch.context() as patch:
        _no_packing(patch)
        second = _logits(path)
    monkeypatch.setenv(packed_cache.CACHE_ENV, "0")
    uncached = _logits(path)
    assert torch.equal(first, second) and torch.equal(first, uncached)


def test_small_files_and_the_switch_keep_nothing(
    tmp_path: Path, cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=Q.Q4_K))
    monkeypatch.setenv(packed_cache.CACHE_ENV, "off")
    assert packed_cache.cache_path(path) is None
    _logits(path)
    monkeypatch.setenv(packed_cache.CACHE_ENV, "1")
    monkeypatch.setattr(packed_cache, "CACHE_MIN_BYTES", path.stat().st_size + 1)
    assert packed_cache.cache_path(path) is None
    _logits(path)
    assert not cached.exists()


def _bad_cache_files(cache: Path) -> dict[str, object]:
    layout = '{"blk.0.ffn_up.weight": [1, 4, 512, 256]}'  # q of the wrong size below
    wrong_shape = {"blk.0.ffn_up.weight.q": np.zeros((3, 8, 256), np.uint8)}
    return {
        "cut short": lambda: cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2]),
        "not safetensors": lambda: cache.write_bytes(b"\x00" * 64),
        "a wrong shape": lambda: save_file(
            wrong_shape, cache, metadata={"format": packed_cache.FORMAT, "layout": layout}
        ),
        "another format": lambda: save_file(wrong_shape, cache, metadata={"format": "x"}),
    }


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_replaced(
    tmp_path: Path,
    cached: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=Q.Q4_K))
    good = _logits(path)
    cache = packed_cache.cache_path(path)
    assert cache is not None and cache.exists()
    _bad_cache_files(cache)[damage]()  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger=packed_cache.__name__):
        assert torch.equal(_logits(path), good)
    assert "packing the weights again" in caplog.text
    _no_packing(monkeypatch)  # packed again and written whole: the next load maps it
    assert torch.equal(_logits(path), good)


def test_a_changed_model_gets_a_new_cache_and_the_old_one_goes(
    tmp_path: Path, cached: Path
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=Q.Q4_K))
    _logits(path)
    before = packed_cache.cache_path(path)
    write_tiny_gguf(path, TinySpec(linear_type=Q.Q4_K, seed=1))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # whatever the clock
    after = packed_cache.cache_path(path)
    assert after != before
    _logits(path)
    assert [p.name for p in cached.glob("*.safetensors")] == [after.name]  # type: ignore[union-attr]


def test_a_new_cache_removes_those_no_load_can_use(tmp_path: Path, cached: Path) -> None:
    kept = write_tiny_gguf(tmp_path / "kept.gguf", TinySpec(linear_type=Q.Q4_K))
    gone = write_tiny_gguf(tmp_path / "gone.gguf", TinySpec(linear_type=Q.Q8_0))
    _logits(kept), _logits(gone)
    assert len(list(cached.glob("*.safetensors"))) == 2  # both GGUF files still there
    gone.unlink()
    older = cached / "older-0123abcd-0123456789abcdef.safetensors"  # format 1: no source
    save_file({"x": np.zeros(4, np.uint8)}, older, metadata={"format": "specserve-packed-1"})
    third = write_tiny_gguf(tmp_path / "third.gguf", TinySpec(linear_type=Q.Q6_K))
    _logits(third)
    left = sorted(p.name for p in cached.glob("*.safetensors"))
    assert left == sorted(packed_cache.cache_path(p).name for p in (kept, third))  # type: ignore[union-attr]


def test_an_unwritable_cache_directory_only_warns(
    tmp_path: Path, cached: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cached.parent.mkdir(parents=True)
    cached.write_text("a file where the directory should be")
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(linear_type=Q.Q4_K))
    with caplog.at_level(logging.WARNING, logger=packed_cache.__name__):
        logits = _logits(path)
    assert torch.isfinite(logits).all()
    assert "cannot write the packed-weights cache" in caplog.text
    assert not list(tmp_path.glob("home/**/.packing-*"))
