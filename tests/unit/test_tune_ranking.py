"""`specserve tune` analysis: speedups, bootstrap intervals and the recommendation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from specserve.deployments.rules import DrafterFlags
from specserve.tune.measure import Candidate, Measurement
from specserve.tune.ranking import rank, recommend

PLAIN = Candidate("plain", None)
NGRAM = Candidate("ngram n=3 k<=4", "ngram", draft_token_count=4, ngram_length=3, is_default=True)
NGRAM2 = Candidate("ngram n=2 k<=2", "ngram", draft_token_count=2, ngram_length=2)
DRAFT = Candidate("draft tiny k<=4", "draft_model", draft_token_count=4, draft_model="tiny")


def measure(
    candidate: Candidate,
    prompt: int,
    tokens: int,
    seconds: float,
    *,
    identical: bool = True,
    steps: int | None = None,
    accepted: int = 0,
    proposed_pp: list[int] | None = None,
    accepted_pp: list[int] | None = None,
    prefill: float = 0.1,
) -> Measurement:
    proposed_pp = proposed_pp or []
    accepted_pp = accepted_pp or []
    return Measurement(
        candidate=candidate.name,
        prompt_index=prompt,
        tokens=tokens,
        decode_seconds=seconds,
        total_seconds=seconds + prefill,
        target_steps=tokens if steps is None else steps,
        proposed=sum(proposed_pp),
        accepted=accepted,
        proposed_per_position=proposed_pp,
        accepted_per_position=accepted_pp,
        identical_to_plain=identical,
    )


def synthetic(
    factors: dict[Candidate, float],
    *,
    prompts: int = 24,
    noise: float = 0.05,
    seed: int = 1,
    identical: dict[str, bool] | None = None,
) -> list[Measurement]:
    """Plain plus candidates `factor` times faster, with per-prompt multiplicative noise."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(prompts):
        tokens = int(rng.integers(20, 200))
        base = tokens / 50.0 * rng.uniform(0.5, 2.0)  # prompts differ a lot in speed
        out.append(measure(PLAIN, p, tokens, base * rng.lognormal(0, noise)))
        for c, factor in factors.items():
            same = (identical or {}).get(c.name, True)
            seconds = base / factor * rng.lognormal(0, noise)
            out.append(measure(c, p, tokens, seconds, identical=same))
    return out


def test_clear_winner_is_ranked_first_and_recommended_with_ci_around_truth() -> None:
    candidates = [PLAIN, NGRAM, NGRAM2, DRAFT]
    ms = synthetic({NGRAM: 1.5, NGRAM2: 1.1, DRAFT: 0.8})
    ranked = rank(candidates, ms)
    assert [r.candidate.name for r in ranked] == [NGRAM.name, NGRAM2.name, PLAIN.name, DRAFT.name]
    best = ranked[0]
    assert best.ci_low < 1.5 < best.ci_high
    assert best.ci_high - best.ci_low < 0.2  # 24 paired prompts with 5% noise: a tight CI
    assert abs(best.speedup - 1.5) < 0.05
    assert best.prompts == 24
    plain = next(r for r in ranked if r.candidate is PLAIN)
    assert (plain.speedup, plain.ci_low, plain.ci_high) == (1.0, 1.0, 1.0)
    rec = recommend(ranked)
    assert rec.speculation and rec.candidate == NGRAM
    assert rec.flags == "--ngram-speculation-length 3 --draft-token-count 4"
    assert "1.5" in rec.reason and "identical output" in rec.reason
    assert "default drafter" in rec.reason


def test_rank_is_deterministic_for_a_seed() -> None:
    ms = synthetic({NGRAM: 1.2}, noise=0.2)
    a, b = rank([PLAIN, NGRAM], ms, seed=3), rank([PLAIN, NGRAM], ms, seed=3)
    assert (a[0].ci_low, a[0].ci_high) == (b[0].ci_low, b[0].ci_high)
    c = rank([PLAIN, NGRAM], ms, seed=4)
    assert (a[0].ci_low, a[0].ci_high) != (c[0].ci_low, c[0].ci_high)


def test_speedup_is_a_ratio_of_sums_not_a_mean_of_ratios() -> None:
    # Prompt 0: 100 tokens, 2x faster; prompt 1: 10 tokens, 2x slower.
    ms = [
        measure(PLAIN, 0, 100, 10.0), measure(NGRAM, 0, 100, 5.0),
        measure(PLAIN, 1, 10, 1.0), measure(NGRAM, 1, 10, 2.0),
    ]  # fmt: skip
    (first, _) = rank([PLAIN, NGRAM], ms)
    assert first.speedup == pytest.approx((110 / 7.0) / (110 / 11.0))
    assert first.end_to_end_speedup == pytest.approx((110 / 7.2) / (110 / 11.2))


def test_decode_speedup_counts_only_the_tokens_after_the_prefills() -> None:
    """A prediction's first step rides in the prefill (engine/prefill.py): the tokens that
    came out with the first are not the decode phase's, whose seconds do not include them."""
    with_prediction = dataclasses.replace(measure(NGRAM, 0, 101, 5.0), first_tokens=21)
    (first, _) = rank([PLAIN, NGRAM], [measure(PLAIN, 0, 101, 10.0), with_prediction])
    assert first.speedup == pytest.approx((80 / 5.0) / (100 / 10.0))


def test_plain_wins_when_every_candidate_is_slower() -> None:
    ranked = rank([PLAIN, NGRAM, DRAFT], synthetic({NGRAM: 0.9, DRAFT: 0.7}))
    assert ranked[0].candidate is PLAIN
    rec = recommend(ranked)
    assert not rec.speculation and rec.candidate is PLAIN
    assert rec.flags == "--no-speculation"
    assert rec.reason.startswith("No speculation")
    assert "--no-speculation" in rec.reason and f"best: {NGRAM.name}" in rec.reason


def test_plain_wins_when_the_ci_crosses_one() -> None:
    # 2% faster on average but with 30% noise per prompt: not reliably faster.
    ranked = rank([PLAIN, NGRAM], synthetic({NGRAM: 1.02}, prompts=8, noise=0.3, seed=5))
    best = next(r for r in ranked if r.candidate is NGRAM)
    assert best.ci_low < 1.0 < best.ci_high
    rec = recommend(ranked, min_speedup=1.0)
    assert not rec.speculation
    assert "within noise" in rec.reason and "--no-speculation" in rec.reason


def test_min_speedup_threshold() -> None:
    ranked = rank([PLAIN, NGRAM], synthetic({NGRAM: 1.05}, noise=0.005))
    best = next(r for r in ranked if r.candidate is NGRAM)
    assert best.ci_low > 1.0
    assert recommend(ranked, min_speedup=1.02).speculation
    rec = recommend(ranked, min_speedup=1.10)
    assert not rec.speculation and "below the 1.10x minimum" in rec.reason


def test_ties_go_to_the_tighter_interval_and_then_the_simpler_setting() -> None:
    # Same totals for both candidates, but NGRAM2 is consistent while NGRAM varies.
    ms = [measure(PLAIN, p, 100, 10.0) for p in range(6)]
    ms += [measure(NGRAM2, p, 100, 5.0) for p in range(6)]
    ms += [measure(NGRAM, p, 100, s) for p, s in enumerate([3.0, 7.0, 3.0, 7.0, 4.0, 6.0])]
    ranked = rank([PLAIN, NGRAM, NGRAM2], ms)
    assert ranked[0].speedup == ranked[1].speedup == pytest.approx(2.0)
    assert [r.candidate for r in ranked[:2]] == [NGRAM2, NGRAM]
    assert recommend(ranked).candidate == NGRAM2
    # An exact tie with plain, nothing gained: plain ranks first.
    flat = [measure(PLAIN, 0, 50, 5.0), measure(DRAFT, 0, 50, 5.0)]
    assert rank([DRAFT, PLAIN], flat)[0].candidate is PLAIN


def test_non_identical_output_is_never_recommended_and_called_a_bug() -> None:
    ms = synthetic({NGRAM: 1.6, NGRAM2: 1.3}, identical={NGRAM.name: False})
    ranked = rank([PLAIN, NGRAM, NGRAM2], ms)
    assert ranked[0].candidate == NGRAM and not ranked[0].identical
    rec = recommend(ranked)
    assert rec.candidate == NGRAM2 and rec.speculation
    assert "bug" in rec.reason and NGRAM.name in rec.reason


def test_non_identical_only_candidate_leaves_plain() -> None:
    ms = synthetic({NGRAM: 1.6}, identical={NGRAM.name: False})
    rec = recommend(rank([PLAIN, NGRAM], ms))
    assert not rec.speculation and "bug" in rec.reason and "--no-speculation" in rec.reason


def test_acceptance_per_position_and_mean_accepted_length() -> None:
    ms = [
        measure(PLAIN, 0, 20, 2.0),
        measure(PLAIN, 1, 10, 1.0),
        # 20 tokens in 8 steps: 12 accepted drafts. Positions: 8/8 proposed, 6 & 4 accepted ...
        measure(DRAFT, 0, 20, 1.0, steps=8, accepted=12,
                proposed_pp=[8, 8, 6, 4], accepted_pp=[6, 4, 2, 0]),
        measure(DRAFT, 1, 10, 0.5, steps=4, accepted=6,
                proposed_pp=[4, 4, 2], accepted_pp=[4, 2, 2]),
    ]  # fmt: skip
    ranked = rank([PLAIN, DRAFT], ms)
    draft = next(r for r in ranked if r.candidate is DRAFT)
    assert draft.acceptance_per_position == pytest.approx([10 / 12, 6 / 12, 4 / 8, 0 / 4])
    assert draft.mean_accepted_length == pytest.approx((18 + 12) / 12)
    plain = next(r for r in ranked if r.candidate is PLAIN)
    assert plain.mean_accepted_length == 1.0 and plain.acceptance_per_position == []
    assert draft.latency_p50 == pytest.approx((1.1 + 0.6) / 2)
    assert plain.latency_p95 == pytest.approx(1.1 + 0.95 * (2.1 - 1.1))


def test_errors() -> None:
    ms = synthetic({NGRAM: 1.2}, prompts=3)
    with pytest.raises(ValueError, match="plain"):
        rank([NGRAM], [m for m in ms if m.candidate == NGRAM.name])
    with pytest.raises(ValueError, match="no measurements"):
        rank([PLAIN, NGRAM, DRAFT], ms)
    with pytest.raises(ValueError, match="other prompts"):
        rank([PLAIN, NGRAM], [m for m in ms if not (m.candidate == NGRAM.name and m.prompt_index)])
    with pytest.raises(ValueError, match="unknown candidate"):
        rank([PLAIN], ms)
    ranked = rank([PLAIN, NGRAM], ms)
    with pytest.raises(ValueError, match="plain"):
        recommend([r for r in ranked if r.candidate is not PLAIN])
    with pytest.raises(ValueError, match="ngram_length"):
        Candidate("bad", "ngram", draft_token_count=2)


def test_candidate_flags() -> None:
    assert PLAIN.flags() == DrafterFlags(no_speculation=True)
    assert PLAIN.cli_flags() == "--no-speculation"
    assert NGRAM2.flags() == DrafterFlags(ngram_speculation_length=2, draft_token_count=2)
    assert DRAFT.cli_flags() == "--draft-model tiny --draft-token-count 4"


def test_zero_decode_time_does_not_crash() -> None:
    # Single-token outputs have no decode time; the ratio is undefined, not an exception.
    ms = [measure(PLAIN, 0, 1, 0.0), measure(NGRAM, 0, 1, 0.0)]
    ranked = rank([PLAIN, NGRAM], ms)
    assert ranked[0].candidate is PLAIN and math.isnan(ranked[1].speedup)
    assert not recommend(ranked).speculation
