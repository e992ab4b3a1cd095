"""The draft-length tuner: measured cost per width, acceptance per position, long drafts."""

from __future__ import annotations

import pytest

from specserve.speculative.draft_length import (
    MARGINAL_COST_PRIOR,
    PROBE_COST_STEPS,
    PROBE_FREE_DRAFTS,
    Acceptance,
    LengthTuner,
    StepCosts,
)

# bench/results/runtime.json: the native runtime's Qwen2.5-Coder-1.5B forward over T tokens
# (ms); T = 65 extends the 16 -> 32 slope (4.8 ms a token) to a 64-draft verify.
QWEN_MS = {1: 28.4, 2: 31.4, 4: 38.5, 8: 55.5, 16: 89.8, 32: 166.7, 65: 325.3}


def _measured(table: dict[int, float]) -> StepCosts:
    costs = StepCosts()
    for tokens, ms in table.items():
        costs.observe(tokens, ms / 1000)
    return costs


def test_cost_is_interpolated_between_measured_widths() -> None:
    costs = _measured(QWEN_MS)
    assert costs.estimate(8) == pytest.approx(0.0555)
    assert costs.estimate(12) == pytest.approx((0.0555 + 0.0898) / 2)
    assert costs.estimate(48) == pytest.approx(0.1667 + 16 * (0.3253 - 0.1667) / 33)
    # A far cry from the old prior's 1 + 0.06 (T - 1) steps (8 tokens: 1.42, measured 1.95).
    assert costs.estimate(8) / costs.estimate(1) == pytest.approx(1.954, abs=0.01)


def test_cost_prior_before_and_beyond_measurements() -> None:
    assert StepCosts().estimate(5) == pytest.approx(1 + 4 * MARGINAL_COST_PRIOR)
    costs = _measured({1: 28.4, 8: 55.5})
    # Past the widest measured width: the prior's shape, scaled from the nearest measurement.
    prior = (1 + 15 * MARGINAL_COST_PRIOR) / (1 + 7 * MARGINAL_COST_PRIOR)
    assert costs.estimate(16) == pytest.approx(0.0555 * prior)
    costs.observe(8, 0.0655)  # a new measurement moves the average by EMA_WEIGHT
    assert costs.estimate(8) == pytest.approx(0.0575)


def test_acceptance_positions_never_drafted_take_the_methods_rate() -> None:
    acceptance = Acceptance(8)
    assert acceptance.rates() == pytest.approx([0.6] * 8)  # the prior
    for _ in range(10):
        acceptance.observe(proposed=4, accepted=4)
    rates = acceptance.rates()
    assert min(rates) > 0.95  # positions 5..8 were never drafted, yet priced like 1..4
    acceptance.observe(proposed=4, accepted=1)
    after = acceptance.rates()
    assert after[1] < rates[1] - 0.05  # the rejected position drops most
    assert after[1] == min(after) and after[4] < rates[4]  # untried ones follow the rate


def _copy(tuner: LengthTuner, steps: int, edit_every: int | None = None) -> list[int]:
    """Drive the tuner over a prediction the output copies, with an edit every
    ``edit_every`` tokens (None: exact); returns the chosen k of every step."""
    chosen, written = [], 0
    for _ in range(steps):
        k = tuner.choose()
        accepted = k
        if edit_every is not None:
            accepted = min(k, edit_every - 1 - written % edit_every)
        tuner.observe(k, accepted)
        written += accepted + 1
        chosen.append(k)
    return chosen


def test_an_exact_prediction_drafts_64_tokens_once_measured_to_pay() -> None:
    tuner = LengthTuner(64, _measured(QWEN_MS))
    chosen = _copy(tuner, 12)
    print(chosen)
    assert chosen[0] < 16  # the prior acceptance (0.6) asks for a short first draft
    assert chosen.index(64) <= 6 and set(chosen[chosen.index(64) :]) == {64}


def test_long_drafts_only_where_they_pay() -> None:
    # An edit every 20 tokens: a 64-token draft would mostly be thrown away.
    chosen = _copy(LengthTuner(64, _measured(QWEN_MS)), 40, edit_every=20)
    assert max(chosen[10:]) <= 32 and min(chosen[10:]) >= 4
    # A forward that grows faster than the tokens it verifies: exact copying still stops
    # at the width where the cost per token is lowest.
    steep = {**QWEN_MS, 65: 3 * QWEN_MS[32]}
    assert max(_copy(LengthTuner(64, _measured(steep)), 12)) <= 33


def test_free_drafter_probes_a_few_positions() -> None:
    tuner = LengthTuner(64, _measured(QWEN_MS))
    for _ in range(50):
        tuner.observe(proposed=8, accepted=0)
    picks = [tuner.choose() for _ in range(32)]
    # QWEN_MS: 4 tokens cost 1.36 steps, 5 tokens (interpolated) 1.51: 3 drafts fit 1.5 steps
    assert sorted(set(picks)) == [0, 3]
    assert picks.count(3) == 2  # every PROBE_INTERVAL (16) plain steps


@pytest.mark.parametrize(
    ("table", "probe"),
    [
        ({1: 20.0, 16: 22.0}, PROBE_FREE_DRAFTS),  # wide forwards nearly free: the full probe
        ({1: 67.8, 8: 196.9}, 1),  # an AVX2 CPU's 1.5B (2 tokens: 1.27 steps, 3: 1.54)
        ({1: 10.0, 2: 30.0}, 1),  # even one draft dearer than the budget: still one
    ],
)
def test_probe_size_follows_the_measured_cost(table: dict[int, float], probe: int) -> None:
    tuner = LengthTuner(64, _measured(table))
    assert tuner.free_probe() == probe
    assert tuner.costs.estimate(probe + 1) <= PROBE_COST_STEPS * table[1] / 1000 or probe == 1


def test_a_continuation_is_priced_on_top_of_the_drafts_before_it() -> None:
    """After 16 drafts of another proposer, more drafts cost what widening that forward
    costs and are worth tokens only if those 16 survive: a strong proposer continues a
    surely kept run, and nothing continues a run that is likely rejected."""
    tuner = LengthTuner(4, _measured(QWEN_MS))
    for _ in range(20):
        tuner.observe(4, 4)  # this proposer's drafts are always kept
    # 16 drafts kept for sure (17 expected tokens): 4 more drafts add ~4 tokens for ~19 ms.
    assert tuner.choose_after(16, tokens=17.0, survive=1.0, room=10) == 4
    assert tuner.choose_after(16, tokens=17.0, survive=1.0, room=2) == 2
    # The same 16 drafts, all kept with probability 0.05: widening does not pay.
    assert tuner.choose_after(16, tokens=3.0, survive=0.05, room=10) == 0
