"""Our forward pass against the `transformers` implementation of the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specserve.model.catalog import resolve
from specserve.model.loader import load_model
from specserve.model.tokenizer import Tokenizer
from specserve.model.transformer import ForwardBatch
from specserve.model.weights import open_weights
from tests.tiny import TinySpec, write_tiny_gguf

# float32 logits of the same weights: differences are summation order only.
ABS_TOLERANCE = 2e-3


def _ours(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(str(path), dtype="float32", progress=False)
    return model.lm(ForwardBatch(tokens, [0], [0]), model.lm.new_cache())


def _theirs(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    with torch.no_grad():
        return hf(tokens).logits


def _check(path: Path, tokens: torch.Tensor) -> None:
    ours, theirs = _ours(path, tokens), _theirs(path, tokens)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < ABS_TOLERANCE * max(1.0, theirs.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    "spec",
    [
        TinySpec(),
        # 6 layers: five sliding-window layers and one global one; a window of 8 < 40 tokens.
        TinySpec(architecture="gemma3", heads=2, kv_heads=1, head_dim=256, layers=6),
    ],
    ids=["llama", "gemma3"],
)
def test_tiny_gguf_matches_transformers(tmp_path: Path, spec: TinySpec) -> None:
    path = write_tiny_gguf(tmp_path / f"{spec.architecture}.gguf", spec)
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    _check(path, tokens)


def test_tiny_qwen2_safetensors_with_qkv_bias_matches_transformers(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    config = Qwen2Config(
        vocab_size=262,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # random init leaves biases at zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    # The directory also needs a tokenizer.json: borrow the tiny GGUF's vocabulary.
    tokenizer = Tokenizer.from_gguf_metadata(open_weights(tiny_gguf).metadata, "tiny")
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    tokens = torch.randint(0, 262, (1, 30), generator=torch.Generator().manual_seed(1))
    _check(tmp_path, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_model_logits_match_transformers(name: str) -> None:
    path, _ = resolve(name)
    tokens = torch.randint(3, 2000, (1, 48), generator=torch.Generator().manual_seed(2))
    _check(path, tokens)
