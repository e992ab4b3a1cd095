"""The prefix cache: a prompt that starts like a kept one prefills only the rest, and nothing
it produces changes — the same logits, bit for bit, and the same tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specserve.engine.generate import _prefill, generate
from specserve.engine.scheduler import Engine
from specserve.engine.sequence import Sequence
from specserve.model.kv_cache import KVCache
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.proposers.draft_model import DraftModelProposer
from specserve.speculative.sampling import SamplingParams
from tests.engine.test_scheduler import _submit

COMMON = [7, 8, 9, 10, 11, 12] * 7  # 42 tokens: crosses no 64-position block, then does
FIRST = COMMON + list(range(40, 70))
SECOND = COMMON + [13, 14] * 20 + [15]
NGRAM = SpeculationConfig("ngram", 4, ngram_length=2, adaptive=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def model(exact_model: Model) -> Model:
    """bfloat16 and native Q4_K: a hit must give the same bits."""
    return exact_model


def _prefill_logits(model: Model, prompt: list[int], cache: PrefixCache | None) -> torch.Tensor:
    """Last-position logits of ``prompt``'s prefill (generate's own), after the cache's hit if
    there is one; the prompt is kept in the cache afterwards."""
    seq = Sequence(model, prompt, GREEDY)
    return _prefill(model, seq, model.lm.new_cache(1, 256), cache).last_prompt_logits


def test_a_hit_gives_the_same_logits_bit_for_bit(model: Model) -> None:
    cache = PrefixCache(64 << 20)
    _prefill_logits(model, FIRST, cache)
    with_hit = _prefill_logits(model, SECOND, cache)
    assert cache.stats.hits == 1 and cache.stats.reused_tokens == len(COMMON)
    assert torch.equal(with_hit, _prefill_logits(model, SECOND, None))


@pytest.mark.parametrize("method", ["plain", "ngram", "prediction"])
def test_generate_with_a_hit_equals_generate_without(model: Model, method: str) -> None:
    speculation = NGRAM if method == "ngram" else SpeculationConfig()
    prediction = [13, 14] * 12 if method == "prediction" else None
    alone = generate(model, SECOND, GREEDY, speculation=speculation, prediction_ids=prediction)
    cache = PrefixCache(64 << 20)
    generate(model, FIRST, GREEDY, prefix_cache=cache)
    reused = generate(
        model, SECOND, GREEDY, speculation=speculation, prediction_ids=prediction,
        prefix_cache=cache,
    )  # fmt: skip
    assert reused.cached_prompt_tokens == len(COMMON)
    assert alone.cached_prompt_tokens == 0
    assert reused.token_ids == alone.token_ids


def test_the_engine_reuses_prefixes_in_chunks_and_outputs_stay_the_same(model: Model) -> None:
    """A chunked prefill (7 tokens a chunk) that starts after a 42-token hit, beside another
    request, gives what the prompt gives alone; the whole repeated prompt hits all but its
    last token."""
    cache = PrefixCache(64 << 20)
    engine = Engine(model, max_batch=2, prefill_chunk=7, prefix_cache=cache)
    try:
        first = _submit(engine, FIRST, GREEDY).wait()
        second, again = _submit(engine, SECOND, GREEDY), _submit(engine, FIRST, GREEDY)
        second_result, again_result = second.wait(), again.wait()
    finally:
        engine.stop()
    assert first.cached_prompt_tokens == 0
    assert second_result.cached_prompt_tokens == len(COMMON)
    assert again_result.cached_prompt_tokens == len(FIRST) - 1
    assert second_result.token_ids == generate(model, SECOND, GREEDY).token_ids
    assert again_result.token_ids == first.token_ids


def _kv(model: Model, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
    kv = model.lm.new_cache(1, 256)
    _, features = model.lm.forward_with_features(
        ForwardBatch(torch.tensor([prompt]), [0], [0]), kv, last_logits=1
    )
    return kv, features[0]


def test_store_keeps_the_longest_prompt_and_the_budget(tiny_model: Model) -> None:
    kv, features = _kv(tiny_model, FIRST)
    one = PrefixCache(1 << 30)
    one.store(FIRST[:20], kv, 0, features[:20])
    one.store(FIRST, kv, 0, features)
    assert len(one) == 1, "a kept prompt that the new one extends is dropped"
    one.store(FIRST[:30], kv, 0, features[:30])
    assert len(one) == 1, "a prompt a kept one covers is not kept again"
    hit = one.lookup(FIRST)
    assert hit is not None and hit.length == len(FIRST) - 1  # the last token is forwarded
    assert one.lookup([99, 98, 97]) is None
    size = one.stats.stored_bytes
    tight = PrefixCache(size + size // 2)  # room for one prompt of this size, not two
    tight.store(FIRST, kv, 0, features)
    other = [3] * len(FIRST)
    tight.store(other, kv, 0, features)
    assert len(tight) == 1 and tight.lookup(FIRST) is None, "the least recent one goes"
    assert tight.stats.stored_bytes <= tight.budget_bytes
    grown = PrefixCache(1 << 30)
    grown.store(FIRST[:30], kv, 0, features[:30])
    first_part = grown.lookup(FIRST)
    grown.store(FIRST, kv, 0, features)  # the same prompt with more tokens, as at its end
    hit = grown.lookup(FIRST)
    assert first_part is not None and hit is not None and len(grown) == 1
    assert hit.entry.segments[0] is first_part.entry.segments[0], "only new positions copied"
    assert grown.stats.stored_bytes == hit.entry.nbytes
    restored = tiny_model.lm.new_cache(1, 256)
    grown.restore(hit, restored, 0)
    n = len(FIRST) - 1
    assert torch.equal(restored.keys[:, :, :, :n], kv.keys[:, :, :, :n])
    assert torch.equal(restored.values[:, :, :, :n], kv.values[:, :, :, :n])
    assert torch.equal(hit.features, features[:n])
    off = PrefixCache(0)
    off.store(FIRST, kv, 0, features)
    assert len(off) == 0 and off.lookup(FIRST) is None
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1)


@pytest.mark.parametrize("speculation", [SpeculationConfig(), NGRAM], ids=["plain", "ngram"])
def test_a_finished_request_is_kept_with_its_output_for_the_next_turn(
    model: Model, speculation: SpeculationConfig
) -> None:
    """A chat's next turn repeats the last prompt and answer: the engine keeps both (the KV
    its decode steps wrote, verify forwards of several tokens included), and the next turn's
    prefill starts after them with the same logits, bit for bit, as a whole prefill."""
    cache = PrefixCache(64 << 20)
    engine = Engine(model, max_batch=2, prefix_cache=cache)
    try:
        turn = _submit(engine, FIRST, GREEDY, speculation=speculation).wait()
        follow = [*FIRST, *turn.token_ids, 21, 22, 23]
        second = _submit(engine, follow, GREEDY).wait()
    finally:
        engine.stop()
    assert second.cached_prompt_tokens == len(FIRST) + len(turn.token_ids) - 1
    assert second.token_ids == generate(model, follow, GREEDY).token_ids
    assert torch.equal(_prefill_logits(model, follow, cache), _prefill_logits(model, follow, None))


def test_a_hit_restores_the_features_that_eagle_heads_read(model: Model) -> None:
    """EAGLE heads draft from the target's features of earlier positions: a hit hands over
    the kept ones, the same bits as a whole prefill computes (recorded, as for training)."""
    cache = PrefixCache(64 << 20)
    cached, whole = Engine(model, prefix_cache=cache), Engine(model)
    try:
        _submit(cached, FIRST, GREEDY).wait()
        hit = _submit(cached, SECOND, GREEDY, record_features=True).wait()
        alone = _submit(whole, SECOND, GREEDY, record_features=True).wait()
    finally:
        cached.stop()
        whole.stop()
    assert hit.cached_prompt_tokens == len(COMMON)
    assert hit.features is not None and alone.features is not None
    assert torch.equal(hit.features, alone.features)


def test_a_draft_model_prefills_after_its_own_prefix_cache(model: Model) -> None:
    """The draft model keeps its prompts' KV too: the second prompt's drafter prefill starts
    after the shared opening, with the same KV bits as a whole prefill, and the request's
    output and acceptance counts stay the same."""
    cache = PrefixCache(64 << 20)
    DraftModelProposer(model, GREEDY, 256, prefix_cache=cache).prefill(FIRST)
    hit = DraftModelProposer(model, GREEDY, 256, prefix_cache=cache)
    hit.prefill(SECOND)
    whole = DraftModelProposer(model, GREEDY, 256)
    whole.prefill(SECOND)
    assert cache.stats.reused_tokens == len(COMMON) and hit.synced == whole.synced
    n = len(SECOND) - 1
    assert torch.equal(hit.cache.keys[:, :, :, :n], whole.cache.keys[:, :, :, :n])
    assert torch.equal(hit.cache.values[:, :, :, :n], whole.cache.values[:, :, :, :n])
    drafter = SpeculationConfig("draft_model", 4, draft_model=model, adaptive=False)
    alone = generate(model, SECOND, GREEDY, speculation=drafter)
    cached = dataclasses.replace(drafter, draft_prefix_cache=PrefixCache(64 << 20))
    generate(model, FIRST, GREEDY, speculation=cached)
    reused = generate(model, SECOND, GREEDY, speculation=cached)
    assert reused.token_ids == alone.token_ids
    assert reused.stats.as_dict() == alone.stats.as_dict()
