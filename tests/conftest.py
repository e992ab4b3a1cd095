from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specserve.model.loader import Model, load_model
from tests.tiny import write_tiny_gguf

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf: Path) -> Model:
    return load_model(str(tiny_gguf), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """The real SmolLM2-135M-Instruct in the default format, shared by all slow tests."""
    return load_model("smollm2-135m-instruct", progress=False)
