"""What a finished request returns: its text, tokens, timings and speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.speculative.proposers.prediction import PredictionStats
from specserve.speculative.sampling import TokenLogprob
from specserve.speculative.stats import SpecStats


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    time_to_first_token: float  # seconds from submission (queueing and prefill included)
    decode_seconds: float  # from the first token to the last
    stats: SpecStats = field(default_factory=SpecStats)
    prediction: PredictionStats | None = None
    # target features of positions 0..len(prompt + output) - 2, when the request recorded them
    features: torch.Tensor | None = None
    # one per token of token_ids, when the request asked for logprobs
    logprobs: list[TokenLogprob] | None = None
    cached_prompt_tokens: int = 0  # prompt positions reused from the prefix cache
    # tokens out with the first (from the prefill: 1, or more when it verified drafts)
    first_tokens: int = 1

    @property
    def decode_tokens(self) -> int:
        """Tokens the decode steps emitted (after the prefill's)."""
        return len(self.token_ids) - self.first_tokens

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.decode_tokens
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0
