"""Measuring candidates on the user's prompts: greedy, interleaved, in one process.

For every prompt, plain decoding and each candidate run back to back, in an order that
rotates from prompt to prompt, so machine noise (another process, thermal drift) hits all
candidates alike. Each candidate keeps its own step-cost table across prompts, as a
deployment's engine does. Throughput under concurrency runs the continuous-batching engine
with all prompts submitted at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from specserve.engine.generate import generate
from specserve.engine.prompt_file import PromptRecord
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model
from specserve.speculative.config import SpeculationConfig, speculation_for_drafter
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.sampling import SamplingParams
from specserve.speculative.stats import MethodStats
from specserve.tune.measure import Candidate, Measurement, ThroughputPoint


def speculation_of(
    candidate: Candidate, target: Model, load: Callable[[str], Model]
) -> SpeculationConfig:
    """What a deployment with the candidate's flags would run (a drafter directory is an
    EAGLE head, combined with n-gram proposals)."""
    return speculation_for_drafter(
        candidate.method,
        candidate.draft_token_count,
        target,
        load,
        draft_model=candidate.draft_model,
        ngram_length=candidate.ngram_length,
    )


def _record(name: str, index: int, result: GenerationResult, identical: bool) -> Measurement:
    positions = MethodStats()  # all proposers of the run, merged position by position
    for stats in result.stats.by_method.values():
        for i, (p, a) in enumerate(
            zip(stats.proposed_per_position, stats.accepted_per_position, strict=True)
        ):
            if i >= len(positions.proposed_per_position):
                positions.proposed_per_position.append(0)
                positions.accepted_per_position.append(0)
            positions.proposed_per_position[i] += p
            positions.accepted_per_position[i] += a
    return Measurement(
        candidate=name,
        prompt_index=index,
        tokens=len(result.token_ids),
        decode_seconds=result.decode_seconds,
        total_seconds=result.time_to_first_token + result.decode_seconds,
        target_steps=result.stats.target_steps,
        proposed=result.stats.proposed,
        accepted=result.stats.accepted,
        proposed_per_position=positions.proposed_per_position,
        accepted_per_position=positions.accepted_per_position,
        identical_to_plain=identical,
        first_tokens=result.first_tokens,
    )


def measure(
    model: Model,
    prompts: Sequence[PromptRecord],
    candidates: Sequence[Candidate],
    max_tokens: int,
    load: Callable[[str], Model],
    progress: bool = True,
) -> list[Measurement]:
    """Run every candidate on every prompt (greedy); plain must be among the candidates."""
    plain = [c for c in candidates if c.method is None]
    if not plain:
        raise ValueError("the candidates must include plain decoding (the baseline)")
    specs = {c.name: speculation_of(c, model, load) for c in candidates}
    costs = {c.name: StepCosts() for c in candidates}
    params = SamplingParams(max_tokens=max_tokens)
    measurements = []
    bar = tqdm(
        total=len(prompts) * len(candidates), desc="measuring", unit="run", disable=not progress
    )
    for index, prompt in enumerate(prompts):
        ids = prompt.token_ids(model)
        prediction = None
        if prompt.prediction:
            prediction = model.tokenizer.encode(prompt.prediction, add_special_tokens=False)
        shift = index % len(candidates)
        order = [*candidates[shift:], *candidates[:shift]]  # rotate: no fixed position
        results: dict[str, GenerationResult] = {}
        for candidate in order:
            bar.set_postfix_str(candidate.name)
            results[candidate.name] = generate(
                model,
                ids,
                params,
                speculation=specs[candidate.name],
                prediction_ids=_prediction_for(candidate, prediction),
                costs=costs[candidate.name],
            )
            bar.update()
        reference = results[plain[0].name].token_ids
        for candidate in candidates:
            result = results[candidate.name]
            measurements.append(
                _record(candidate.name, index, result, result.token_ids == reference)
            )
    bar.close()
    return measurements


def _prediction_for(candidate: Candidate, prediction: list[int] | None) -> list[int] | None:
    """The prediction is proposed by speculative candidates only: the plain baseline must not
    speculate, or its rows would compare speculative with speculative."""
    return None if candidate.method is None else prediction


def measure_throughput(
    model: Model,
    prompts: Sequence[PromptRecord],
    candidates: Sequence[Candidate],
    levels: Sequence[int],
    max_tokens: int,
    load: Callable[[str], Model],
    progress: bool = True,
) -> list[ThroughputPoint]:
    """Generated tokens per second with ``level`` sequences batched by the engine."""
    params = SamplingParams(max_tokens=max_tokens)
    encoded = [p.token_ids(model) for p in prompts]
    predictions = [
        model.tokenizer.encode(p.prediction, add_special_tokens=False) if p.prediction else None
        for p in prompts
    ]
    points = []
    bar = tqdm(
        total=len(levels) * len(candidates), desc="throughput", unit="run", disable=not progress
    )
    for level in levels:
        for candidate in candidates:
            speculation = speculation_of(candidate, model, load)
            engine = Engine(model, max_batch=level, max_queue=len(prompts), start=False)
            results: list[GenerationResult] = []
            errors: list[BaseException] = []

            def done(
                result: GenerationResult | None,
                error: BaseException | None,
                results: list[GenerationResult] = results,
                errors: list[BaseException] = errors,
            ) -> None:
                if result is not None:
                    results.append(result)
                errors.extend([error] if error else [])

            began = time.perf_counter()
            for ids, prediction in zip(encoded, predictions, strict=True):
                engine.submit(
                    ids,
                    params,
                    lambda piece: None,
                    done,
                    speculation=speculation,
                    prediction_ids=_prediction_for(candidate, prediction),
                )
            while len(results) + len(errors) < len(prompts):
                engine.step()  # this thread runs the engine: no second OpenMP team
            seconds = time.perf_counter() - began
            engine.stop()
            engine.step()  # lets the stopped engine finish its bookkeeping
            if errors:
                raise RuntimeError(f"{candidate.name}: a request failed: {errors[0]}")
            tokens = sum(len(r.token_ids) for r in results)
            points.append(ThroughputPoint(candidate.name, level, tokens / seconds))
            bar.update()
    bar.close()
    return points
