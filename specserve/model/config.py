"""Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from specserve.model.errors import ModelLoadError

# GGUF `general.architecture` / HF `model_type` values of the Llama family: one implementation.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GEMMA3 = ("gemma3", "gemma3_text")
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + GEMMA3

# Gemma 3 facts that its GGUF files do not carry (values of the reference implementation).
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer attends globally, the others in a window


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about an architecture."""

    architecture: str  # "llama" (the whole Llama family) or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_base: float
    max_context: int
    # Gemma 3: layers with a sliding window use their own RoPE base.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local_base: float | None = None
    qk_norm: bool = False
    # Gemma multiplies embeddings by sqrt(hidden_size) and uses tanh-GELU; Llama uses SiLU.
    embedding_scale: float = 1.0
    activation: str = "silu"
    query_scale: float = 0.0  # 0 -> 1 / sqrt(head_dim)
    tie_embeddings: bool = True

    @property
    def attention_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]


def _gemma3_sliding_layers(num_layers: int) -> tuple[bool, ...]:
    return tuple((i + 1) % GEMMA3_SLIDING_PATTERN != 0 for i in range(num_layers))


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    """Build a ``ModelConfig`` from GGUF key/values (``{key: field.contents()}``)."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported architecture {arch!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks '{arch}.{key}'")
        return value

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    num_layers = int(get("block_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    common: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_base=float(get("rope.freq_base", 10_000.0)),
        max_context=int(get("context_length")),
        tie_embeddings="output.weight" not in tensor_names,
    )
    if arch in GEMMA3:
        return ModelConfig(
            architecture="gemma3",
            sliding_window=int(get("attention.sliding_window")),
            sliding_layers=_gemma3_sliding_layers(num_layers),
            rope_local_base=GEMMA3_LOCAL_ROPE_BASE,
            qk_norm=True,
            embedding_scale=hidden**0.5,
            activation="gelu_tanh",
            query_scale=head_dim**-0.5,
            **common,
        )
    return ModelConfig(architecture="llama", **common)


def config_from_hf(cfg: Mapping[str, Any], source: str) -> ModelConfig:
    """Build a ``ModelConfig`` from a Hugging Face ``config.json``."""
    model_type = str(cfg.get("model_type", ""))
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported model_type {model_type!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(cfg["num_hidden_layers"])
        rope_params = cfg.get("rope_parameters") or {}
        common: dict[str, Any] = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=float(cfg.get("rope_theta") or rope_params.get("rope_theta", 10_000.0)),
            max_context=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type in GEMMA3)),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source}: config.json lacks {exc}") from None
    if model_type in GEMMA3:
        layer_types = cfg.get("layer_types")
        sliding = (
            tuple(t == "sliding_attention" for t in layer_types)
            if layer_types
            else _gemma3_sliding_layers(num_layers)
        )
        return ModelConfig(
            architecture="gemma3",
            sliding_window=int(cfg.get("sliding_window", 512)),
            sliding_layers=sliding,
            rope_local_base=float(cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE)),
            qk_norm=True,
            embedding_scale=hidden**0.5,
            activation="gelu_tanh",
            query_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            **common,
        )
    return ModelConfig(architecture="llama", **common)
