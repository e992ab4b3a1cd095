"""Measuring candidates on the user's prompts: greedy, interleaved, in one process.

For every prompt, plain decoding and each candidate run back to back, in an order that
rotates from prompt to prompt, so machine noise (another process, thermal drift) hits all
candidates alike. Each candidate keeps its own step-cost table across prompts, as a
deployment's engine does. Throughput under concurrency runs the continuous-batching engine
with all prompts submitted at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from specserve.deployments.rules import EffectiveDrafter
from specserve.engine.generate import generate
from specserve.engine.result import GenerationResult
from specserve.engine.sampling import SamplingParams
from specserve.engine.scheduler import Engine
from specserve.engine.speculation import SpeculationConfig, speculation_for_drafter
from specserve.model.loader import Model
from specserve.spec.stats import MethodStats
from specserve.spec.tuning import StepCosts
from specserve.tune.measure import Candidate, Measurement, ThroughputPoint


class PromptFileError(ValueError):
    """A malformed prompts file; the message names the line."""


@dataclass(frozen=True)
class TunePrompt:
    """One request as the API takes it: chat messages or a completion prompt."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    prediction: str | None = None
    prompt_token_ids: list[int] | None = None  # a completions request sent as token ids

    def token_ids(self, model: Model) -> list[int]:
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        if self.messages is not None:
            return model.tokenizer.encode_chat(self.messages)
        return model.tokenizer.encode(self.prompt or "")

    def as_row(self) -> dict[str, Any]:
        """The JSONL row ``parse_prompt`` reads back as this prompt."""
        row: dict[str, Any] = {}
        if self.messages is not None:
            row["messages"] = self.messages
        elif self.prompt_token_ids is not None:
            row["prompt_token_ids"] = self.prompt_token_ids
        else:
            row["prompt"] = self.prompt
        if self.prediction is not None:
            row["prediction"] = self.prediction
        return row


def _text(content: Any, where: str) -> str:
    """A string, or OpenAI text parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise PromptFileError(f"{where}: content must be a string or a list of text parts")


def parse_prompt(row: Any, where: str) -> TunePrompt:
    """One JSONL row -> a prompt; ``where`` (file:line) prefixes every error."""
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object")
    prediction = row.get("prediction")
    if isinstance(prediction, dict):
        prediction = _text(prediction.get("content"), f"{where} (prediction)")
    elif prediction is not None and not isinstance(prediction, str):
        raise PromptFileError(f"{where}: 'prediction' must be a string or a content object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        parsed = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PromptFileError(f"{where}: each message needs a 'role' and 'content'")
            parsed.append({"role": m["role"], "content": _text(m.get("content", ""), where)})
        return TunePrompt(parsed, None, prediction)
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return TunePrompt(None, row["prompt"], prediction)
    ids = row.get("prompt_token_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
        return TunePrompt(None, None, prediction, ids)
    raise PromptFileError(f"{where}: needs 'messages' (chat) or a non-empty 'prompt' string")


def load_prompts(path: Path, limit: int | None = None) -> list[TunePrompt]:
    """JSONL rows ``{"messages": [...]}`` or ``{"prompt": "..."}``, optionally with a
    ``prediction`` (a string or OpenAI's ``{"type": "content", "content": ...}``). The
    server's traffic log (``serve --record-traffic``) has this shape; other keys are ignored."""
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{where}: not valid JSON ({exc.msg})") from None
            prompts.append(parse_prompt(row, where))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts


def speculation_of(
    candidate: Candidate, target: Model, load: Callable[[str], Model]
) -> SpeculationConfig:
    """What a deployment with the candidate's flags would run (a drafter directory is an
    EAGLE head, combined with n-gram proposals)."""
    return speculation_for_drafter(
        EffectiveDrafter(
            candidate.method,
            candidate.draft_token_count,
            ngram_length=candidate.ngram_length,
            draft_model=candidate.draft_model,
        ),
        target,
        load,
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
    )


def measure(
    model: Model,
    prompts: Sequence[TunePrompt],
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
                spec=specs[candidate.name],
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
    prompts: Sequence[TunePrompt],
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
            spec = speculation_of(candidate, model, load)
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
                    spec=spec,
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
