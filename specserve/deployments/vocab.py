"""Vocabulary facts about models, read from their tokenizers only — never their weights.

A draft model must agree with its target on every token id, so the control plane compares
vocabulary fingerprints (`Tokenizer.vocab_fingerprint`) at create time, and recognises the
family of a local model by the same fingerprint (`FALLBACK_DRAFTERS`). Building a tokenizer
costs up to ~2 s (Gemma 3's 262k tokens), so vocabulary sizes are compared first and every
fact is cached per file version (path, size, mtime): `deployment list` asks again and again.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from specserve.model import catalog
from specserve.model.errors import ModelLoadError
from specserve.model.gguf_file import GGUFFile, GGUFFormatError
from specserve.model.tokenizer import Tokenizer
from specserve.model.vocab import Vocabulary, VocabularyMismatchError
from specserve.model.vocab import check_same_vocabulary as check_vocabulary

logger = logging.getLogger(__name__)
# A directory with it is a trained drafter (speculative/head_artifact.py).
DRAFTER_MANIFEST = "drafter.json"
_Stamp = tuple[int, int]  # (size, mtime in ns) of the file the tokenizer is read from


def _tokenizer_file(path: Path) -> Path:
    """The file a model's tokenizer lives in: the GGUF itself, or a directory's tokenizer.json."""
    return path / "tokenizer.json" if path.is_dir() else path


def _stamp(path: Path) -> _Stamp:
    try:
        stat = _tokenizer_file(path).stat()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read its tokenizer: {exc.strerror}") from None
    return stat.st_size, stat.st_mtime_ns


def _gguf_metadata(path: Path) -> dict[str, object]:
    try:
        return GGUFFile(path).metadata
    except GGUFFormatError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def _read_tokenizer(path: Path) -> Tokenizer:
    if path.is_dir():
        return Tokenizer.from_pretrained_dir(path)
    return Tokenizer.from_gguf_metadata(_gguf_metadata(path), str(path))


@functools.cache
def _vocab_size(path: Path, stamp: _Stamp) -> int:
    if path.is_dir():
        return _read_tokenizer(path).vocab_size
    tokens = _gguf_metadata(path).get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise ModelLoadError(f"{path}: GGUF has no tokenizer.ggml.tokens list")
    return len(tokens)


@functools.cache
def _fingerprint(path: Path, stamp: _Stamp) -> str:
    return _read_tokenizer(path).vocab_fingerprint()


def vocab_size_of(path: Path) -> int:
    """The number of token ids of the model at ``path`` (cached per file version)."""
    return _vocab_size(path, _stamp(path))


def fingerprint_of(path: Path) -> str:
    """The vocabulary fingerprint of the model at ``path`` (cached per file version)."""
    return _fingerprint(path, _stamp(path))


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer of a catalog model or a local GGUF / safetensors model, from its metadata
    alone (no weights are read)."""
    path, _ = catalog.resolve(name_or_path)
    return _read_tokenizer(path)


def weight_bytes(path: Path) -> int:
    """The size of a model's weights: the GGUF file, or a directory's *.safetensors files."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def check_files_share_vocabulary(target: str, draft: str) -> None:
    """Refuse ``draft`` (a name or path) as drafter of ``target`` unless they share a vocabulary.

    Raises `VocabularyMismatchError`, e.g. "draft model gemma-3-270m cannot draft for
    smollm2-135m-instruct: their vocabularies differ (262144 vs 49152 tokens) — ...".
    """
    target_path, _ = catalog.resolve(target)
    draft_path, _ = catalog.resolve(draft)
    if (draft_path / DRAFTER_MANIFEST).is_file():  # a trained head: its manifest names its target
        _check_trained_drafter(target, target_path, draft_path)
        return
    check_vocabulary(target, *_vocabularies(target_path, draft_path, draft))


def _vocabularies(target: Path, draft_path: Path, draft: str) -> tuple[Vocabulary, str, Vocabulary]:
    """Sizes first: the fingerprints (up to ~2 s each) only when the sizes agree."""
    target_size, draft_size = vocab_size_of(target), vocab_size_of(draft_path)
    if target_size != draft_size:
        return Vocabulary(target_size, ""), draft, Vocabulary(draft_size, "")
    return (
        Vocabulary(target_size, fingerprint_of(target)),
        draft,
        Vocabulary(draft_size, fingerprint_of(draft_path)),
    )


def _check_trained_drafter(target: str, target_path: Path, drafter: Path) -> None:
    """A trained drafter (EAGLE head) is tied to one target's vocabulary (and weights: checked
    when the server loads it, as that needs the weights)."""
    try:
        manifest = json.loads((drafter / DRAFTER_MANIFEST).read_text(encoding="utf-8"))
        trained_for = manifest["target"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VocabularyMismatchError(f"{drafter}: unreadable drafter manifest ({exc})") from None
    if trained_for.get("vocab_fingerprint") != fingerprint_of(target_path):
        raise VocabularyMismatchError(
            f"drafter {drafter} was trained for {trained_for.get('name')}, whose vocabulary "
            f"differs from {target}'s; train one for {target} with `specserve drafter train`"
        )


def family_of_local_model(path: Path) -> str | None:
    """The `FALLBACK_DRAFTERS` family whose drafter has exactly the tokenizer of ``path``.

    Drafters whose weights package is not installed are skipped: they could not draft anyway.
    A drafter whose catalog entry pins another vocabulary size is skipped before its weights
    are located, so deploying e.g. a SmolLM2 model never joins the Qwen drafter's chunks.
    """
    size = vocab_size_of(path)
    for family, drafter in catalog.FALLBACK_DRAFTERS.items():
        entry = catalog.CATALOG.get(drafter)
        if entry is not None and entry.vocab_size not in (None, size):
            continue  # known to differ: no need to resolve (for chunked weights, join) it
        try:
            drafter_path, _ = catalog.resolve(drafter)
            same_size = vocab_size_of(drafter_path) == size
        except ModelLoadError as exc:
            logger.debug("fallback drafter %s unavailable: %s", drafter, exc)
            continue
        if same_size and fingerprint_of(drafter_path) == fingerprint_of(path):
            return family
    return None


def fallback_drafter_for(path: Path) -> str | None:
    """The catalog name of the family drafter for the local model at ``path``, if it has one
    and is bigger than that drafter (a local copy of the drafter must not draft for itself).

    Unreadable models get None (and a warning): this feeds `deployment list`, which must not
    fail because one deployment's file moved.
    """
    try:
        family = family_of_local_model(path)
        if family is None:
            return None
        drafter = catalog.FALLBACK_DRAFTERS[family]
        drafter_path, _ = catalog.resolve(drafter)
        return drafter if weight_bytes(path) > weight_bytes(drafter_path) else None
    except (ModelLoadError, OSError, ValueError) as exc:
        logger.warning("%s: no fallback drafter: %s", path, exc)
        return None
