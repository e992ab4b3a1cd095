"""``n`` > 1: each choice's seed, and the choices' results summed up as one request's.

Choice 0 of a seeded request uses the request's seed as it is, so ``n=1`` and choice 0 of
``n=3`` with the same seed give the same text. Choice i > 0 gets a seed numpy's
``SeedSequence`` derives from (seed, i), the documented way to make independent streams from
one seed (``seed + i`` would not be: it is choice 0 of the request seeded ``seed + i``)::

    >>> choice_seed(7, 0), choice_seed(7, 1) == choice_seed(7, 1), choice_seed(None, 2)
    (7, True, None)
"""

from __future__ import annotations

from collections.abc import Sequence

from specserve.engine.result import GenerationResult
from specserve.speculative.sampling import derived_seed
from specserve.speculative.stats import MethodStats, SpecStats

# SeedSequence spawn key of choices; the request's per-purpose streams use 0..2
# (`sampling.stream_seed`), so the two derivations never name the same child.
CHOICE_SPAWN_KEY = 1000
_SEED_BOUND = 2**63  # SamplingParams' seeds are in [0, 2**63)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request seeded ``seed`` (None: fresh entropy)."""
    if seed is None or index == 0:
        return seed
    return derived_seed(seed, CHOICE_SPAWN_KEY, index) % _SEED_BOUND


def merge_stats(parts: Sequence[SpecStats]) -> SpecStats:
    """The choices' speculation statistics summed (steps, drafts, per-position counts)."""
    merged = SpecStats()
    for stats in parts:
        merged.target_steps += stats.target_steps
        merged.generated += stats.generated
        for name, method in stats.by_method.items():
            into = merged.by_method.setdefault(name, MethodStats())
            into.steps += method.steps
            into.proposed += method.proposed
            into.accepted += method.accepted
            into.proposed_per_position = _add(
                into.proposed_per_position, method.proposed_per_position
            )
            into.accepted_per_position = _add(
                into.accepted_per_position, method.accepted_per_position
            )
    return merged


def _add(a: list[int], b: list[int]) -> list[int]:
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


def merge_results(results: Sequence[GenerationResult]) -> GenerationResult:
    """One request's totals over its choices: the prompt once, the completions' tokens and
    statistics summed, the first token's time the earliest and the decode time the longest.
    ``text``, ``finish_reason`` and the prediction counts are the first choice's (a request
    with a prediction has one choice)."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    return GenerationResult(
        text=first.text,
        token_ids=[t for r in results for t in r.token_ids],
        prompt_tokens=first.prompt_tokens,
        cached_prompt_tokens=first.cached_prompt_tokens,
        first_tokens=sum(r.first_tokens for r in results),
        finish_reason=first.finish_reason,
        time_to_first_token=min(r.time_to_first_token for r in results),
        decode_seconds=max(r.decode_seconds for r in results),
        stats=merge_stats([r.stats for r in results]),
        prediction=first.prediction,
    )
