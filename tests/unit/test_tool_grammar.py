"""OpenAI tool calling: the llguidance grammars that enforce ``tool_choice`` (compiled, and
run over real tokenizers' tokens)."""

from __future__ import annotations

from typing import Any

import pytest

from specserve.model.gguf_file import GGUFFile
from specserve.model.tokenizer import Tokenizer
from specserve.server.tool_grammar import check_grammar, rebase_refs, tool_call_grammar
from specserve.server.tools import FunctionTool, ToolChoice, ToolError
from tests.real_tokenizers import smollm2_gguf_path
from tests.unit.tool_samples import BERGEN, OSLO, WEATHER, call_text

TOOLS = (
    FunctionTool("get_weather", None, WEATHER["function"]["parameters"]),
    FunctionTool("get_time"),
)


def test_auto_and_none_are_not_constrained() -> None:
    assert tool_call_grammar(TOOLS, ToolChoice("auto"), True) is None
    assert tool_call_grammar(TOOLS, ToolChoice("none"), True) is None


def test_local_refs_move_under_the_arguments() -> None:
    schema = {"$ref": "#", "properties": {"a": {"$ref": "#/$defs/x"}}, "const": {"$ref": "#"}}
    assert rebase_refs(schema, "#/p") == {
        "$ref": "#/p", "properties": {"a": {"$ref": "#/p/$defs/x"}}, "const": {"$ref": "#"},
    }  # fmt: skip


@pytest.mark.parametrize("tag_tokens", [True, False])
@pytest.mark.parametrize(
    "choice", [ToolChoice("required"), ToolChoice("function", "get_weather")], ids=str
)
@pytest.mark.parametrize("parallel", [True, False])
def test_llguidance_compiles_the_grammars(
    choice: ToolChoice, parallel: bool, tag_tokens: bool
) -> None:
    pytest.importorskip("llguidance")
    tricky = FunctionTool("say", "# not a // comment", {
        "type": "object", "properties": {"text": {"type": "string", "description": "# // \" }"}},
    })  # fmt: skip
    grammar = tool_call_grammar((*TOOLS, tricky), choice, parallel, tag_tokens=tag_tokens)
    assert grammar is not None
    check_grammar(grammar)


def test_check_grammar_refuses_schemas_llguidance_cannot_compile() -> None:
    pytest.importorskip("llguidance")
    broken = FunctionTool("f", None, {"type": "object", "properties": {"x": {"type": "word"}}})
    grammar = tool_call_grammar([broken], ToolChoice("required"), True)
    assert grammar is not None
    with pytest.raises(ToolError, match="cannot enforce tool_choice") as caught:
        check_grammar(grammar)
    assert caught.value.param == "tools"


def llg_tokenizer(tokenizer: Tokenizer) -> Any:
    llguidance = pytest.importorskip("llguidance")
    backend = tokenizer.backend.to_str()
    return llguidance.LLTokenizer(
        backend, n_vocab=tokenizer.vocab_size, eos_token=list(tokenizer.eos_ids)
    )


def accepted(llg: Any, tokenizer: Tokenizer, grammar: str | None, text: str) -> bool:
    """Whether the grammar takes `text`'s tokens and may end there (the model's EOS next)."""
    import llguidance

    assert grammar is not None
    matcher = llguidance.LLMatcher(llg, grammar, log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and (
        matcher.is_accepting()
    )


def test_qwen_tokens_through_the_grammars(qwen_tokenizer: Tokenizer) -> None:
    assert qwen_tokenizer.token_to_id("<tool_call>") is not None  # so tag_tokens=True
    llg = llg_tokenizer(qwen_tokenizer)
    required = tool_call_grammar(TOOLS, ToolChoice("required"), True)
    assert required is not None
    check_grammar(required, llg)
    two = OSLO + "\n" + BERGEN
    assert accepted(llg, qwen_tokenizer, required, OSLO)
    assert accepted(llg, qwen_tokenizer, required, two)
    assert accepted(llg, qwen_tokenizer, required, call_text("get_time", "{}"))
    assert not accepted(llg, qwen_tokenizer, required, call_text("get_wether", '{"city": "Oslo"}'))
    assert not accepted(llg, qwen_tokenizer, required, call_text("get_weather", '{"town": "X"}'))
    assert not accepted(
        llg, qwen_tokenizer, required, call_text("get_weather", '{"city": "Oslo", "unit": "K"}')
    )
    assert not accepted(llg, qwen_tokenizer, required, "Sure! " + OSLO)  # calls only
    assert not accepted(llg, qwen_tokenizer, required, "")  # at least one
    single = tool_call_grammar(TOOLS, ToolChoice("required"), False)
    assert accepted(llg, qwen_tokenizer, single, OSLO)
    assert not accepted(llg, qwen_tokenizer, single, two)
    named = tool_call_grammar(TOOLS, ToolChoice("function", "get_time"), True)
    assert accepted(llg, qwen_tokenizer, named, call_text("get_time", "{}"))
    assert not accepted(llg, qwen_tokenizer, named, OSLO)
    assert not accepted(llg, qwen_tokenizer, named, call_text("get_time", '{"x": 1}'))


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    path = smollm2_gguf_path()
    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))


def test_text_tags_for_a_vocabulary_without_them(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.token_to_id("<tool_call>") is None
    llg = llg_tokenizer(smollm2_tokenizer)
    tokens = tool_call_grammar(TOOLS, ToolChoice("required"), True)
    assert tokens is not None
    with pytest.raises(ToolError, match="tool_call"):  # the tag tokens do not exist here
        check_grammar(tokens, llg)
    grammar = tool_call_grammar(TOOLS, ToolChoice("required"), True, tag_tokens=False)
    assert accepted(llg, smollm2_tokenizer, grammar, OSLO + "\n" + BERGEN)
    assert not accepted(
        llg, smollm2_tokenizer, grammar, call_text("get_wether", '{"city": "Oslo"}')
    )
