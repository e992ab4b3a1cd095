"""Tokenizer: tiny GGUF-style vocabularies built here, then the real SmolLM2 and Gemma 3 files
checked id-for-id against transformers' own GGUF tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from tokenizers import pre_tokenizers

from specserve.model.tokenizer import Tokenizer, TokenType
from tests.real_tokenizers import (
    gemma3_gguf_path,
    hf_gguf_tokenizer,
    load_gguf_tokenizer,
    smollm2_gguf_path,
)

# Strings that exercise every pre-tokenizer branch: words, code, digits, scripts, whitespace.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see!",
    "def f(x):\n    if x:\n\treturn [i * 2 for i in range(10)]\n",
    "12345678",
    "x = 3.14159 + 2024 - 1e10",
    "héllo wörld Ä Å ñ ﬁ ∑∫√",
    "😀🤗👍🏽 👨\u200d👩\u200d👧",
    "中文文本和日本語のテキスト、한국어",
    "𓀀𓀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # rare characters: byte fallback for SentencePiece
    "   leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "line one\nline two\n\n\nline five\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> and <s>struck</s> and <0x41>",
    "",
    " ",
    "\n",
]


# -- tiny vocabularies ------------------------------------------------------------------------


def tiny_bpe_metadata(pre: str = "smollm") -> dict[str, Any]:
    """A byte-level BPE vocabulary: three control tokens, the 256 byte symbols, a few merges."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * 265,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def tiny_spm_metadata() -> dict[str, Any]:
    """A SentencePiece (Llama 2 style) vocabulary: scores order the merges, bytes fall back."""
    pieces = ["ll", "▁H", "or", "▁w", "llo", "▁He", "▁Hello", "▁wor", "ld", "▁world"]
    chars = ["▁", "H", "e", "l", "o", "w", "r", "d"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (len(pieces) + len(chars))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(1, 19)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def spelled(tok: Tokenizer, ids: list[int]) -> list[str | None]:
    return [tok.id_to_token(i) for i in ids]


def test_tiny_byte_level_bpe_encodes_and_decodes() -> None:
    tok = Tokenizer.from_gguf_metadata(tiny_bpe_metadata(), "tiny.gguf")
    assert tok.vocab_size == 3 + 256 + 9
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2, 0), False)
    assert spelled(tok, tok.encode("hello world")) == ["hello", "Ġworld"]
    # "smollm" splits every digit; the space before them stays a token of its own.
    assert spelled(tok, tok.encode("hello 42")) == ["hello", "Ġ", "4", "2"]
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids == [1, tok.token_to_id("hello"), 2]
    assert tok.decode(ids) == "<|im_start|>hello<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    for text in ["hello world", "  héllo\n\tworld 😀 ", "wörld<|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_tiny_byte_level_pre_tokenizer_names(caplog: pytest.LogCaptureFixture) -> None:
    def words(pre: str) -> list[str]:
        tok = Tokenizer.from_gguf_metadata(tiny_bpe_metadata(pre), f"{pre}.gguf")
        assert tok.backend.pre_tokenizer is not None
        return [word for word, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x  12345")]

    assert words("smollm") == ["x", "ĠĠ", "1", "2", "3", "4", "5"]
    assert words("llama-bpe") == ["x", "Ġ", "Ġ", "123", "45"]
    assert words("qwen2") == ["x", "Ġ", "Ġ", "1", "2", "3", "4", "5"]
    assert words("default") == ["x", "Ġ", "Ġ12345"]  # GPT-2's regex
    with caplog.at_level(logging.WARNING):
        assert words("no-such-pre") == words("default")
    assert "no-such-pre" in caplog.text


def test_tiny_sentencepiece_encodes_and_decodes() -> None:
    tok = Tokenizer.from_gguf_metadata(tiny_spm_metadata(), "tiny-spm.gguf")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)  # llama.cpp's default
    ids = tok.encode("Hello world")
    assert spelled(tok, ids) == ["<s>", "▁Hello", "▁world"]
    assert tok.decode(ids[1:]) == "Hello world"  # the prefixed space is stripped again
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    # "é" and "z" are not pieces: they fall back to their UTF-8 bytes.
    assert spelled(tok, tok.encode("Hé z", add_special_tokens=False)) == [
        "▁H", "<0xC3>", "<0xA9>", "▁", "<0x7A>"
    ]  # fmt: skip
    assert tok.encode("<s>", add_special_tokens=False) == [1]
    assert tok.byte_token_ids == frozenset(range(3, 259))
    for text in ["Hello world", "Hello  world ", "wörld\n😀"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_gguf_errors_name_the_file_and_the_problem() -> None:
    bad_model = {**tiny_bpe_metadata(), "tokenizer.ggml.model": "rwkv"}
    with pytest.raises(ValueError, match=r"bad\.gguf.*unsupported tokenizer\.ggml\.model 'rwkv'"):
        Tokenizer.from_gguf_metadata(bad_model, "bad.gguf")
    no_merges = {k: v for k, v in tiny_bpe_metadata().items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ValueError, match=r"m\.gguf.*needs tokenizer\.ggml\.merges"):
        Tokenizer.from_gguf_metadata(no_merges, "m.gguf")
    with pytest.raises(ValueError, match=r"t\.gguf.*no tokenizer\.ggml\.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, "t.gguf")
    short_scores = {**tiny_spm_metadata(), "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(ValueError, match=r"s\.gguf.*scores"):
        Tokenizer.from_gguf_metadata(short_scores, "s.gguf")


def test_pretrained_dir_round_trip(tmp_path: Path) -> None:
    gguf_tok = Tokenizer.from_gguf_metadata(tiny_bpe_metadata(), "tiny.gguf")
    gguf_tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2, 0), False)
    assert tok.vocab_fingerprint() == gguf_tok.vocab_fingerprint()
    assert tok.encode("hello <|im_end|>") == gguf_tok.encode("hello <|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained_dir(tmp_path / "missing")


def test_vocab_fingerprint_sees_order_and_spelling() -> None:
    base = Tokenizer.from_gguf_metadata(tiny_bpe_metadata(), "a.gguf").vocab_fingerprint()
    assert base == Tokenizer.from_gguf_metadata(tiny_bpe_metadata(), "b.gguf").vocab_fingerprint()
    swapped = tiny_bpe_metadata()
    tokens = swapped["tokenizer.ggml.tokens"]
    tokens[3], tokens[4] = tokens[4], tokens[3]
    assert Tokenizer.from_gguf_metadata(swapped, "c.gguf").vocab_fingerprint() != base


# -- real models ------------------------------------------------------------------------------


def original_smollm2_pre_tokenizer() -> Any:
    """SmolLM2's tokenizer.json splits digits before GPT-2's regex, as llama.cpp's "smollm"
    does; transformers' GGUF conversion drops the digit split (see `test_smollm2_digits`)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


@pytest.fixture(scope="module")
def smollm2_pair() -> tuple[Tokenizer, Any]:
    path = smollm2_gguf_path()
    reference = hf_gguf_tokenizer(path)
    reference.backend_tokenizer.pre_tokenizer = original_smollm2_pre_tokenizer()
    return load_gguf_tokenizer(path), reference


@pytest.fixture(scope="module")
def gemma3_pair() -> tuple[Tokenizer, Any]:
    path = gemma3_gguf_path()
    return load_gguf_tokenizer(path), hf_gguf_tokenizer(path)


@pytest.fixture(params=["smollm2_pair", "gemma3_pair"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any]:
    result: tuple[Tokenizer, Any] = request.getfixturevalue(request.param)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, reference = pair
    assert ours.encode(text) == reference.encode(text)
    no_bos = ours.encode(text, add_special_tokens=False)
    assert no_bos == reference.encode(text, add_special_tokens=False)
    assert ours.decode(no_bos) == text  # round trip
    for skip in (False, True):
        assert ours.decode(no_bos, skip_special_tokens=skip) == reference.decode(
            no_bos, skip_special_tokens=skip
        )


@pytest.mark.slow
def test_ids_match_transformers_on_a_long_mixed_text(pair: tuple[Tokenizer, Any]) -> None:
    ours, reference = pair
    text = "\n".join(TEXTS) * 3
    assert ours.encode(text) == reference.encode(text)


@pytest.mark.slow
def test_smollm2_facts(smollm2_pair: tuple[Tokenizer, Any]) -> None:
    tok, _ = smollm2_pair
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (49152, 1, (2, 0), False)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.byte_token_ids == frozenset()


@pytest.mark.slow
def test_smollm2_digits(smollm2_pair: tuple[Tokenizer, Any]) -> None:
    """Where transformers' GGUF conversion differs from SmolLM2's own tokenizer.json: spaces
    before a number. We follow the original (and llama.cpp): digits are split off first."""
    tok, _ = smollm2_pair
    assert spelled(tok, tok.encode("in the   2013")) == ["in", "Ġthe", "ĠĠĠ", "2", "0", "1", "3"]
    unpatched = hf_gguf_tokenizer(smollm2_gguf_path())
    assert unpatched.convert_ids_to_tokens(unpatched.encode("in the   2013"))[2:4] == ["ĠĠ", "Ġ"]


@pytest.mark.slow
def test_gemma3_facts(gemma3_pair: tuple[Tokenizer, Any]) -> None:
    tok, _ = gemma3_pair
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (262144, 2, (1, 106), True)
    assert tok.chat_template is None  # the 270M GGUF ships none: a fallback is used
    assert tok.encode("<start_of_turn>user\n") == [2, 105, 2364, 107]
    assert len(tok.byte_token_ids) == 256


@pytest.mark.slow
def test_fingerprints_tell_vocabularies_apart(
    smollm2_pair: tuple[Tokenizer, Any], gemma3_pair: tuple[Tokenizer, Any]
) -> None:
    small, big = smollm2_pair[0].vocab_fingerprint(), gemma3_pair[0].vocab_fingerprint()
    assert len(small) == 64 and small != big
    assert small == smollm2_pair[0].vocab_fingerprint()


@pytest.mark.slow
def test_pretrained_dir_saved_by_transformers(
    smollm2_pair: tuple[Tokenizer, Any], tmp_path: Path
) -> None:
    ours, reference = smollm2_pair
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.vocab_fingerprint() == ours.vocab_fingerprint()
    assert (loaded.bos_id, loaded.add_bos, loaded.eos_ids[0]) == (1, False, 2)
    assert loaded.chat_template == ours.chat_template
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)


@pytest.mark.slow
def test_pretrained_dir_of_gemma3_matches_its_gguf(
    gemma3_pair: tuple[Tokenizer, Any], tmp_path: Path
) -> None:
    ours, _ = gemma3_pair
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.vocab_fingerprint() == ours.vocab_fingerprint()
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (2, (1, 106), True)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
