"""The drafter format: a directory with a JSON manifest and a safetensors file (never pickle).

```
my-drafter/
  drafter.json         {"format_version": 1, "method": "eagle", "target": {...}, "config": {...},
                        "training": {...}, "created": "2025-01-01T00:00:00+00:00"}
  drafter.safetensors  the head's trainable weights in bfloat16, plus "vocab_ids" (int64)
```

The head borrows its embedding, final norm and LM head rows from the target, so a drafter
only works with the exact target it was trained for. The manifest records that target's
vocabulary fingerprint and a weights fingerprint; ``load_drafter`` refuses any other model.

>>> save_drafter(Path("smol-eagle"), head, model, {"epochs": 2})  # doctest: +SKIP
>>> head = load_drafter(Path("smol-eagle"), model)                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from specserve.model.loader import Model
from specserve.model.weights import open_weights
from specserve.speculative.eagle_head import EagleConfig, EagleHead

MANIFEST = "drafter.json"
WEIGHTS = "drafter.safetensors"
FORMAT_VERSION = 1
METHODS = ("eagle",)
VOCAB_IDS = "vocab_ids"
# Rows of the embedding that enter the weights fingerprint, from each end: enough to tell
# two trainings apart, cheap to read for a 262k-row Gemma embedding.
FINGERPRINT_ROWS = 64
SAVE_DTYPE = torch.bfloat16  # halves the file; training noise dwarfs bf16 rounding
RETRAIN_HINT = "retrain it with `specserve drafter train {name} --out DIR`"


class DrafterError(ValueError):
    """A drafter directory that is malformed or belongs to another target."""


def is_drafter_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding a drafter manifest."""
    return path.is_dir() and (path / MANIFEST).is_file()


def _as_bf16_bytes(tensor: Tensor) -> bytes:
    """float32 bytes of ``tensor`` rounded to bfloat16: the same whether the target was loaded
    in float32 or in a bf16 execution format (int4 keeps embeddings in bf16)."""
    rounded = tensor.detach().to("cpu", torch.bfloat16).float().contiguous()
    return rounded.numpy().tobytes()


def weights_fingerprint(model: Model) -> str:
    """sha256 over the target's sizes, its RMSNorm weights and a fixed sample of embedding
    rows (the first and last ``FINGERPRINT_ROWS``).

    It identifies a version of the weights (a retrained or fine-tuned model changes its norms
    and embeddings) in a few milliseconds, without hashing a whole file; it is not a
    cryptographic proof that every weight is equal. Values are rounded to bfloat16 first, so
    one GGUF loaded in any execution format gives the same fingerprint.
    """
    lm = model.lm
    cfg = lm.config
    digest = hashlib.sha256()
    sizes = [cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers]
    sizes += [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
    digest.update(json.dumps([cfg.architecture, *sizes]).encode())
    digest.update(_as_bf16_bytes(lm.output_norm))
    for block in lm.blocks:
        # Only the block's own buffers (its norms): its linear layers' buffers are packed
        # differently in every execution format, and large.
        for _, norm in sorted(block.named_buffers(recurse=False)):
            digest.update(_as_bf16_bytes(norm))
    embedding = lm.embedding
    digest.update(_as_bf16_bytes(embedding[:FINGERPRINT_ROWS]))
    digest.update(_as_bf16_bytes(embedding[-FINGERPRINT_ROWS:]))
    return digest.hexdigest()


def build_head(model: Model, config: EagleConfig, vocab_ids: Tensor) -> EagleHead:
    """A fresh head for ``model`` whose reduced LM head holds the target rows ``vocab_ids``
    (tied targets: embedding rows; untied: rows of the GGUF tensor ``output.weight``)."""
    lm = model.lm
    if lm.config.tie_embeddings:
        head_weight = lm.embedding[vocab_ids].float()
    else:
        head_weight = open_weights(model.path).load("output.weight", torch.float32)[vocab_ids]
    head = EagleHead(config, lm.embedding, lm.output_norm.float(), head_weight, vocab_ids)
    return head.to(lm.embedding.device)


def save_drafter(out_dir: Path, head: EagleHead, model: Model, training: dict[str, Any]) -> Path:
    """Write ``head`` (trained for ``model``) to ``out_dir``; returns ``out_dir``.

    The weights file is written first and the manifest last, each through a temporary name,
    so an interrupted save never leaves a directory that ``is_drafter_dir`` accepts with
    mismatched files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.lm.config
    tensors = {
        name: value.detach().to("cpu", SAVE_DTYPE).contiguous()
        for name, value in head.state_dict().items()
    }
    tensors[VOCAB_IDS] = head.vocab_ids.detach().cpu().contiguous()
    _replace(out_dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": "eagle",
        "target": {
            "name": model.name,
            "vocab_fingerprint": model.tokenizer.vocab_fingerprint(),
            "weights_fingerprint": weights_fingerprint(model),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
        },
        "config": dataclasses.asdict(head.config),
        "training": training,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    _replace(out_dir / MANIFEST, lambda tmp: tmp.write_text(text))
    return out_dir


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the drafter at ``path``, checked for format version and method."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DrafterError(f"{path}: not a drafter directory (expected a folder with {MANIFEST})")
    if not manifest_path.is_file():
        raise DrafterError(
            f"{path}: no {MANIFEST}; a drafter directory is written by `specserve drafter train`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DrafterError(f"{manifest_path}: unreadable manifest ({exc}); retrain it") from None
    if not isinstance(manifest, dict):
        raise DrafterError(f"{manifest_path}: the manifest must be a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DrafterError(
            f"{manifest_path}: drafter format_version {version!r} is not supported "
            f"(this specserve reads version {FORMAT_VERSION}); retrain the drafter"
        )
    method = manifest.get("method")
    if method not in METHODS:
        raise DrafterError(
            f"{manifest_path}: unknown drafter method {method!r}; known: {', '.join(METHODS)}"
        )
    for key in ("target", "config"):
        if not isinstance(manifest.get(key), dict):
            raise DrafterError(f"{manifest_path}: the manifest lacks its {key!r} object")
    return manifest


def _check_target(path: Path, manifest: dict[str, Any], model: Model) -> None:
    target = manifest["target"]
    trained_for = target.get("name", "another model")
    if target.get("vocab_fingerprint") != model.tokenizer.vocab_fingerprint():
        raise DrafterError(
            f"{path}: this drafter was trained for {trained_for}, whose vocabulary differs "
            f"from {model.name}'s; use a drafter trained for {model.name} or "
            + RETRAIN_HINT.format(name=model.name)
        )
    if target.get("weights_fingerprint") != weights_fingerprint(model):
        raise DrafterError(
            f"{path}: this drafter was trained for another version of {trained_for}'s weights "
            f"than {model.name} ({model.path}); " + RETRAIN_HINT.format(name=model.name)
        )


def _config(path: Path, manifest: dict[str, Any], model: Model) -> EagleConfig:
    try:
        config = EagleConfig(**manifest["config"])
    except TypeError as exc:
        raise DrafterError(f"{path / MANIFEST}: invalid drafter config ({exc})") from None
    if config.hidden_size != model.lm.config.hidden_size:
        raise DrafterError(
            f"{path}: drafter width {config.hidden_size} != {model.name}'s hidden size "
            f"{model.lm.config.hidden_size}; " + RETRAIN_HINT.format(name=model.name)
        )
    return config


def load_drafter(path: Path, model: Model, dtype: torch.dtype | None = None) -> EagleHead:
    """The EAGLE head at ``path``, attached to ``model``'s frozen tensors, ready for ``step``.

    Its matmuls (and their weights) use ``dtype``, by default the target's own
    (``model.lm.dtype``: bfloat16 for the int4 and bf16 formats, float32 for float32; see
    ``EagleHead.set_compute_dtype``), and int8 weights for an int4 target on the CPU
    (``EagleHead.quantize_int8``). Raises ``DrafterError`` for a malformed directory or
    a drafter of another target.
    """
    manifest = read_manifest(path)
    _check_target(path, manifest, model)
    config = _config(path, manifest, model)
    weights_path = path / WEIGHTS
    if not weights_path.is_file():
        raise DrafterError(f"{path}: {WEIGHTS} is missing; copy the whole drafter directory")
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise DrafterError(f"{weights_path}: unreadable weights ({exc}); retrain it") from None
    vocab_ids = tensors.pop(VOCAB_IDS, None)
    vocab_size = model.lm.embedding.shape[0]
    if vocab_ids is None or vocab_ids.shape != (config.draft_vocab_size,):
        raise DrafterError(f"{weights_path}: missing or mis-shaped {VOCAB_IDS!r}")
    if int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size:
        raise DrafterError(f"{weights_path}: {VOCAB_IDS!r} outside the target's vocabulary")
    head = build_head(model, config, vocab_ids)
    state = {name: value.float() for name, value in tensors.items()}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DrafterError(f"{weights_path}: weights do not fit the config ({exc})") from None
    head.set_compute_dtype(dtype or model.lm.dtype).eval()
    if dtype is None and model.fmt in ("int4", "gguf") and model.lm.embedding.device.type == "cpu":
        head.quantize_int8()  # a low-bit target drafts with low-bit weights (2 bytes -> 1)
    return head
