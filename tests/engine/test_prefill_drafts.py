"""A prediction's first drafts verified in the prompt's last prefill chunk (engine/prefill.py):
the same logits as a step of their own, bit for bit, the same tokens, one forward fewer."""

from __future__ import annotations

import torch

from specserve.engine.generate import generate
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.sampling import SamplingParams
from tests.engaged import StepLog
from tests.engine.test_scheduler import _submit

PROMPT = list(range(40, 70)) + [7, 8, 9] * 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
FIXED = SpeculationConfig(adaptive=False)  # drafts as far as the prediction goes


def _edited(tokens: list[int]) -> list[int]:
    """``tokens`` with one replaced in the middle: the verifier must reject there."""
    middle = len(tokens) // 2
    return [*tokens[:middle], (tokens[middle] + 1) % 50, *tokens[middle + 1 :]]


def test_feed_rows_in_the_prefill_equal_a_step_of_their_own(exact_model: Model) -> None:
    """Logits, features and KV of a chunk ending ``[last prompt token, *drafts]`` equal a
    prefill of the prompt followed by a forward of the drafts, bit for bit."""
    lm = exact_model.lm
    drafts = [*generate(exact_model, PROMPT, GREEDY).token_ids[:5], 3, 4]
    together = lm.new_cache(1, 128)
    ids = torch.tensor([PROMPT + drafts])
    logits, features = lm.forward_with_features(
        ForwardBatch(ids, [0], [0]), together, last_logits=len(drafts) + 1
    )
    apart = lm.new_cache(1, 128)
    first, prompt_features = lm.forward_with_features(
        ForwardBatch(torch.tensor([PROMPT]), [0], [0]), apart, last_logits=1
    )
    step, step_features = lm.forward_with_features(
        ForwardBatch(torch.tensor([drafts]), [0], [len(PROMPT)]), apart
    )
    assert logits.shape[1] == len(drafts) + 1
    assert torch.equal(logits[0, 0], first[0, -1]) and torch.equal(logits[0, 1:], step[0])
    assert torch.equal(features[0], torch.cat([prompt_features[0], step_features[0]]))
    end = len(PROMPT) + len(drafts)
    assert torch.equal(together.keys[..., :end, :], apart.keys[..., :end, :])
    assert torch.equal(together.values[..., :end, :], apart.values[..., :end, :])


def test_generate_verifies_the_first_drafts_in_the_prefill(exact_model: Model) -> None:
    plain = generate(exact_model, PROMPT, GREEDY)
    prediction = _edited(plain.token_ids)
    result = generate(exact_model, PROMPT, GREEDY, speculation=FIXED, prediction_ids=prediction)
    assert result.token_ids == plain.token_ids
    counts = result.stats.by_method["prediction"]
    # The prefill's step drafted all that the budget leaves (the first step's drafts are the
    # longest) and kept what precedes the edit.
    assert len(counts.proposed_per_position) == len(plain.token_ids) - 1
    assert counts.accepted_per_position[len(prediction) // 2 - 1] >= 1
    assert result.stats.generated == len(plain.token_ids)


def test_the_engine_saves_a_forward_and_keeps_its_output(exact_model: Model) -> None:
    """With and without drafts in the prefill, beside another request: the same tokens and
    as many verify steps, one of which was the prefill's (a decode forward saved)."""
    plain = generate(exact_model, PROMPT, GREEDY)
    prediction = _edited(plain.token_ids)
    other = PROMPT[::-1]
    runs = {}
    for drafts_in_prefill in (True, False):
        engine = Engine(exact_model, max_batch=2, drafts_in_prefill=drafts_in_prefill)
        log = StepLog(engine)
        try:
            beside = _submit(engine, other, GREEDY)
            waiter = _submit(engine, PROMPT, GREEDY, speculation=FIXED, prediction_ids=prediction)
            runs[drafts_in_prefill] = (waiter.wait(), beside.wait(), log.records)
        finally:
            engine.stop()
    (merged, beside, records), (apart, beside_apart, _) = runs[True], runs[False]
    assert merged.token_ids == apart.token_ids == plain.token_ids
    alone = generate(exact_model, other, GREEDY).token_ids
    assert beside.token_ids == beside_apart.token_ids == alone
    assert merged.stats.target_steps == apart.stats.target_steps
    prefills = [r.tokens for r in records if r.kind == "prefill"]
    assert len(PROMPT) + len(plain.token_ids) - 1 in prefills, records  # prompt and 39 drafts


def test_a_request_verified_in_the_prefill_is_kept_for_the_next_turn(exact_model: Model) -> None:
    """The prefix cache keeps prompt and output of such a request (the output's first KV
    written by the prefill): the next turn gets a whole prefill's logits, bit for bit."""
    plain = generate(exact_model, PROMPT, GREEDY)
    cache = PrefixCache(64 << 20)
    engine = Engine(exact_model, max_batch=2, prefix_cache=cache)
    try:
        prediction = _edited(plain.token_ids)
        turn = _submit(engine, PROMPT, GREEDY, speculation=FIXED, prediction_ids=prediction)
        first = turn.wait()
        follow = [*PROMPT, *first.token_ids, 21, 22, 23]
        second = _submit(engine, follow, GREEDY).wait()
    finally:
        engine.stop()
    assert first.token_ids == plain.token_ids
    assert second.cached_prompt_tokens == len(PROMPT) + len(first.token_ids) - 1
    assert second.token_ids == generate(exact_model, follow, GREEDY).token_ids
