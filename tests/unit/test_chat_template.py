"""Chat templates: the model's own (SmolLM2), the built-in fallbacks, and message checks."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from specserve.model.chat_template import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    render_chat_template,
    validate_messages,
)
from specserve.model.tokenizer import Tokenizer
from tests.real_tokenizers import (
    gemma3_gguf_path,
    hf_gguf_tokenizer,
    load_gguf_tokenizer,
    smollm2_gguf_path,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]


def vocab_tokenizer(*tokens: str, template: str | None = None) -> Tokenizer:
    """A tokenizer that only needs to know which special tokens exist."""
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, []))
    return Tokenizer(
        backend, vocab_size=len(tokens), bos_id=0, eos_ids=[1], add_bos=True,
        chat_template=template,
    )  # fmt: skip


def test_chatml_fallback() -> None:
    tok = vocab_tokenizer("<s>", "</s>", "<|im_start|>", "<|im_end|>")
    assert tok.apply_chat_template(CHAT[1:2]) == (
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(CHAT[1:2], add_generation_prompt=False) == (
        "<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_gemma_fallback_folds_the_system_prompt_into_the_first_turn() -> None:
    tok = vocab_tokenizer("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
    assert tok.apply_chat_template(CHAT) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_fallback_requires_alternating_roles() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="must alternate"):
        render_chat_template(GEMMA_TEMPLATE, messages, bos_token="<bos>")


def test_model_template_wins_over_the_fallback() -> None:
    tok = vocab_tokenizer("<bos>", "<eos>", "<start_of_turn>", template="{{ bos_token }}x")
    assert tok.apply_chat_template(CHAT) == "<bos>x"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role must be a non-empty string"),
        ([{"role": "", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": ["a"]}], r"content must be a string, got list"),
        ([{"role": 3, "content": "x"}], r"role must be a non-empty string, got 3"),
    ],
)
def test_invalid_messages_raise(messages: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        validate_messages(messages)
    with pytest.raises(ValueError, match=problem):
        render_chat_template(CHATML_TEMPLATE, messages)


def test_template_errors_become_value_errors() -> None:
    with pytest.raises(ValueError, match="syntax error"):
        render_chat_template("{% for m in messages %}", CHAT)
    with pytest.raises(ValueError, match="no system prompt, please"):
        render_chat_template(
            "{% if messages[0].role == 'system' %}"
            "{{ raise_exception('no system prompt, please') }}{% endif %}",
            CHAT,
        )


def test_jinja_behaves_like_hugging_face() -> None:
    # trim_blocks + lstrip_blocks: block tags on their own lines leave no blank lines.
    template = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }};\n  {% endif %}\n{% endfor %}"  # noqa: E501
    assert render_chat_template(template, CHAT) == "Hi!;\n2+2?;\n"
    # tojson keeps non-ASCII and does not HTML-escape; the sandbox refuses to mutate.
    assert render_chat_template("{{ messages[0] | tojson }}", [CHAT[0]]) == (
        '{"role": "system", "content": "Be brief."}'
    )
    with pytest.raises(ValueError, match="unsafe"):
        render_chat_template("{{ messages.append(1) }}", CHAT)


# -- real models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return load_gguf_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_reference() -> Any:
    return hf_gguf_tokenizer(smollm2_gguf_path())


@pytest.mark.slow
def test_smollm2_renders_its_own_chatml_template(smollm2_tokenizer: Tokenizer) -> None:
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smollm2_tokenizer.apply_chat_template(CHAT[1:2]) == (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_tokenizer.apply_chat_template(CHAT).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )
    ids = smollm2_tokenizer.encode_chat(CHAT[1:2])
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> system \n
    assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> ass istant \n


@pytest.mark.slow
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(
    smollm2_tokenizer: Tokenizer, smollm2_reference: Any, generation_prompt: bool
) -> None:
    for messages in (CHAT, CHAT[1:], CHAT[1:2]):
        expected = smollm2_reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert smollm2_tokenizer.apply_chat_template(messages, generation_prompt) == expected


@pytest.mark.slow
def test_gemma3_uses_the_gemma_fallback_with_one_bos() -> None:
    gemma = load_gguf_tokenizer(gemma3_gguf_path())
    assert gemma.chat_template is None
    text = gemma.apply_chat_template(CHAT[1:2])
    assert text == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    ids = gemma.encode_chat(CHAT[1:2])
    assert ids[:4] == [2, 105, 2364, 107] and ids.count(2) == 1  # <bos> <start_of_turn> user \n
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n
