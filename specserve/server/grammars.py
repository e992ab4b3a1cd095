"""The grammar a request's output must follow: its ``response_format``, or the tool call its
``tool_choice`` requires; compiled once per (grammar, vocabulary) and kept in an LRU.

Compiling costs ~1 ms for a small schema (more for large ones); the first grammar of a
vocabulary also builds llguidance's view of it (~1 s for 152k tokens, once per process,
`grammar.ll_tokenizer`). Callers run these functions in a worker thread. Compiled grammars
are immutable: every request (and each of its n choices) takes its own matcher from one.

    >>> grammar = response_format_grammar(model, {"type": "json_object"})
    >>> grammar is response_format_grammar(model, {"type": "json_object"})   # cached
    True
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from specserve.model.loader import Model
from specserve.server.errors import invalid
from specserve.server.tool_grammar import tool_call_grammar
from specserve.server.tools import OPEN_TAG, ToolRequest
from specserve.speculative.grammar import GrammarError, TokenGrammar

GRAMMAR_CACHE_SIZE = 64

_Key = tuple[str, int, str, str]  # (vocabulary fingerprint, vocab size, kind, grammar text)


class GrammarCache:
    """Least recently used compiled grammars, shared by every deployment of the process."""

    def __init__(self, size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[_Key, TokenGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _Key, compile: Callable[[], TokenGrammar]) -> TokenGrammar:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        grammar = compile()  # outside the lock: a slow schema does not hold up the others
        with self._lock:
            self._entries[key] = grammar
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return grammar

    def __len__(self) -> int:
        return len(self._entries)


CACHE = GrammarCache()


def _key(model: Model, kind: str, text: str) -> _Key:
    return (model.tokenizer.vocab_fingerprint(), model.lm.config.vocab_size, kind, text)


def response_format_grammar(
    model: Model, response_format: Mapping[str, Any] | None
) -> TokenGrammar | None:
    """The grammar of an OpenAI ``response_format`` (None for none or ``"text"``); a schema
    llguidance cannot compile is a 400 naming the problem (param ``response_format``)."""
    if response_format is None or response_format.get("type") == "text":
        return None
    text = json.dumps(response_format, sort_keys=True)

    def compile() -> TokenGrammar:
        vocab = model.lm.config.vocab_size
        grammar = TokenGrammar.from_response_format(
            response_format, model.tokenizer, vocab_size=vocab
        )
        assert grammar is not None  # only "text" has none
        return grammar

    try:
        return CACHE.get(_key(model, "response_format", text), compile)
    except GrammarError as exc:
        raise invalid(str(exc), "response_format") from None


def tool_choice_grammar(model: Model, request: ToolRequest) -> TokenGrammar | None:
    """The grammar that makes the model call a tool when ``tool_choice`` is "required" or
    names a function (None for "auto" / "none"); schemas it cannot enforce are a 400 on
    ``tools``."""
    tag_tokens = model.tokenizer.token_to_id(OPEN_TAG) is not None
    text = tool_call_grammar(request.tools, request.choice, request.parallel, tag_tokens=tag_tokens)
    if text is None:
        return None

    def compile() -> TokenGrammar:
        vocab = model.lm.config.vocab_size
        return TokenGrammar.lark(text, model.tokenizer, vocab_size=vocab)

    try:
        return CACHE.get(_key(model, "tools", text), compile)
    except GrammarError as exc:
        raise invalid(f"cannot enforce tool_choice with these tools: {exc}", "tools") from None
