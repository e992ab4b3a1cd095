"""Incremental detokenization: token ids arrive a few at a time, text leaves as it completes.

Decoding one token alone is wrong in two ways: a byte-level or byte-fallback token may hold
only part of a UTF-8 character, and a SentencePiece "▁word" token only shows its leading
space next to the token before it. So each step decodes a short window of ids twice, with and
without the new ones, and emits the difference (the scheme of vLLM and TGI)::

    ids:   ... | prefix_offset ........ read_offset | new ids ...
                 \\- already emitted, kept as context -/

If the window's text ends in U+FFFD (an unfinished character), nothing is emitted and the
offsets stay put until more bytes arrive. With a byte-fallback vocabulary (SentencePiece), a
trailing run of `<0xNN>` tokens is held until it ends too: the decoder replaces a whole run
when any byte in it is invalid, so only a closed run's text is final. The cost per step is
bounded by the window, not by the length of the sequence.

Example::

    >>> detok = IncrementalDetokenizer(smollm2_tokenizer)
    >>> ids = smollm2_tokenizer.encode("Hi 😀!")        # 'Hi', 'ĠðŁĺ', 'Ģ', '!'
    >>> [detok.push(i) for i in ids]
    ['Hi', '', ' 😀', '!']        # the emoji's first token is held until its last byte comes
    >>> detok.flush()
    ''
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from specserve.model.tokenizer import Tokenizer

# How many prompt tokens to keep as context for the first generated tokens (vLLM uses 5):
# enough to give a "▁word" its space and to finish a character split across tokens.
PROMPT_CONTEXT_TOKENS = 5
# Drop consumed ids from the front of the buffer once this many pile up (keeps memory flat).
_COMPACT_AFTER = 256
_REPLACEMENT_CHAR = "\ufffd"
# A byte-fallback run is at most a few characters in practice (4 bytes each).
_MAX_OPEN_BYTE_RUN = 64


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into a stream of text pieces.

    Without `prompt_ids_tail`, the concatenation of every `push` and the final `flush` equals
    `tokenizer.decode(all_pushed_ids, skip_special_tokens)` (for any ids, unless a run of
    byte-fallback tokens outgrows `_MAX_OPEN_BYTE_RUN`). With it, the generated text is
    decoded in the prompt's context (e.g. the first token's leading space is kept).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids_tail: Sequence[int] = (),
        *,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        tail = list(prompt_ids_tail)[-PROMPT_CONTEXT_TOKENS:] if prompt_ids_tail else []
        self._ids: list[int] = tail
        self._prefix_offset = 0  # start of the context window
        self._read_offset = len(tail)  # everything before this has been emitted
        self._prefix_text: str | None = None  # cached decode of ids[prefix:read]

    def push(self, token_ids: Iterable[int] | int) -> str:
        """Add newly generated ids (one, or several accepted at once); return the text they
        complete, or "" while a character is still unfinished."""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an unfinished character, as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        stop = len(self._ids) if final else self._decodable_end()
        if stop <= self._read_offset:
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset : stop])
        if not final and full_text.endswith(_REPLACEMENT_CHAR):
            return ""  # an unfinished UTF-8 character: wait for its other bytes
        # Shorter text means only skipped special tokens arrived: consume them silently.
        new_text = full_text[len(self._prefix_text) :]
        self._advance(stop)
        return new_text

    def _decodable_end(self) -> int:
        """End of the ids whose text is final: before a trailing run of byte-fallback tokens.

        A byte-fallback decoder turns a whole run of `<0xNN>` tokens into U+FFFDs when any byte
        in it is invalid, so text from an open run could still change. Runs longer than
        `_MAX_OPEN_BYTE_RUN` are released anyway to keep each step cheap.
        """
        byte_ids, stop = self._tokenizer.byte_token_ids, len(self._ids)
        if not byte_ids:
            return stop
        while stop > self._read_offset and self._ids[stop - 1] in byte_ids:
            stop -= 1
        return stop if len(self._ids) - stop <= _MAX_OPEN_BYTE_RUN else len(self._ids)

    def _advance(self, stop: int) -> None:
        """The emitted ids become the next window's context."""
        self._prefix_offset = self._read_offset
        self._read_offset = stop
        self._prefix_text = None
        if self._prefix_offset >= _COMPACT_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
