"""The lossless verifier: crafted greedy cases, a seeded statistical test, determinism."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from specserve.speculative.sampling import SamplingParams, target_probs
from specserve.speculative.verify import PLACEHOLDER_TOKEN_ID, verify_greedy, verify_sampled

P = PLACEHOLDER_TOKEN_ID

# Statistical test: TRIALS seeded verification steps per case, over a small vocabulary.
VOCAB = 8
K = 3
TRIALS = 60_000
# Bounds on each empirical distribution against the exact one. Both hold for any correct
# verifier except with tiny probability (sampling noise alone gives a TVD of about 0.005 and
# p-values spread uniformly over (0, 1)); the wrong verifiers checked below exceed them by far.
MAX_TVD = 0.02
MIN_P_VALUE = 1e-3


def _logits_with_argmax(argmax: list[list[int]], vocab: int = 10) -> torch.Tensor:
    """Crafted logits ``[B, K + 1, V]`` whose argmax is the given token at each position."""
    ids = torch.tensor(argmax)  # [B, K + 1]
    logits = torch.zeros(*ids.shape, vocab)  # [B, K + 1, V]
    logits.scatter_(-1, ids[..., None], 5.0)
    return logits


def _greedy(drafts: list[list[int]], num: list[int], argmax: list[list[int]]) -> list[list[int]]:
    target_ids = _logits_with_argmax(argmax).argmax(-1)  # [B, K + 1]
    result = verify_greedy(torch.tensor(drafts), torch.tensor(num), target_ids)
    assert result.num_accepted.tolist() == [len(result.row(b)) - 1 for b in range(len(num))]
    return result.output_ids.tolist()


def test_greedy_perfect_match_accepts_all_and_adds_the_bonus_token() -> None:
    assert _greedy([[1, 2, 3]], [3], [[1, 2, 3, 4]]) == [[1, 2, 3, 4]]


def test_greedy_early_mismatch_gives_the_recovered_token() -> None:
    assert _greedy([[1, 2, 3]], [3], [[1, 7, 3, 4]]) == [[1, 7, P, P]]
    assert _greedy([[1, 2, 3]], [3], [[9, 2, 3, 4]]) == [[9, P, P, P]]


def test_greedy_empty_proposal_gives_just_the_target_token() -> None:
    assert _greedy([[P, P, P]], [0], [[5, 6, 7, 8]]) == [[5, P, P, P]]
    result = verify_greedy(
        torch.empty(2, 0, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
        torch.tensor([[4], [6]]),
    )
    assert result.output_ids.tolist() == [[4], [6]]


def test_greedy_batch_with_different_num_drafts() -> None:
    drafts = [[1, 2, 3], [1, 2, P], [4, P, P], [P, P, P], [1, 2, 3]]
    num = [3, 2, 1, 0, 3]
    argmax = [[1, 2, 3, 9], [1, 2, 3, 9], [4, 5, 6, 7], [8, 1, 1, 1], [1, 5, 3, 9]]
    assert _greedy(drafts, num, argmax) == [
        [1, 2, 3, 9],  # all 3 accepted + bonus
        [1, 2, 3, P],  # both accepted; bonus from position 2, the unused slot is ignored
        [4, 5, P, P],  # accepted + bonus
        [8, P, P, P],  # no drafts: the target's token
        [1, 5, P, P],  # recovered at position 1
    ]


# ----------------------------------------------------------------- the statistical test


def _random_dist(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Random, far-from-uniform distributions over the last dimension."""
    weights = torch.rand(*shape, generator=gen) ** 3
    return weights / weights.sum(-1, keepdim=True)


def _process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """A caller's sampling processing: temperature, then top-k, then top-p (nucleus)."""
    logits = logits / temperature
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _scenario(case: str, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Target tables and draft tables, one per position: position 0 is ``[V]``, position
    i > 0 is ``[V, V]`` indexed by the draft token at i - 1 (both models see the drafts)."""
    shapes = [(VOCAB,)] + [(VOCAB, VOCAB)] * K
    if case == "processed target":
        target = [_process(torch.randn(*s, generator=gen) * 2, 0.7, 5, 0.8) for s in shapes]
    else:
        target = [_random_dist(*s, gen=gen) for s in shapes]
    if case == "one-hot draft":  # a deterministic proposer: fixed tokens, no distribution
        # Position 0 proposes the target's most likely token (accepted or rejected
        # often); later positions a fixed token whatever came before.
        fixed = [int(target[0].argmax())] + [3] * (K - 1)
        draft = [torch.nn.functional.one_hot(torch.tensor(x), VOCAB).float() for x in fixed]
        draft = [d if i == 0 else d.expand(VOCAB, VOCAB) for i, d in enumerate(draft)]
    else:
        draft = [_random_dist(*s, gen=gen) for s in shapes[:K]]
    return target, draft


def _run_trials(
    target: list[torch.Tensor],
    draft: list[torch.Tensor],
    one_hot: bool,
    gen: torch.Generator,
    stop: tuple[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRIALS verification steps -> (output_ids, num_accepted). num_drafts cycles through
    0..K, or, with ``stop = (rule, threshold)``, the chain stops as EAGLE's does where the
    product of confidences falls below the threshold (``EagleProposer.min_survival``), a
    confidence being ``"max"``, the draft distribution's largest probability (what the
    proposer uses), or ``"sampled"``, the drafted token's own (a biased rule)."""
    draft_ids = torch.empty(TRIALS, K, dtype=torch.long)  # [N, K]
    draft_probs = torch.empty(TRIALS, K, VOCAB)  # [N, K, V]
    target_probs = torch.empty(TRIALS, K + 1, VOCAB)  # [N, K + 1, V]
    previous = None
    for i in range(K + 1):
        t = target[i] if previous is None else target[i][previous]  # [N, V] or [V]
        target_probs[:, i] = t
        if i < K:
            d = draft[i] if previous is None else draft[i][previous]  # [N, V] or [V]
            draft_probs[:, i] = d
            previous = torch.multinomial(d.expand(TRIALS, VOCAB), 1, generator=gen).squeeze(1)
            draft_ids[:, i] = previous
    num_drafts = torch.arange(TRIALS) % (K + 1)  # [N]
    if stop is not None:
        rule, threshold = stop
        drafted = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)  # [N, K]
        confidence = draft_probs.amax(-1) if rule == "max" else drafted
        num_drafts = (confidence.cumprod(-1) >= threshold).sum(-1)  # a prefix survives
    draft_ids[torch.arange(K)[None, :] >= num_drafts[:, None]] = P
    # One acceptance stream and one sample stream, each shared by all rows (drawn in order),
    # keep the test fast; both are independent of ``gen``, which sampled the drafts.
    accept = [torch.Generator().manual_seed(11)] * TRIALS
    final = [torch.Generator().manual_seed(12)] * TRIALS
    result = verify_sampled(
        draft_ids, num_drafts, None if one_hot else draft_probs, target_probs, accept, final
    )
    return result.output_ids, result.num_accepted


@cache
def _trials(case: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A case's tables and trial outputs, computed once per test session."""
    gen = torch.Generator().manual_seed(1234)
    target, draft = _scenario(case, gen)
    # thresholds: the first lets chains of every length through, the second shows the bias
    stop = {"confidence stop": ("max", 0.03), "sampled-confidence stop": ("sampled", 0.2)}
    output_ids, num_accepted = _run_trials(
        target, draft, case == "one-hot draft", gen, stop.get(case)
    )
    return target, draft, output_ids, num_accepted


def _check(samples: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Total variation distance and chi-square p-value of ``samples`` against ``expected``."""
    counts = torch.bincount(samples, minlength=VOCAB).double()  # [V]
    n = counts.sum()
    tvd = 0.5 * (counts / n - expected.double()).abs().sum().item()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token the target rules out was emitted"
    want = expected.double()[support] * n
    chi2 = ((counts[support] - want) ** 2 / want).sum()
    dof = int(support.sum()) - 1
    assert dof >= 2, "the target must not be (nearly) deterministic"
    p_value = torch.special.gammaincc(torch.tensor(dof / 2), chi2 / 2).item()
    return tvd, p_value


@pytest.mark.parametrize(
    "case", ["random draft", "one-hot draft", "processed target", "confidence stop"]
)
def test_sampled_output_follows_the_target_distribution(case: str) -> None:
    target, draft, output_ids, num_accepted = _trials(case)

    # First output token: every trial emits one, distributed as the target at position 0.
    first = _check(output_ids[:, 0], target[0])
    # Second output token, in trials that accepted the first draft (it is then accepted,
    # recovered or the bonus): P(first = a and accepted) = min(p_t(a), p_d(a)), after which
    # the target's distribution is target[1][a].
    kept = torch.minimum(target[0], draft[0])  # [V]
    second_expected = (kept / kept.sum()) @ target[1]  # [V]
    second = _check(output_ids[num_accepted >= 1, 1], second_expected)
    print(f"{case}: (TVD, p-value) first {first}, second {second}")
    for tvd, p_value in (first, second):
        assert tvd < MAX_TVD and p_value > MIN_P_VALUE

    # The test has teeth: the draft's own distribution is far from the target's.
    naive = 0.5 * (draft[0] - target[0]).abs().sum().item()
    assert naive > 5 * MAX_TVD
    if case == "confidence stop":  # chains of several lengths really were proposed
        assert len(set(num_accepted.tolist())) >= 3


def test_a_stop_that_reads_the_sampled_token_fails_the_bound() -> None:
    """Stopping a chain on the drafted token's own probability proposes a biased subset of
    the draft's samples; the verifier's min(1, q/p) then no longer yields the target."""
    target, _, output_ids, _ = _trials("sampled-confidence stop")
    tvd, p_value = _check(output_ids[:, 0], target[0])
    assert tvd > MAX_TVD and p_value < MIN_P_VALUE


def test_a_wrong_verifier_fails_the_bound() -> None:
    """Sampling the recovered token from the target itself (not the residual) is biased."""
    target, _, output_ids, num_accepted = _trials("random draft")
    gen = torch.Generator().manual_seed(99)
    rejected = (num_accepted == 0) & (torch.arange(TRIALS) % (K + 1) > 0)
    # Replace recovered tokens by fresh draws from the target: the usual bug.
    resampled = torch.multinomial(target[0], int(rejected.sum()), True, generator=gen)
    wrong = output_ids[:, 0].clone()
    wrong[rejected] = resampled
    tvd, p_value = _check(wrong, target[0])
    assert tvd > MAX_TVD and p_value < MIN_P_VALUE  # observed: TVD 0.09, p-value 0


# ------------------------------------------------------------------------- determinism


def _batch(seed: int, rows: int = 16, k: int = 4, vocab: int = 50) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    draft_probs = _random_dist(rows, k, vocab, gen=gen)  # [B, K, V]
    target_probs = _random_dist(rows, k + 1, vocab, gen=gen)  # [B, K + 1, V]
    draft_ids = torch.multinomial(draft_probs.view(-1, vocab), 1, generator=gen).view(rows, k)
    num_drafts = torch.arange(rows) % (k + 1)  # [B]
    return draft_ids, num_drafts, draft_probs, target_probs


def _seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _streams(seeds: list[int]) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """Per row: an acceptance stream and a sample stream, both from the row's seed."""
    return _seeded([2 * s for s in seeds]), _seeded([2 * s + 1 for s in seeds])


def test_sampled_is_deterministic_per_row_seed() -> None:
    draft_ids, num_drafts, draft_probs, target_probs = _batch(0)
    seeds = list(range(100, 116))
    first = verify_sampled(draft_ids, num_drafts, draft_probs, target_probs, *_streams(seeds))
    again = verify_sampled(draft_ids, num_drafts, draft_probs, target_probs, *_streams(seeds))
    assert torch.equal(first.output_ids, again.output_ids)
    other = verify_sampled(
        draft_ids, num_drafts, draft_probs, target_probs, *_streams([s + 1000 for s in seeds])
    )
    assert not torch.equal(first.output_ids, other.output_ids)

    # A row's output depends only on its own generator, not on the rest of the batch.
    b = 7
    alone = verify_sampled(
        draft_ids[b : b + 1],
        num_drafts[b : b + 1],
        draft_probs[b : b + 1],
        target_probs[b : b + 1],
        *_streams([seeds[b]]),
    )
    assert alone.row(0) == first.row(b)


def test_row_without_drafts_is_plain_sampling() -> None:
    """One multinomial draw from the row's generator: the same token as plain sampling."""
    _, _, _, target_probs = _batch(1)
    rows = target_probs.shape[0]
    no_drafts = torch.full((rows, 4), P)
    result = verify_sampled(
        no_drafts,
        torch.zeros(rows, dtype=torch.long),
        None,
        target_probs,
        _seeded(list(range(rows, 2 * rows))),  # acceptance: unused without drafts
        _seeded(list(range(rows))),
    )
    plain = [
        int(torch.multinomial(target_probs[b, :1], 1, generator=gen))
        for b, gen in enumerate(_seeded(list(range(rows))))
    ]
    assert result.output_ids[:, 0].tolist() == plain
    assert (result.output_ids[:, 1:] == P).all() and (result.num_accepted == 0).all()


def test_zero_draft_rows_are_read_as_one_hot() -> None:
    """A deterministic proposer's rows (zeros) in a batch with a draft model's rows."""
    draft_ids, num_drafts, draft_probs, target_probs = _batch(2)
    mixed = draft_probs.clone()
    mixed[::2] = 0.0
    one_hot = torch.nn.functional.one_hot(draft_ids, draft_probs.shape[-1]).float()
    explicit = torch.where(torch.arange(16)[:, None, None] % 2 == 0, one_hot, draft_probs)
    seeds = list(range(16))
    got = verify_sampled(draft_ids, num_drafts, mixed, target_probs, *_streams(seeds))
    want = verify_sampled(draft_ids, num_drafts, explicit, target_probs, *_streams(seeds))
    assert torch.equal(got.output_ids, want.output_ids)


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token() -> None:
    """5e-324 is positive for Python but 0 in float32: nucleus sampling keeps the top token."""
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=5e-324))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]
