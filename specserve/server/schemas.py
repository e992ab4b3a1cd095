"""Request bodies of the OpenAI API subset we serve (pydantic), and how they are checked.

Unknown fields are ignored, as clients send many optional ones; fields we know but do not
support are refused with a 400 naming them, rather than silently doing something else.
Bounds that pydantic checks (``n``, ``top_logprobs``, penalties, ``logit_bias`` values) are
in the app's OpenAPI document too, and their errors are OpenAI-shaped 400s (`errors.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from specserve.server.errors import invalid
from specserve.speculative.sampling import MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4  # as OpenAI
# Choices per request (n): each is a sequence of its own in the engine's batch, so this is
# also the most batch rows one request can take. One place, documented in docs/serving.md.
MAX_N = 8
MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound on `logprobs`


def _encodable(text: str) -> str:
    """JSON can spell a lone surrogate (``"\\ud800"``), which is no text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (a lone surrogate)") from None
    return text


# Every string that reaches the tokenizer or the detokenizer's stop matching.
Text = Annotated[str, AfterValidator(_encodable)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule
PromptText = Annotated[Text, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # JSON keys are strings
Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


def join_text(content: Text | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"  # a JSON object, as text (OpenAI's shape)


class ToolCall(BaseModel):
    """A call an earlier assistant message made (sent back with the tool's answer)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class FunctionTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: aliased (requests still say "schema").
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def as_openai(self) -> dict[str, Any]:
        """The object as the client wrote it (``schema``, not the field's Python name)."""
        return self.model_dump(by_alias=True, exclude_none=True)


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
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    prediction: Prediction | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Token ids (as strings, JSON keys) -> added to their logits.
    logit_bias: dict[TokenIdKey, Bias] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
        if any(not s for s in stops):
            raise invalid("'stop' strings must not be empty", "stop")
        return tuple(stops)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs (at most 300, as OpenAI)."""
        entries = self.logit_bias or {}
        if len(entries) > MAX_LOGIT_BIAS_ENTRIES:
            raise invalid(
                f"'logit_bias' takes at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(entries)}",
                "logit_bias",
            )
        return tuple((int(key), value) for key, value in entries.items())  # keys: TokenIdKey

    @property
    def choices(self) -> int:
        return self.n or 1

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what) for each feature asked for that this server does not provide."""
        return []

    def check(self) -> None:
        """Checks that need no model: OpenAI's refusal with a prediction, then ours."""
        if self.prediction is not None and self.choices > 1:
            raise invalid(
                "Invalid parameter: 'n' (n > 1) is not supported with predicted outputs.",
                "n",
                "invalid_parameter",
            )
        found = self.unsupported()
        if found:
            param, what = found[0]
            raise invalid(f"'{param}': {what} are not supported by this server", param)
        self.stop_strings()
        self.bias_pairs()

    def token_limit(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives to report per token."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Annotated[list[FunctionTool], Field(min_length=1)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Deprecated by OpenAI, refused here; left out of the OpenAPI document (SkipJsonSchema),
    # as are the completions fields below that are refused.
    functions: SkipJsonSchema[list[dict[str, Any]] | None] = None
    function_call: SkipJsonSchema[str | dict[str, Any] | None] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                found.append((name, "the deprecated function-calling fields (send 'tools')"))
        return found

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.tools and self.tool_choice != "none":
            raise invalid(
                "'response_format' cannot be combined with 'tools' (unless tool_choice is "
                "'none'): this server enforces one grammar per request",
                "response_format",
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": join_text(m.content)} for m in self.messages]

    def raw_messages(self) -> list[dict[str, Any]]:
        """The messages as OpenAI's JSON (for `tools.template_messages`)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def raw_tools(self) -> list[dict[str, Any]] | None:
        return None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools]

    def raw_tool_choice(self) -> Any:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


class CompletionRequest(CommonRequest):
    prompt: PromptText | list[PromptText] | Annotated[list[TokenId], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: SkipJsonSchema[bool] = False
    suffix: SkipJsonSchema[str | None] = None
    best_of: SkipJsonSchema[int | None] = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

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

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> str | list[int]:
        """The one prompt: a string or token ids (a batch of prompts is refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise invalid("'prompt': one prompt per request (send a string)", "prompt")
            return str(prompt[0])
        return prompt  # type: ignore[return-value]
