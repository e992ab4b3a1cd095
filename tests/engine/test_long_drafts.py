"""Long lookup drafts end to end: > 16 drafts verified in one step, output equal to plain,
and drafts clipped at max_tokens and at the end of the context."""

from __future__ import annotations

import torch

from specserve.engine.generate import generate
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.engine.sequence import Sequence
from specserve.model.loader import Model
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.limits import MAX_LOOKUP_DRAFT
from specserve.speculative.sampling import SamplingParams
from tests.engaged import StepLog
from tests.engine.test_scheduler import Waiter

PROMPT = [10, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14, 15, 10, 11, 12]
LONG = SamplingParams(max_tokens=120, ignore_eos=True)


class FrozenCosts(StepCosts):
    """Costs that ignore the engine's timings: tuned lengths become deterministic."""

    def observe(self, tokens: int, seconds: float) -> None:
        pass


def _flat_costs() -> StepCosts:
    # A forward of 65 tokens costs 3 single steps (a small model: overhead-bound).
    return FrozenCosts({1: 1.0, 65: 3.0})


def _longest_verified(result: GenerationResult) -> int:
    """The most prediction drafts one step verified (the verifier's per-position counts)."""
    return len(result.stats.by_method["prediction"].proposed_per_position)


def test_exact_long_prediction_verifies_over_16_drafts_a_step(tiny_model: Model) -> None:
    plain = generate(tiny_model, PROMPT, LONG)
    for name, speculation, costs in [
        ("fixed", SpeculationConfig(adaptive=False), None),
        ("tuned", SpeculationConfig(), _flat_costs()),
    ]:
        result = generate(
            tiny_model,
            PROMPT,
            LONG,
            speculation=speculation,
            prediction_ids=plain.token_ids,
            costs=costs,
        )
        assert result.token_ids == plain.token_ids, name
        stats = result.stats.by_method["prediction"]
        assert _longest_verified(result) > 16, (name, stats.proposed_per_position)
        assert stats.accepted_per_position[16] > 0, name  # and a 17th draft was accepted
        assert stats.accepted == stats.proposed, name


def test_edited_long_prediction_stays_lossless_with_tuned_lengths(tiny_model: Model) -> None:
    plain = generate(tiny_model, PROMPT, LONG)
    out = plain.token_ids
    edited = [*out[:20], 7, 8, 9, *out[20:50], *out[54:90], 5, *out[91:]]
    result = generate(tiny_model, PROMPT, LONG, prediction_ids=edited, costs=_flat_costs())
    assert result.token_ids == plain.token_ids
    stats = result.stats.by_method["prediction"]
    assert stats.accepted < stats.proposed and _longest_verified(result) > 16


def _feeds_fit(model: Model, params: SamplingParams, prediction: list[int], limit: int) -> None:
    """Step a Sequence by hand: every feed stays inside the positions it may use."""
    seq = Sequence(model, PROMPT, params, SpeculationConfig(adaptive=False), prediction,
                   context_limit=limit)  # fmt: skip
    cache = model.lm.new_cache(1, seq.max_len)
    logits = model.lm(ForwardBatch(torch.tensor([PROMPT]), [0], [0]), cache)
    seq.start(logits[0, -1])
    while not seq.done:
        feed = seq.next_feed()
        assert seq.position + len(feed) <= seq.max_len - 1, (seq.position, len(feed))
        logits = model.lm(ForwardBatch(torch.tensor([feed]), [0], [seq.position]), cache)
        seq.accept(logits[0])
    assert seq.finish_reason == "length" and len(seq.out) == seq.budget


def test_long_drafts_are_clipped_at_max_tokens_and_the_context_end(tiny_model: Model) -> None:
    plain = generate(tiny_model, PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    prediction = plain.token_ids  # far longer than what either limit leaves
    _feeds_fit(tiny_model, SamplingParams(max_tokens=40, ignore_eos=True), prediction, 512)
    _feeds_fit(tiny_model, SamplingParams(max_tokens=500, ignore_eos=True), prediction, 50)


def test_engine_pads_a_64_token_draft_at_the_end_of_the_context(tiny_model: Model) -> None:
    """Two rows near the engine's context limit, one drafting 64 tokens: the other row is
    padded to 65 positions past its own; both finish by length, equal to plain. (The
    prediction's first drafts get a decode step here, not the prefill: engine/prefill.py.)"""
    engine = Engine(tiny_model, max_batch=2, drafts_in_prefill=False)
    log = StepLog(engine)
    try:
        room = engine.context_limit
        prompts = [PROMPT * 30, PROMPT[::-1] * 30]
        prompts = [p[: room - 70] for p in prompts]
        params = SamplingParams(max_tokens=1000, ignore_eos=True)
        plains = [generate(tiny_model, p, params).token_ids[: room - len(p)] for p in prompts]
        speculation = SpeculationConfig(adaptive=False)
        waiters = [Waiter(), Waiter()]
        # The plain row first: it is decoding when the other's 64-draft feed joins it.
        engine.submit(prompts[1], params, waiters[1].on_text, waiters[1].on_done, speculation)
        engine.submit(prompts[0], params, waiters[0].on_text, waiters[0].on_done, speculation,
                      prediction_ids=plains[0])  # fmt: skip
        results = [w.wait() for w in waiters]
    finally:
        engine.stop()
    for result, plain in zip(results, plains, strict=True):
        assert result.token_ids == plain and result.finish_reason == "length"
    padded = [r for r in log.records if r.kind == "decode" and r.batch_size == 2]
    assert max(r.tokens for r in padded) == 2 * (MAX_LOOKUP_DRAFT + 1), log.records
