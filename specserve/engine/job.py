"""A request in the engine (`Job`), what one engine iteration did (`StepRecord`), the
engine's counters, and the errors a submission can meet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specserve.engine.result import GenerationResult
from specserve.engine.sequence import Sequence
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.sampling import SamplingParams


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound: the request is refused, not dropped later."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down."""


TextSink = Callable[[str], None]
DoneSink = Callable[[GenerationResult | None, BaseException | None], None]


@dataclass(eq=False)
class Job:
    """A submitted request and its place in the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    speculation: SpeculationConfig
    prediction_ids: list[int] | None
    on_text: TextSink
    on_done: DoneSink
    id: int = 0
    seq: Sequence | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    cancelled: bool = False
    record_features: bool = False  # the result carries the target's features (training data)
    started: bool = False  # the first token was picked
    last_piece: str = ""  # a finished sequence's last text, held to go out with its answer
    submitted_at: float = field(default_factory=time.perf_counter)
    # Choices of one prompt (n > 1): a follower copies its leader's prompt KV, last prompt
    # logits and features instead of prefilling; the leader keeps them until it is done.
    leader: Job | None = None
    prompt_logits: torch.Tensor | None = None  # [V] of the last prompt position
    prompt_features: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # With a prefix cache: the target's features of each decode step's kept positions
    output_features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StepRecord:
    """What one engine iteration did (for metrics)."""

    kind: str  # "prefill" or "decode"
    batch_size: int
    tokens: int  # positions forwarded (padding included, unless packed)
    seconds: float
    packed: bool = False  # rows of their own lengths, no padding computed


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    finished: int = 0
    cancelled: int = 0
    step_listeners: list[Callable[[StepRecord], None]] = field(default_factory=list)
