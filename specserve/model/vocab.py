"""The one vocabulary check of every drafter: a draft's token ids must mean the target's tokens.

Deployments check it from the files' metadata (no weights read), the engine from loaded
models; both describe a vocabulary by its size and fingerprint and call `check_same_vocabulary`.

>>> big, small = Vocabulary(10, "a"), Vocabulary(8, "b")
>>> check_same_vocabulary("big", big, "big-copy", big)
>>> check_same_vocabulary("big", big, "small", small)  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
VocabularyMismatchError: draft model small cannot draft for big: their vocabularies differ \
(8 vs 10 tokens) — a draft model must share the target's tokenizer
"""

from __future__ import annotations

from dataclasses import dataclass


class VocabularyMismatchError(ValueError):
    """A drafter whose token ids do not mean what the target's mean (every draft would be
    rejected or, worse, verified against the wrong token)."""


@dataclass(frozen=True)
class Vocabulary:
    size: int  # token ids
    fingerprint: str  # `Tokenizer.vocab_fingerprint()`: the ids' spellings, hashed


def check_same_vocabulary(
    target: str, target_vocab: Vocabulary, draft: str, draft_vocab: Vocabulary
) -> None:
    """Raise `VocabularyMismatchError` unless ``draft`` may draft for ``target``."""
    if draft_vocab == target_vocab:
        return
    sizes = (
        f"{draft_vocab.size} vs {target_vocab.size} tokens"
        if draft_vocab.size != target_vocab.size
        else f"both {draft_vocab.size} tokens, spelled differently"
    )
    raise VocabularyMismatchError(
        f"draft model {draft} cannot draft for {target}: their vocabularies differ ({sizes}) "
        "— a draft model must share the target's tokenizer"
    )
