"""Tool calls out of generated text: whole (`parse_tool_calls`) or as it streams
(`ToolCallStream`), in OpenAI's `message.tool_calls` and `delta.tool_calls` shapes.

A *block* is `<tool_call>...</tool_call>`; it is a *call* when the JSON inside is an object
with a string `name` (and an `arguments` object). Everything else is *content*, kept as
written, except whitespace right before a call and whitespace-only text after the last call
(the newlines around blocks). A block that is not a call stays in the content, tags included:
no text is dropped. With `parallel=False` only the first call is returned; later ones are
dropped.

The stream holds back only trailing whitespace and a possible start of `<tool_call>` while
outside a block, and a block until it closes; its deltas concatenate to the whole parse.

Example::

    >>> stream = ToolCallStream(new_id=lambda: "call_1")
    >>> stream.feed("Sure.\\n<tool_")
    [{'content': 'Sure.'}]
    >>> stream.feed('call>\\n{"name": "f", "arguments": {}}\\n</tool_call>')[0]
    {'tool_calls': [{'index': 0, 'id': 'call_1', 'type': 'function', 'function': \
{'name': 'f', 'arguments': ''}}]}
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specserve.server.tools import CLOSE_TAG, OPEN_TAG

CALL_ID_PREFIX, CALL_ID_LENGTH = "call_", 24  # OpenAI's ids look like call_ + 24 characters
_ID_ALPHABET = string.ascii_letters + string.digits
# Splits text into [content, block body, content, block body, ..., content].
_BLOCKS = re.compile(re.escape(OPEN_TAG) + "(.*?)" + re.escape(CLOSE_TAG), re.DOTALL)


def new_call_id() -> str:
    """An OpenAI-style call id: "call_" and 24 random letters and digits."""
    return CALL_ID_PREFIX + "".join(secrets.choice(_ID_ALPHABET) for _ in range(CALL_ID_LENGTH))


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) from the text between the tags, or None when it is
    not a call. Qwen2.5-Coder-1.5B's template shows the model the format as
    `{{"name": ...}}` (a Jinja escape that leaked into its prompt text), so one doubled pair
    of braces around the object is accepted too."""
    text = body.strip()
    candidates = [text]
    if text.startswith("{{") and text.endswith("}}"):
        candidates.append(text[1:-1])
    for candidate in candidates:
        try:
            call = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return call["name"], json.dumps(arguments, ensure_ascii=False)
    return None


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One entry of OpenAI's `message.tool_calls`."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_finish_reason(called: bool, reason: str) -> str:
    """ "tool_calls" when the answer made calls and ended by itself; a cut-off answer keeps
    "length" so the client knows it is incomplete."""
    return "tool_calls" if called and reason == "stop" else reason


@dataclass
class ParsedOutput:
    """`content` is None when the answer has calls and no other text."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_tool_calls(
    text: str, *, parallel: bool = True, new_id: Callable[[], str] = new_call_id
) -> ParsedOutput:
    """The content and the calls of a whole answer (see the module docstring for the rules)."""
    pieces = _BLOCKS.split(text)
    outside, bodies = pieces[0::2], pieces[1::2]
    calls = [parse_call(body) for body in bodies]
    content: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for index, segment in enumerate(outside):
        if index < len(bodies) and calls[index] is not None:
            segment = segment.rstrip()
        if index == len(bodies) and index > 0 and calls[-1] is not None and segment.isspace():
            segment = ""
        content.append(segment)
        if index == len(bodies):
            break
        call = calls[index]
        if call is None:
            content.append(OPEN_TAG + bodies[index] + CLOSE_TAG)
        elif parallel or not tool_calls:
            tool_calls.append(tool_call(new_id(), *call))
    joined = "".join(content)
    return ParsedOutput(None if tool_calls and not joined else joined, tool_calls)


class ToolCallStream:
    """Text deltas in, OpenAI `delta` dicts out; `feed` each piece, then `finish` once.

    Each call comes out as two deltas: the header (index, id, type, name, empty arguments)
    and then all its arguments, once the block closes. `called` says whether any call came.
    """

    def __init__(self, *, parallel: bool = True, new_id: Callable[[], str] = new_call_id) -> None:
        self._parallel = parallel
        self._new_id = new_id
        self._buffer = ""  # not yet emitted: a held tail, or an open block from its tag on
        self._held = ""  # the whitespace before an open block, dropped if it is a call
        self._in_block = False
        self._after_call = False  # a call closed, and no content came since
        self.calls = 0

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        deltas: list[dict[str, Any]] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        """Everything held back is content now (an unclosed block included)."""
        deltas: list[dict[str, Any]] = []
        # Whitespace-only text after the last call is dropped, as in `parse_tool_calls`.
        if not (self._after_call and self._buffer.isspace()):
            _content(deltas, self._held + self._buffer)
        self._held, self._buffer, self._in_block = "", "", False
        return deltas

    def _step(self, deltas: list[dict[str, Any]]) -> bool:
        """Consume what the buffer allows; True when another step may consume more."""
        if self._in_block:
            end = self._buffer.find(CLOSE_TAG, len(OPEN_TAG))
            if end < 0:
                return False
            end += len(CLOSE_TAG)
            self._close_block(self._buffer[:end], deltas)
            self._buffer, self._in_block = self._buffer[end:], False
            return True
        start = self._buffer.find(OPEN_TAG)
        if start >= 0:
            before = self._buffer[:start]
            kept = before.rstrip()
            self._emit(deltas, kept)
            self._held, self._buffer = before[len(kept) :], self._buffer[start:]
            self._in_block = True
            return True
        cut = len(self._buffer) - _held_tail(self._buffer)
        self._emit(deltas, self._buffer[:cut])
        self._buffer = self._buffer[cut:]
        return False

    def _emit(self, deltas: list[dict[str, Any]], text: str) -> None:
        if text:
            self._after_call = False
            _content(deltas, text)

    def _close_block(self, block: str, deltas: list[dict[str, Any]]) -> None:
        call = parse_call(block[len(OPEN_TAG) : -len(CLOSE_TAG)])
        if call is None:
            self._emit(deltas, self._held + block)
        else:
            self._after_call = True
            if self._parallel or self.calls == 0:
                name, arguments = call
                header = tool_call(self._new_id(), name, "")
                deltas.append({"tool_calls": [{"index": self.calls, **header}]})
                deltas.append(
                    {"tool_calls": [{"index": self.calls, "function": {"arguments": arguments}}]}
                )
                self.calls += 1
        self._held = ""


def _held_tail(text: str) -> int:
    """How many trailing characters may still turn out to precede or start a block: the
    longest end of `text` that begins `<tool_call>`, and the whitespace before it."""
    size = next(
        (n for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1) if text.endswith(OPEN_TAG[:n])),
        0,
    )
    rest = text[: len(text) - size]
    return size + len(rest) - len(rest.rstrip())


def _content(deltas: list[dict[str, Any]], text: str) -> None:
    """Append `text` as content, merged into a content delta just before it."""
    if not text:
        return
    if deltas and "content" in deltas[-1]:
        deltas[-1]["content"] += text
    else:
        deltas.append({"content": text})
