"""Request bodies of the OpenAI API subset we serve (pydantic), and how they are checked.

Unknown fields are ignored, as clients send many optional ones; fields we know but do not
support are refused with a 400 naming them, rather than silently doing something else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from specserve.server.errors import invalid

MAX_STOP_STRINGS = 4  # as OpenAI


def _encodable(text: str) -> str:
    """JSON can spell a lone surrogate (``"\\ud800"``), which is no text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (a lone surrogate)") from None
    return text


# Every string that reaches the tokenizer or the detokenizer's stop matching.
Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


def join_text(content: Text | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None


class Prediction(BaseModel):
    """Predicted Outputs: text the completion is expected to mostly repeat."""

    type: Literal["content"]
    content: Text | list[TextPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    prediction: Prediction | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: Any = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
        if any(not s for s in stops):
            raise invalid("'stop' strings must not be empty", "stop")
        return tuple(stops)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what) for each feature asked for that this server does not provide."""
        found = []
        if self.logprobs not in (None, False, 0):
            found.append(("logprobs", "log probabilities"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                found.append((name, "repetition penalties"))
        return found

    def check(self) -> None:
        """OpenAI's refusals with a prediction first (same message shape), then ours."""
        found = self.unsupported()
        if self.prediction is not None:
            refused = [(p, w) for p, w in found]
            if (self.n or 1) > 1:
                refused.insert(0, ("n", "n > 1"))
            if refused:
                param, what = refused[0]
                raise invalid(
                    f"Invalid parameter: '{param}' ({what}) is not supported with predicted "
                    "outputs.",
                    param,
                    "invalid_parameter",
                )
        if (self.n or 1) > 1:
            raise invalid("'n' must be 1: this server returns one choice per request", "n")
        if found:
            param, what = found[0]
            raise invalid(f"'{param}': {what} are not supported by this server", param)

    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    top_logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.tools or self.functions:
            found.append(("tools" if self.tools else "functions", "tools (function calling)"))
        if self.top_logprobs:
            found.append(("top_logprobs", "log probabilities"))
        return found

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": join_text(m.content)} for m in self.messages]


class CompletionRequest(CommonRequest):
    prompt: Text | list[Text] | list[int] = Field()
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echoing the prompt"))
        if self.suffix:
            found.append(("suffix", "suffixes (insertion)"))
        if self.best_of not in (None, 1):
            found.append(("best_of", "best_of > 1"))
        return found

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_input(self) -> str | list[int]:
        """The one prompt: a string or token ids (a batch of prompts is refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise invalid("'prompt': one prompt per request (send a string)", "prompt")
            return str(prompt[0])
        return prompt  # type: ignore[return-value]
