"""Token log-probabilities in OpenAI's two shapes: chat's ``logprobs.content`` and the legacy
completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``.

The numbers are the engine's (`GenerationResult.logprobs`): log-softmax of the target's
logits after the request's rules (grammar mask, penalties, logit_bias) and before
temperature / top-p, so they are the same with and without speculation and at any
temperature. A token's text is its bytes decoded as UTF-8; a token holding only part of a
character (byte-level BPE splits emoji and most CJK) shows U+FFFD there, and its ``bytes``
are the token's own raw bytes, so joining the ``bytes`` of consecutive tokens gives the text
exactly. The bytes come from llguidance's view of the vocabulary (the same one the grammars
use), which spells byte-level and SentencePiece tokens alike; special tokens are spelled as
written (``<tool_call>``).

Example (chat)::

    {"content": [{"token": "Hi", "logprob": -0.31, "bytes": [72, 105],
                  "top_logprobs": [{"token": "Hi", "logprob": -0.31, "bytes": [72, 105]}, ...]}]}
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from specserve.model.loader import Model
from specserve.speculative.grammar import ll_tokenizer
from specserve.speculative.sampling import TokenLogprob

_SPELLING_CACHE = 65536  # token ids whose bytes are kept (a vocabulary is ~50-260k)


class TokenSpeller:
    """Token ids -> their bytes and display text, for one model's vocabulary."""

    def __init__(self, model: Model) -> None:
        # Built once per vocabulary (about 1 s for 152k tokens) and shared with the grammars.
        self._ll = ll_tokenizer(model.tokenizer, model.lm.config.vocab_size)
        self.bytes_of = lru_cache(maxsize=_SPELLING_CACHE)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        return bytes(self._ll.decode_bytes([token_id]))

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        """``{"token", "logprob", "bytes"}`` of chat's logprobs."""
        return {
            "token": self.text(token_id),
            "logprob": logprob,
            "bytes": list(self.bytes_of(token_id)),
        }


def kept_logprobs(
    entries: Sequence[TokenLogprob], text: str, speller: TokenSpeller
) -> list[TokenLogprob]:
    """The entries of the tokens that made the answer: where a stop string cut the text, the
    tokens that only spelled the stop (or came after it) are dropped."""
    ids = [e.token_id for e in entries]
    offsets = text_offsets(ids, speller)
    spelled = offsets[-1] + len(speller.text(ids[-1])) if ids else 0
    if spelled <= len(text):
        return list(entries)
    return [e for e, start in zip(entries, offsets, strict=True) if start < len(text)]


def text_offsets(token_ids: Sequence[int], speller: TokenSpeller) -> list[int]:
    """Where each token starts in the decoded text, in characters. A token that continues an
    unfinished character starts at that character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, length = [], 0
    for token_id in token_ids:
        offsets.append(length)
        length += len(decoder.decode(speller.bytes_of(token_id)))
    return offsets


def chat_logprobs(entries: Sequence[TokenLogprob], speller: TokenSpeller) -> dict[str, Any]:
    """Chat's ``choices[i].logprobs``."""
    content = []
    for e in entries:
        entry = speller.entry(e.token_id, e.logprob)
        entry["top_logprobs"] = [speller.entry(i, lp) for i, lp in e.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(entries: Sequence[TokenLogprob], speller: TokenSpeller) -> dict[str, Any]:
    """The legacy completions' ``choices[i].logprobs``: ``top_logprobs`` maps each of the
    top tokens' text to its logprob, plus the chosen token (up to ``logprobs`` + 1 entries,
    as OpenAI documents); ``text_offset`` is each token's start in the completion's text."""
    tops = []
    for e in entries:
        top = {speller.text(i): lp for i, lp in e.top}
        top.setdefault(speller.text(e.token_id), e.logprob)
        tops.append(top)
    return {
        "tokens": [speller.text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": text_offsets([e.token_id for e in entries], speller),
    }
