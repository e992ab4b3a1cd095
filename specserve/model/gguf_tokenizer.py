"""GGUF metadata -> a `tokenizers.Tokenizer` pipeline (model, pre-tokenizer, decoder, specials).

A GGUF carries no ``tokenizer.json``, only llama.cpp's ``tokenizer.ggml.*`` keys: the token
list, token types, and either merges (byte-level BPE, ``model == "gpt2"``) or scores
(SentencePiece BPE, ``model == "llama"``). This module rebuilds the pipeline those keys imply,
following llama.cpp's behaviour and checked id-for-id against transformers' conversion.

Example::

    >>> backend, tokens, types = backend_from_gguf(metadata, "SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> backend.encode("<|im_start|>user").ids
    [1, 4093]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from specserve.model.errors import ModelLoadError

logger = logging.getLogger(__name__)


class TokenizerLoadError(ModelLoadError, ValueError):
    """A tokenizer could not be built; the message names the source file and the problem."""


class TokenType(IntEnum):
    """llama.cpp's ``tokenizer.ggml.token_type`` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Pre-tokenizer split regexes, keyed by the family of `tokenizer.ggml.pre` names that use them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# These split every digit apart, then apply GPT-2's regex (llama.cpp groups them the same way).
_DIGIT_PRES = frozenset(("smollm", "starcoder", "refact", "codeshell", "command-r", "minerva"))
# GPT-2's own regex, which `ByteLevel(use_regex=True)` applies; also the fallback for other names.
_GPT2_PRES = frozenset(("default", "gpt-2", "gpt2", "olmo", "phi-2", "jais"))

# SentencePiece architectures whose merges follow file order rather than scores are handled by
# ranking user-defined pieces first (see `_sentencepiece_merges`), so no per-architecture table.
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_TO_CHAR.values())


def backend_from_gguf(
    metadata: Mapping[str, Any], source: str
) -> tuple[tokenizers.Tokenizer, list[str], list[int]]:
    """The backend tokenizer, the token list and the token types of a GGUF's metadata
    (`{key: field.contents()}`); `source` names the file in errors."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerLoadError(f"{source}: GGUF has no tokenizer.ggml.tokens list")
    kind = metadata.get("tokenizer.ggml.model")
    types = list(metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerLoadError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        return _byte_level_backend(metadata, tokens, types, source), tokens, types
    if kind == "llama":
        return _sentencepiece_backend(metadata, tokens, types, source), tokens, types
    raise TokenizerLoadError(
        f"{source}: unsupported tokenizer.ggml.model {kind!r} "
        "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
    )


def _byte_level_backend(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str
) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style): tokens are spelled in GPT-2's byte alphabet."""
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges_raw, list):
        raise TokenizerLoadError(f"{source}: byte-level BPE (gpt2) needs tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # A normal token outside the byte alphabet is stored as text; spell it as its bytes.
        # Control tokens keep their text: they are matched whole and decoded verbatim.
        if kind == TokenType.NORMAL and not set(token) <= _BYTE_ALPHABET:
            token = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    merges = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerLoadError(f"{source}: malformed merge {merge!r} (want 'left right')")
        merges.append((left, right))
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(
        str(metadata.get("tokenizer.ggml.pre", "default")),
        bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        source,
    )
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, types, skip=set())
    return backend


def _byte_level_pre_tokenizer(pre: str, add_prefix_space: bool, source: str) -> Any:
    """How text is cut into words before BPE, per llama.cpp's `tokenizer.ggml.pre` name."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = _SPLIT_BY_PRE.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRES:
        logger.warning("%s: unknown tokenizer.ggml.pre %r; using GPT-2's split regex", source, pre)
    return gpt2


def _sentencepiece_backend(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2, Gemma): merges are implied by the scores; unknown bytes
    fall back to `<0xNN>` tokens; spaces are spelled "▁"."""
    scores = metadata.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise TokenizerLoadError(
            f"{source}: SentencePiece (llama) vocabulary needs one tokenizer.ggml.scores per token"
        )
    # Gemma stores its whitespace-run pieces with real spaces ("  "); the text the model sees
    # has "▁" for spaces, so respell them or they could never match.
    known = set(tokens)
    spelled = [
        _SPACE * len(t) if set(t) == {" "} and _SPACE * len(t) not in known else t for t in tokens
    ]
    respelled = {i for i, (a, b) in enumerate(zip(tokens, spelled, strict=True)) if a != b}
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(spelled):
        vocab.setdefault(token, token_id)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = spelled[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    merges = _sentencepiece_merges(spelled, scores, types, respelled)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # llama.cpp's default for SentencePiece is to prefix a space (Llama 2); Gemma says False.
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # the prefixed space is not part of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, types, skip=respelled)
    return backend


def _sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int], respelled: set[int]
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    Every split of a piece into two pieces of the vocabulary is a merge. SentencePiece applies
    the highest-scoring piece first; user-defined pieces (Gemma's space runs) are matched whole
    before any merge, so they rank above all scored pieces, in file order. Ties within a piece
    go to the longer left part, as Hugging Face's converter orders them.
    """
    mergeable = {
        t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL or i in respelled
    }
    ranked: list[tuple[float, int, int, str, str]] = []  # (priority, file order, -cut, l, r)
    for piece, piece_id in mergeable.items():
        priority = -float("inf") if piece_id in respelled else -float(scores[piece_id])
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((priority, piece_id, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], types: list[int], skip: set[int]
) -> None:
    """Control tokens become special tokens and user-defined ones added tokens, so both are
    matched whole in raw text (as llama.cpp does) instead of being cut into pieces."""
    special, added = [], []
    for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if token_id in skip or not token:
            continue
        if kind == TokenType.CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TokenType.USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    # Each token is already in the model's vocabulary, so these keep their ids.
    backend.add_special_tokens(special)
    backend.add_tokens(added)
