"""The server's pure helpers for issue 13: choice seeds, merged statistics of n choices, and
the logprobs shapes (bytes and offsets of tokens that split a character)."""

from __future__ import annotations

from specserve.model.loader import Model
from specserve.server.choices import choice_seed, merge_stats
from specserve.server.logprobs import (
    TokenSpeller,
    chat_logprobs,
    completion_logprobs,
    kept_logprobs,
    text_offsets,
)
from specserve.speculative.sampling import TokenLogprob
from specserve.speculative.stats import SpecStats


def test_choice_seeds_are_distinct_reproducible_and_in_range() -> None:
    seeds = [choice_seed(7, i) for i in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8
    assert seeds == [choice_seed(7, i) for i in range(8)]
    assert all(s is not None and 0 <= s < 2**63 for s in seeds)
    assert choice_seed(8, 1) not in seeds  # not seed + i
    assert choice_seed(None, 3) is None  # unseeded: fresh entropy per choice


def test_merge_stats_sums_the_choices() -> None:
    a, b = SpecStats(), SpecStats()
    a.record_step("ngram", 3, 2, 3)
    b.record_step("ngram", 1, 1, 2)
    b.record_step(None, 0, 0, 1)
    b.record_forced(2, 2)
    merged = merge_stats([a, b])
    assert (merged.target_steps, merged.generated) == (3, 6)
    ngram = merged.by_method["ngram"]
    assert (ngram.steps, ngram.proposed, ngram.accepted) == (2, 4, 3)
    assert ngram.proposed_per_position == [2, 1, 1] and ngram.accepted_per_position == [2, 1, 0]
    assert merged.forced_tokens == 2


def _entries(ids: list[int]) -> list[TokenLogprob]:
    return [TokenLogprob(i, -0.5, ((i, -0.5), (0, -2.0))) for i in ids]


def test_split_characters_keep_their_bytes_and_offsets(tiny_model: Model) -> None:
    text = "aé😀b"
    ids = tiny_model.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 8  # byte-level: é is 2 tokens, the emoji 4
    speller = TokenSpeller(tiny_model)
    chat = chat_logprobs(_entries(ids), speller)["content"]
    assert b"".join(bytes(e["bytes"]) for e in chat) == text.encode()
    assert [e["token"] for e in chat].count("\ufffd") == 6  # partial characters
    assert chat[0]["top_logprobs"][1] == {"token": "!", "logprob": -2.0, "bytes": [33]}
    assert text_offsets(ids, speller) == [0, 1, 1, 2, 2, 2, 2, 3]
    legacy = completion_logprobs(_entries(ids[:1]), speller)
    assert legacy == {
        "tokens": ["a"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"a": -0.5, "!": -2.0}],
        "text_offset": [0],
    }


def test_tokens_past_a_stop_string_are_dropped(tiny_model: Model) -> None:
    ids = tiny_model.tokenizer.encode("abcSTOPx", add_special_tokens=False)
    speller = TokenSpeller(tiny_model)
    kept = kept_logprobs(_entries(ids), "abc", speller)  # stop="STOP" cut the text
    assert [e.token_id for e in kept] == ids[:3]
    assert kept_logprobs(_entries(ids), "abcSTOPx", speller) == _entries(ids)
