"""Generated ids -> text, with stop strings, without ever emitting text a stop would cut."""

from __future__ import annotations

from collections.abc import Sequence

from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.model.tokenizer import Tokenizer


class TextAssembler:
    """Accumulates generated text; ``add`` returns the part that is safe to stream.

    Text that could still be the start of a stop string is held back until it cannot be,
    so a streamed response never shows characters that the final one drops.

    >>> # with stop=("\\n\\n",): pieces "Hi", "\\n", "\\nmore" stream as "Hi", "", and then
    >>> # the stop is found: finished is True and text is "Hi".
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0  # characters of self.text already returned
        self.finished = False  # a stop string was found

    def add(self, token_ids: Sequence[int]) -> str:
        if self.finished:
            return ""
        self.text += self._detok.push(list(token_ids))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.finished:
            self.text += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # Search only where a new stop could begin: after what was sent, minus the hold.
        search_from = max(0, self._sent - self._hold)
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finished = True
            final = True
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        piece = self.text[self._sent : end]
        self._sent = end
        return piece
