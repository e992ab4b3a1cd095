"""Rank measured speculation candidates against plain decoding and pick one to deploy.

Speedups are ratios of summed rates (total tokens / total seconds), so long prompts weigh
by the tokens they generate rather than every prompt counting the same. The uncertainty
comes from a paired bootstrap over prompts: prompts differ far more from each other than
candidates do, and resampling a prompt together with plain's run of it cancels that
variation out. A candidate is only recommended when its whole 95% interval is above 1:
speculation costs memory and complexity, so "no speculation" is the honest default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specserve.tune.measure import Candidate, Measurement

DEFAULT_RESAMPLES = 2000


@dataclass
class Ranked:
    """One candidate's summary over all prompts, relative to plain decoding."""

    candidate: Candidate
    speedup: float  # decode rate / plain's decode rate (ratio of summed rates)
    ci_low: float  # 95% paired-bootstrap interval of `speedup`
    ci_high: float
    end_to_end_speedup: float  # the same with total_seconds (prefill and queueing included)
    mean_accepted_length: float  # tokens emitted per target step; 1.0 for plain
    acceptance_per_position: list[float]  # accepted / proposed at draft position 1, 2, ...
    latency_p50: float  # seconds, of total_seconds over measurements
    latency_p95: float
    identical: bool  # output equal to plain's on every prompt
    prompts: int


@dataclass
class Recommendation:
    """The setting to deploy, with a sentence saying why."""

    candidate: Candidate
    speculation: bool  # False: deploy with --no-speculation
    reason: str
    flags: str  # CLI flags that deploy `candidate`


@dataclass(frozen=True)
class _PerPrompt:
    """A candidate's measurements summed per prompt (repeats of a prompt add up)."""

    prompts: tuple[int, ...]
    tokens: np.ndarray
    decode_seconds: np.ndarray
    total_seconds: np.ndarray
    decode_tokens: np.ndarray  # after those that came out with the first


def _per_prompt(measurements: Sequence[Measurement]) -> _PerPrompt:
    sums: dict[int, list[float]] = {}
    for m in measurements:
        row = sums.setdefault(m.prompt_index, [0.0, 0.0, 0.0, 0.0])
        row[0] += m.tokens
        row[1] += m.decode_seconds
        row[2] += m.total_seconds
        row[3] += m.tokens - m.first_tokens
    prompts = tuple(sorted(sums))
    table = np.array([sums[p] for p in prompts], dtype=np.float64).reshape(-1, 4)
    return _PerPrompt(prompts, table[:, 0], table[:, 1], table[:, 2], table[:, 3])


def _ratio(
    tokens_c: np.ndarray, secs_c: np.ndarray, tokens_p: np.ndarray, secs_p: np.ndarray
) -> np.ndarray:
    """(Σ tokens_c / Σ secs_c) / (Σ tokens_p / Σ secs_p) along the last axis; NaN if 0/0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_c = tokens_c.sum(axis=-1) / secs_c.sum(axis=-1)
        rate_p = tokens_p.sum(axis=-1) / secs_p.sum(axis=-1)
        ratio = rate_c / rate_p
    return np.where(np.isfinite(ratio), ratio, np.nan)


def _acceptance(measurements: Sequence[Measurement]) -> list[float]:
    """Accepted / proposed per draft position, summed over prompts (NaN: never proposed)."""
    width = max((len(m.proposed_per_position) for m in measurements), default=0)
    proposed = np.zeros(width)
    accepted = np.zeros(width)
    for m in measurements:
        proposed[: len(m.proposed_per_position)] += m.proposed_per_position
        taken = m.accepted_per_position[:width]
        accepted[: len(taken)] += taken
    while width and proposed[width - 1] == 0:  # trailing positions never reached
        width -= 1
    return [
        float(a / p) if p else math.nan
        for a, p in zip(accepted[:width], proposed[:width], strict=True)
    ]


def _sort_key(r: Ranked, order: dict[str, int]) -> tuple[float, float, int, int]:
    # Fastest first; among equals the tighter lower bound, then plain (the simplest
    # setting wins a tie), then the caller's order. NaN speedups sink to the bottom.
    speed = -r.speedup if math.isfinite(r.speedup) else math.inf
    low = -r.ci_low if math.isfinite(r.ci_low) else math.inf
    return (speed, low, 0 if r.candidate.is_plain else 1, order[r.candidate.name])


def rank(
    candidates: Sequence[Candidate],
    measurements: Sequence[Measurement],
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
) -> list[Ranked]:
    """Summarise every candidate against plain decoding, fastest first.

    Raises ValueError when the comparison would be unsound: no plain candidate, a
    candidate without measurements, or a candidate measured on other prompts than plain.
    """
    by_name, plain_name = _by_candidate(candidates, measurements)
    plain = _per_prompt(by_name[plain_name])
    # One set of resampled prompt indices shared by all candidates: results do not depend
    # on the order candidates are listed in, and their intervals are directly comparable.
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(plain.prompts), size=(resamples, len(plain.prompts)))
    ranked = [_summarise(c, by_name[c.name], plain, draws) for c in candidates]
    order = {c.name: i for i, c in enumerate(candidates)}
    return sorted(ranked, key=lambda r: _sort_key(r, order))


def _by_candidate(
    candidates: Sequence[Candidate], measurements: Sequence[Measurement]
) -> tuple[dict[str, list[Measurement]], str]:
    """The measurements of each candidate, and the plain candidate's name; ValueError when
    names repeat, plain is not there exactly once, or a candidate has no measurements."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")
    plains = [c for c in candidates if c.is_plain]
    if len(plains) != 1:
        raise ValueError(
            "exactly one plain-decoding candidate (method None) is needed as the baseline; "
            f"got {len(plains)}"
        )
    by_name: dict[str, list[Measurement]] = {name: [] for name in names}
    for m in measurements:
        if m.candidate not in by_name:
            raise ValueError(f"measurement for unknown candidate {m.candidate!r}")
        by_name[m.candidate].append(m)
    for name, ms in by_name.items():
        if not ms:
            raise ValueError(f"candidate {name!r} has no measurements")
    return by_name, plains[0].name


def _summarise(
    c: Candidate, ms: Sequence[Measurement], plain: _PerPrompt, draws: np.ndarray
) -> Ranked:
    """One candidate's `Ranked` against ``plain``, its interval from the prompt ``draws``."""
    mine = _per_prompt(ms)
    if mine.prompts != plain.prompts:
        missing = sorted(set(plain.prompts) - set(mine.prompts))
        extra = sorted(set(mine.prompts) - set(plain.prompts))
        raise ValueError(
            f"candidate {c.name!r} was measured on other prompts than plain decoding "
            f"(missing {missing}, extra {extra}); speedups need the same prompts"
        )
    if c.is_plain:
        speedup = low = high = e2e = 1.0
    else:
        speedup, low, high, e2e = _speedups(mine, plain, draws)
    steps = sum(m.target_steps for m in ms)
    accepted = sum(m.accepted for m in ms)
    latencies = np.array([m.total_seconds for m in ms], dtype=np.float64)
    return Ranked(
        candidate=c,
        speedup=speedup,
        ci_low=low,
        ci_high=high,
        end_to_end_speedup=e2e,
        mean_accepted_length=(accepted + steps) / steps if steps else math.nan,
        acceptance_per_position=_acceptance(ms),
        latency_p50=float(np.percentile(latencies, 50)),
        latency_p95=float(np.percentile(latencies, 95)),
        identical=c.is_plain or all(m.identical_to_plain for m in ms),
        prompts=len(mine.prompts),
    )


def _speedups(
    mine: _PerPrompt, plain: _PerPrompt, draws: np.ndarray
) -> tuple[float, float, float, float]:
    """(decode speedup, its 95% interval's low and high end, end-to-end speedup); the
    interval is NaN when no resample gives a finite ratio."""
    mine_decode, plain_decode = mine.decode_tokens, plain.decode_tokens
    speedup = float(_ratio(mine_decode, mine.decode_seconds, plain_decode, plain.decode_seconds))
    e2e = float(_ratio(mine.tokens, mine.total_seconds, plain.tokens, plain.total_seconds))
    boot = _ratio(
        mine_decode[draws], mine.decode_seconds[draws],
        plain_decode[draws], plain.decode_seconds[draws],
    )  # fmt: skip
    if np.isnan(boot).all():
        return speedup, math.nan, math.nan, e2e
    low, high = (float(x) for x in np.nanpercentile(boot, [2.5, 97.5]))
    return speedup, low, high, e2e


def _describe(r: Ranked) -> str:
    return f"{r.speedup:.2f}x, 95% CI {r.ci_low:.2f}-{r.ci_high:.2f}x"


def recommend(ranked: Sequence[Ranked], min_speedup: float = 1.02) -> Recommendation:
    """The fastest candidate that is reliably faster than plain and changes no output.

    "Reliably" means the 95% interval lies above 1 and the speedup reaches `min_speedup`
    (a 1% gain is not worth a drafter's memory). Otherwise plain decoding is recommended,
    and the reason says so plainly. A candidate whose output differed from plain's is a
    bug in speculative decoding, never a recommendation, and is named as such.
    """
    plains = [r for r in ranked if r.candidate.is_plain]
    if not plains:
        raise ValueError("the ranking has no plain-decoding candidate (method None)")
    plain = plains[0]
    order = {r.candidate.name: i for i, r in enumerate(ranked)}
    others = sorted(
        (r for r in ranked if not r.candidate.is_plain), key=lambda r: _sort_key(r, order)
    )

    def reliable(r: Ranked) -> bool:
        return r.ci_low > 1.0 and r.speedup >= min_speedup  # False for NaN

    bug = ""
    differing = [r for r in others if not r.identical]
    if differing:
        names = ", ".join(r.candidate.name for r in differing)
        bug = (
            f" Output differed from plain decoding with {names}: that is a bug in "
            "speculative decoding (greedy output must not change), so "
            f"{'it was' if len(differing) == 1 else 'they were'} not considered."
        )
        fastest = next((r for r in others if reliable(r)), None)
        if fastest is not None and not fastest.identical:
            bug += (
                f" {fastest.candidate.name} would otherwise have been best ({_describe(fastest)})."
            )
    winner = next((r for r in others if r.identical and reliable(r)), None)
    if winner is not None:
        c = winner.candidate
        default = " (the model's default drafter)" if c.is_default else ""
        reason = (
            f"{c.name}{default} is {winner.speedup:.2f}x faster than plain decoding "
            f"(95% CI {winner.ci_low:.2f}-{winner.ci_high:.2f}x) with identical output"
        )
        return Recommendation(c, True, reason + "." + bug, c.cli_flags())

    fair = [r for r in others if r.identical and math.isfinite(r.speedup)]
    if not others:
        why = "only plain decoding was measured"
    elif not fair:
        why = "no speculation candidate gave a usable measurement with output identical to plain"
    else:
        best = fair[0]
        detail = (
            "within noise" if not best.ci_low > 1.0 else f"below the {min_speedup:.2f}x minimum"
        )
        why = (
            "no candidate was reliably faster than plain decoding "
            f"(best: {best.candidate.name}, {_describe(best)}, {detail})"
        )
    reason = f"No speculation: {why}; deploy with --no-speculation."
    return Recommendation(plain.candidate, False, reason + bug, plain.candidate.cli_flags())
