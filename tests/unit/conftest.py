"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from specserve.model.catalog import QWEN_CODER_1_5B
from specserve.model.tokenizer import Tokenizer
from tests.unit.tool_samples import qwen_metadata


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Tokenizer:
    """Qwen2.5-Coder-1.5B-Instruct's tokenizer and template, from its GGUF (~1 s)."""
    filename = QWEN_CODER_1_5B.filename
    return Tokenizer.from_gguf_metadata(qwen_metadata(filename), filename)
