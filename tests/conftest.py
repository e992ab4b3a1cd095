from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specserve.model.loader import Model, load_model
from tests.tiny import TinySpec, write_tiny_gguf

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf: Path) -> Model:
    return load_model(str(tiny_gguf), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def native_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny Q4_K GGUF on the native runtime (the real models' path)."""
    path = tmp_path_factory.mktemp("native") / "tiny-q4_k.gguf"
    model = load_model(str(write_tiny_gguf(path, TinySpec(linear_type=Q.Q4_K))), progress=False)
    assert model.lm.native_plans() is not None
    return model


@pytest.fixture(scope="session")
def bf16_model(tiny_gguf: Path) -> Model:
    """The tiny Llama in bfloat16: rows independent of the row count, unlike float32's CPU
    GEMMs (tests/unit/test_kv_cache.py)."""
    return load_model(str(tiny_gguf), dtype="bfloat16", progress=False)


@pytest.fixture(params=["bfloat16", "native-q4_k"])
def exact_model(request: pytest.FixtureRequest, bf16_model: Model, native_model: Model) -> Model:
    """Each format whose rows come out the same bits whatever else a forward computes."""
    return bf16_model if request.param == "bfloat16" else native_model


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """The real SmolLM2-135M-Instruct in the default format, shared by all slow tests."""
    return load_model("smollm2-135m-instruct", progress=False)


def train_tiny_drafter(target: Path, out: Path) -> Path:
    """Train an EAGLE drafter for a tiny model by the real command (a few seconds)."""
    from specserve.cli import main

    argv = ["drafter", "train", str(target), "--out", str(out), "--prompts", "20"]
    argv += ["--max-tokens", "24", "--epochs", "3", "--draft-vocab", "64", "--dtype", "float32"]
    argv += ["--unroll-steps", "2"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def drafter_dir(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAGLE drafter trained for the tiny model."""
    return train_tiny_drafter(tiny_gguf, tmp_path_factory.mktemp("drafter") / "tiny-eagle")
