"""Proposers: the n-gram worked examples, prediction alignment across edits, the registry."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from specserve.speculative.proposers import (
    PROPOSERS,
    NgramProposer,
    PredictionProposer,
    PredictionStats,
    SequenceContext,
    register,
)


def _ngram(ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    proposal = NgramProposer(max_ngram, min_ngram).propose(SequenceContext.of(ids), k)
    assert proposal.draft_probs is None and proposal.method == "ngram"
    return proposal.token_ids


def test_ngram_longer_match_wins_over_a_more_recent_shorter_one() -> None:
    # [1, 2, 3] at 1..3 beats the more recent [2, 3] at 6..7.
    assert _ngram([5, 1, 2, 3, 4, 9, 2, 3, 7, 1, 2, 3], k=3) == [4, 9, 2]


def test_ngram_most_recent_occurrence_wins() -> None:
    assert _ngram([1, 2, 5, 1, 2, 6, 1, 2], k=2, max_ngram=2) == [6, 1]


def test_ngram_falls_back_to_shorter_suffixes() -> None:
    assert _ngram([5, 1, 2, 3, 4, 9, 2, 3], k=3) == [4, 9, 2]
    assert _ngram([5, 1, 2, 3, 4, 9, 2, 3], k=3, min_ngram=3) == []


def test_ngram_no_match_proposes_nothing() -> None:
    assert _ngram([1, 2, 3, 4], k=3) == []
    assert _ngram([1], k=3) == []
    assert _ngram([1, 2, 1], k=0) == []


def test_ngram_truncates_at_the_end_of_the_context() -> None:
    assert _ngram([1, 2, 3, 1, 2], k=5) == [3, 1, 2]
    assert _ngram([7, 7, 7], k=4) == [7]  # [7, 7] ends at 1; only the last 7 follows


def test_ngram_matches_a_brute_force_reading_of_its_definition() -> None:
    def brute(ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
        for n in range(max_n, min_n - 1, -1):
            suffix = ids[len(ids) - n :]
            for start in range(len(ids) - n - 1, -1, -1):  # most recent first, suffix excluded
                if n <= len(ids) - 1 and ids[start : start + n] == suffix:
                    return ids[start + n : start + n + k]
        return []

    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        max_n = rng.randrange(1, 5)
        min_n = rng.randrange(1, max_n + 1)
        k = rng.randrange(0, 6)
        assert _ngram(ids, k, max_n, min_n) == brute(ids, k, max_n, min_n), (ids, max_n, min_n)


def test_ngram_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        NgramProposer(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramProposer(max_ngram=2, min_ngram=0)


# ------------------------------------------------------------------------- predictions

PREDICTION = list(range(10, 40))  # distinct tokens, so every expected place is unambiguous
EDIT = 99  # a token that is not in the prediction


def _predict(
    proposer: PredictionProposer, output: Sequence[int], k: int = 4, prompt: Sequence[int] = (1,)
) -> list[int]:
    proposal = proposer.propose(SequenceContext.of(prompt, output), k)
    assert proposal.draft_probs is None and proposal.method == "prediction"
    return proposal.token_ids


def test_prediction_before_any_edit_proposes_its_continuation() -> None:
    proposer = PredictionProposer(PREDICTION)
    assert _predict(proposer, []) == PREDICTION[:4]
    assert _predict(proposer, PREDICTION[:5]) == PREDICTION[5:9]
    assert _predict(proposer, PREDICTION[:7], k=100) == PREDICTION[7:]  # k honoured, up to the end
    assert _predict(proposer, PREDICTION) == []


def test_prediction_run_is_capped_by_max_run() -> None:
    assert _predict(PredictionProposer(PREDICTION, max_run=3), [], k=64) == PREDICTION[:3]


@pytest.mark.parametrize(
    ("edit", "output", "resumes_at"),
    [
        ("insertion", [*PREDICTION[:5], EDIT, EDIT + 1, PREDICTION[5]], 6),
        ("deletion", [*PREDICTION[:5], PREDICTION[7]], 8),
        ("replacement", [*PREDICTION[:5], EDIT, PREDICTION[6]], 7),
        ("long replacement", [*PREDICTION[:5], EDIT, EDIT, EDIT, *PREDICTION[9:11]], 11),
    ],
)
def test_prediction_resyncs_after_an_edit(edit: str, output: list[int], resumes_at: int) -> None:
    proposer = PredictionProposer(PREDICTION)
    # The engine calls once per step; the edit arrives as the recovered token of a step.
    assert _predict(proposer, PREDICTION[:5]) == PREDICTION[5:9]
    assert _predict(proposer, output[:6]) == ([] if output[5] == EDIT else PREDICTION[8:12])
    assert _predict(proposer, output) == PREDICTION[resumes_at : resumes_at + 4], edit


def test_prediction_keeps_helping_after_every_edit() -> None:
    """A simulated greedy engine: the target writes the prediction with three edits."""
    wanted = [*PREDICTION[:6], EDIT, *PREDICTION[6:15], *PREDICTION[17:25], 98, *PREDICTION[26:]]
    proposer = PredictionProposer(PREDICTION)
    output: list[int] = []
    steps = total_accepted = 0
    while len(output) < len(wanted):
        drafts = _predict(proposer, output, k=16)
        accepted = 0  # greedy verification: keep drafts while they are what the target writes
        ahead = wanted[len(output) :]
        while accepted < min(len(drafts), len(ahead)) and drafts[accepted] == ahead[accepted]:
            accepted += 1
        total_accepted += accepted
        output += drafts[:accepted]
        if len(output) < len(wanted):
            output.append(wanted[len(output)])  # the recovered or bonus token
        steps += 1
    print(f"{steps} steps, {total_accepted} drafts accepted")
    assert output == wanted
    # Each edit costs at most two steps: the recovered token, then one plain step to re-sync.
    assert steps <= 2 + 2 * 3
    assert total_accepted >= len(wanted) - steps


def test_prediction_prefers_the_match_after_the_alignment() -> None:
    prediction = [1, 2, 3, 7, 1, 2, 3, 8]
    proposer = PredictionProposer(prediction)
    assert _predict(proposer, [1, 2, 3, 7]) == [1, 2, 3, 8]
    # [1, 2, 3] occurs before and after the place the output left: after wins.
    assert _predict(proposer, [1, 2, 3, 7, 9, 1, 2, 3]) == [8]


def test_prediction_looks_back_when_nothing_matches_ahead() -> None:
    proposer = PredictionProposer(PREDICTION[:6])
    # The output repeats part of the prediction after reaching its end.
    assert _predict(proposer, [*PREDICTION[:6], EDIT, *PREDICTION[1:3]]) == PREDICTION[3:6]


def test_prediction_does_not_trust_a_lone_token_far_away() -> None:
    proposer = PredictionProposer(PREDICTION)
    assert _predict(proposer, [*PREDICTION[:5], EDIT, PREDICTION[20]]) == []
    # Two tokens in a row are enough evidence anywhere.
    assert _predict(proposer, [*PREDICTION[:5], EDIT, *PREDICTION[20:22]]) == PREDICTION[22:26]


def test_prediction_starts_over_for_a_new_output() -> None:
    proposer = PredictionProposer(PREDICTION)
    assert _predict(proposer, [*PREDICTION[:3], EDIT]) == []
    assert _predict(proposer, []) == PREDICTION[:4]


def test_prediction_counters_follow_openai_semantics() -> None:
    """accepted: prediction tokens that appear in the completion; rejected: those that do not."""
    prediction = [1, 2, 3, 4, 5, 6]
    assert PredictionStats.count(prediction, prediction) == PredictionStats(6, 0)
    assert PredictionStats.count(prediction, [1, 2, 9, 9, 5, 6, 7]) == PredictionStats(4, 2)
    assert PredictionStats.count(prediction, [7, 8]) == PredictionStats(0, 6)
    assert PredictionStats.count([], [1, 2]) == PredictionStats(0, 0)


# ---------------------------------------------------------------------------- registry


def test_registry_is_keyed_by_method_name() -> None:
    assert PROPOSERS["ngram"] is NgramProposer
    assert PROPOSERS["prediction"] is PredictionProposer
    assert register(NgramProposer) is NgramProposer  # registering the same class again is fine

    class Impostor(NgramProposer):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert PROPOSERS["ngram"] is NgramProposer
