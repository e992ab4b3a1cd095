"""A checked request -> what the engine runs: prompt ids, the prediction's ids, and the
sampling parameters with the request's rules (grammar, penalties, logit_bias, logprobs).

`prepare` tokenizes and compiles grammars, so the handler runs it in a worker thread. Every
refusal is an OpenAI-shaped 400 naming the parameter::

    tools on a template that cannot show them    -> param "tools"
    tool_choice naming a function not in tools   -> param "tool_choice"
    a schema llguidance cannot compile           -> param "response_format"
    a logit_bias id outside the vocabulary       -> param "logit_bias"
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from specserve.model.loader import Model
from specserve.server.choices import choice_seed
from specserve.server.errors import invalid
from specserve.server.grammars import response_format_grammar, tool_choice_grammar
from specserve.server.logprobs import TokenSpeller
from specserve.server.schemas import (
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    join_text,
)
from specserve.server.tools import (
    ToolError,
    ToolRequest,
    template_messages,
    template_supports_tools,
    validate_tool_request,
)
from specserve.speculative.grammar import TokenGrammar
from specserve.speculative.sampling import MAX_TOKENS_LIMIT, InvalidRequestError, SamplingParams


@dataclass(frozen=True)
class Plan:
    """One request, ready for the engine; ``params`` are choice 0's."""

    prompt_ids: list[int]
    prediction_ids: list[int] | None
    params: SamplingParams
    n: int
    tools: ToolRequest | None  # None: no tools (or not a chat request)
    speller: TokenSpeller | None  # set when logprobs were asked for

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s parameters: its own seed (see `choices.choice_seed`)."""
        if index == 0:
            return self.params
        return replace(self.params, seed=choice_seed(self.params.seed, index))

    @property
    def parses_tool_calls(self) -> bool:
        """Tool calls are read out of the text unless the model was shown no tools."""
        return self.tools is not None and self.tools.choice.mode != "none"


def prepare(body: CommonRequest, model: Model) -> Plan:
    """Tokenize, check and compile ``body`` for ``model`` (blocking: run it in a thread)."""
    tools = tool_request(body, model)
    prompt_ids = prompt_token_ids(body, model, tools)
    prediction_ids = None
    if body.prediction is not None:
        text = join_text(body.prediction.content)
        prediction_ids = model.tokenizer.encode(text, add_special_tokens=False)
    # One grammar a request: a forced tool call's, else the response format's (the schema
    # refuses both together unless tool_choice is "none", which forces no call).
    grammar = tool_choice_grammar(model, tools) if tools is not None else None
    if grammar is None and body.response_format is not None:
        grammar = response_format_grammar(model, body.response_format.as_openai())
    params = sampling_params(body, grammar, model.lm.config.vocab_size)
    speller = TokenSpeller(model) if params.logprobs is not None else None
    return Plan(prompt_ids, prediction_ids, params, body.choices, tools, speller)


def tool_request(body: CommonRequest, model: Model) -> ToolRequest | None:
    """The checked tool fields of a chat request (None without tools)."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    try:
        tools = validate_tool_request(
            body.raw_tools(), body.raw_tool_choice(), body.parallel_tool_calls
        )
    except ToolError as exc:
        raise invalid(str(exc), exc.param) from None
    template = model.tokenizer.chat_template
    shown = tools is not None and tools.template_tools is not None
    if shown and (template is None or not template_supports_tools(template)):
        raise invalid(
            f"'tools': the chat template of {model.name} cannot show the model tools (it "
            "does not read the template variable 'tools'); serve a model whose template does, "
            "such as Qwen2.5-Coder's, or send tool_choice 'none'",
            "tools",
        )
    return tools


def prompt_token_ids(body: CommonRequest, model: Model, tools: ToolRequest | None) -> list[int]:
    tokenizer = model.tokenizer
    if isinstance(body, ChatCompletionRequest):
        try:
            messages = template_messages(body.raw_messages())
            shown = tools.template_tools if tools is not None else None
            return tokenizer.encode_chat(messages, tools=shown)
        except ToolError as exc:
            raise invalid(str(exc), exc.param) from None
        except ValueError as exc:  # the template refused the conversation (raise_exception)
            raise invalid(f"'messages': {exc}", "messages") from None
    assert isinstance(body, CompletionRequest)
    prompt = body.prompt_input()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)


def sampling_params(
    body: CommonRequest, grammar: TokenGrammar | None, vocab_size: int
) -> SamplingParams:
    """OpenAI's fields as choice 0's `SamplingParams` (OpenAI's defaults where absent)."""
    bias = body.bias_pairs()
    outside = [token for token, _ in bias if token >= vocab_size]
    if outside:
        raise invalid(
            f"'logit_bias': token id {outside[0]} is not in this model's vocabulary "
            f"[0, {vocab_size})",
            "logit_bias",
        )
    limit = body.token_limit()
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            max_tokens=min(limit or MAX_TOKENS_LIMIT, MAX_TOKENS_LIMIT),
            stop=body.stop_strings(),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias,
            grammar=grammar,
            logprobs=body.top_logprobs_count(),
        )
    except InvalidRequestError as exc:
        raise invalid(str(exc)) from None
