"""Incremental detokenization: the streamed pieces always add up to the full decode."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.model.tokenizer import Tokenizer
from tests.real_tokenizers import gemma3_gguf_path, load_gguf_tokenizer, smollm2_gguf_path

# Multi-byte characters split across tokens: emoji (with joiners and modifiers), CJK, and
# characters rare enough to need byte fallback in a SentencePiece vocabulary.
TEXTS = [
    "Hi 😀! 👍🏽 👨\u200d👩\u200d👧 done.",
    "中文文本和日本語のテキスト、한국어 텍스트",
    "𓀀𓀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ end",
    "  def f(x):\n\treturn x  # ünïcödé\n",
    "<|im_start|>assistant\nSure<|im_end|><end_of_turn>",
]


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random | None) -> str:
    """Push ids one at a time (or in random chunks of 1-5, as speculative steps accept them)."""
    pieces, start = [], 0
    while start < len(ids):
        size = rng.randint(1, 5) if rng else 1
        pieces.append(detok.push(ids[start : start + size]))
        start += size
    return "".join(pieces) + detok.flush()


class CountingTokenizer(Tokenizer):
    """Records the longest id list decoded, to show the work per step stays bounded."""

    longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def tiny_sentencepiece() -> CountingTokenizer:
    """A Llama 2 style tokenizer: "▁" spaces, a prefixed space stripped on decode, bytes."""
    pieces = ["▁", "a", "b", "▁a", "▁b", "ab", "▁ab"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({piece: 259 + i for i, piece in enumerate(pieces)})
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return CountingTokenizer(backend, vocab_size=len(vocab), bos_id=1, eos_ids=[2], add_bos=True)


def test_one_token_at_a_time_with_leading_spaces_and_bytes() -> None:
    tok = tiny_sentencepiece()
    ids = tok.encode("ab a b é 😀 b", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids[:3]] == ["▁ab", "▁a", "▁b"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    # The first word loses its prefixed space, later words keep theirs. "é" and "😀" are byte
    # runs (<0xC3> <0xA9>, <0xF0>...): each comes out whole when a normal token closes the run.
    assert pieces == ["ab", " a", " b", " ", "", "", "é ", "", "", "", "", "😀 b", ""]


def test_invalid_bytes_match_the_full_decode() -> None:
    tok = tiny_sentencepiece()
    c3, a9, e4 = 3 + 0xC3, 3 + 0xA9, 3 + 0xE4
    ids = [260, c3, a9, e4, 260, e4, 0xB8 + 3]  # "a", "é" + a cut-off character, "a", junk
    for cut in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok)
        text = detok.push(ids[:cut]) + detok.push(ids[cut:]) + detok.flush()
        assert text == tok.decode(ids)


def test_skipping_special_tokens() -> None:
    tok = tiny_sentencepiece()
    ids = [*tok.encode("ab b"), 2]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert stream(detok, ids, None) == tok.decode(ids, skip_special_tokens=True) == "ab b"


def test_prompt_tail_gives_the_first_token_its_space() -> None:
    tok = tiny_sentencepiece()
    prompt, generated = tok.encode("ab"), tok.encode("a b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids_tail=prompt)
    assert stream(detok, generated, None) == " a b"  # decoded alone it would be "a b"


def test_work_per_step_is_bounded() -> None:
    tok = tiny_sentencepiece()
    ids = tok.encode("ab a b é 😀 b " * 200)
    expected = tok.decode(ids)
    tok.longest = 0
    detok = IncrementalDetokenizer(tok)
    assert stream(detok, ids, None) == expected
    assert tok.longest <= 16  # never the whole sequence
    assert len(detok._ids) < 300  # consumed ids are dropped


# -- real models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return load_gguf_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def gemma3_tokenizer() -> Tokenizer:
    return load_gguf_tokenizer(gemma3_gguf_path())


@pytest.fixture(params=["smollm2_tokenizer", "gemma3_tokenizer"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    result: Tokenizer = request.getfixturevalue(request.param)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_equals_full_decode(
    tokenizer: Tokenizer, text: str, skip_special_tokens: bool
) -> None:
    ids = tokenizer.encode(text)
    for rng in (None, random.Random(text)):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        assert stream(detok, ids, rng) == tokenizer.decode(ids, skip_special_tokens)


@pytest.mark.slow
def test_multi_byte_characters_are_never_split(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("".join(TEXTS), add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        assert "\ufffd" not in detok.push(token_id)


@pytest.mark.slow
def test_random_ids_stream_equals_full_decode(tokenizer: Tokenizer) -> None:
    """Any ids, including invalid byte sequences, stream to exactly the full decode."""
    rng = random.Random(0)
    byte_ids = sorted(tokenizer.byte_token_ids) or [0]
    for _ in range(200):
        ids: list[int] = [
            rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(tokenizer.vocab_size)
            for _ in range(rng.randint(1, 40))
        ]
        detok = IncrementalDetokenizer(tokenizer)
        assert stream(detok, ids, rng) == tokenizer.decode(ids)


@pytest.mark.slow
def test_prompt_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Question: what is 2+2? Answer:")
    generated = tokenizer.encode(" It is 4 😀.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids_tail=prompt)
    expected = tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)) :]
    assert stream(detok, generated, None) == expected == " It is 4 😀."
