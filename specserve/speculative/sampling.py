"""Sampling parameters and the one function that turns logits into the target distribution.

Plain sampling and the speculative verifier both call ``target_probs``, so temperature,
top-k, top-p and min-p shape the distribution identically on both paths — the condition for
speculative sampling to reproduce plain sampling's output distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from specserve.speculative.grammar import TokenGrammar

MAX_TOP_K = 1_000_000
MAX_TOKENS_LIMIT = 1_000_000
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_PENALTY = 2.0  # presence / frequency penalties in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # logit_bias values in [-100, 100]

# A request's random streams, one per purpose. Rejection sampling is lossless only if the
# draft token and the acceptance uniform are independent; one generator per purpose makes
# that hold by construction, not by the offsets at which one shared stream is consumed.
DRAFT_STREAM = "draft"  # a sampled drafter's draft tokens
ACCEPT_STREAM = "accept"  # the verifier's acceptance uniforms
SAMPLE_STREAM = "sample"  # plain, recovered and bonus tokens
STREAMS = (SAMPLE_STREAM, ACCEPT_STREAM, DRAFT_STREAM)


def derived_seed(seed: int, *key: int) -> int:
    """A 64-bit seed derived from ``seed`` and a spawn ``key``: numpy's ``SeedSequence``
    hashes (seed, key) into well-mixed, independent child states — the documented way to
    derive parallel streams from one seed."""
    child = np.random.SeedSequence(seed, spawn_key=key)
    return int(child.generate_state(1, np.uint64)[0])


def stream_seed(seed: int, purpose: str) -> int:
    """The seed of one purpose's stream of a seeded request (a 64-bit integer).

    >>> stream_seed(7, DRAFT_STREAM) != stream_seed(7, ACCEPT_STREAM)
    True
    """
    return derived_seed(seed, STREAMS.index(purpose))


class InvalidRequestError(ValueError):
    """A request that must be refused before any compute (bad values, over-long prompt)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` means greedy (argmax).

    >>> SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64).greedy
    False
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # Rules on the logits, applied before the above at every position (token_rules.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: TokenGrammar | None = None  # structured output / forced tool calls
    logprobs: int | None = None  # None: off; else report the chosen token and this many top

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.temperature <= 100.0:
            problems.append(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            problems.append(f"top_k must be in [0, {MAX_TOP_K}] (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            problems.append(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS for _, bias in self.logit_bias):
            problems.append("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if problems:
            raise InvalidRequestError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        """This request's random stream for ``purpose`` (one of ``STREAMS``): seeded output
        does not depend on other requests, and the purposes never share random numbers.
        Unseeded streams start from fresh entropy each."""
        if purpose not in STREAMS:
            raise ValueError(f"unknown random stream {purpose!r}; one of {STREAMS}")
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(stream_seed(self.seed, purpose))
        return gen


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits ``[N, V]`` -> the sampling distribution ``[N, V]`` (float32, rows sum to 1).

    Order as in Hugging Face and vLLM: temperature, then top-k, top-p (nucleus) and min-p
    filters on the tempered distribution. Greedy params give a one-hot at the argmax.
    """
    assert logits.ndim == 2, "logits must be [N, V]"
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[:, 0] = False  # even a top_p that rounds to 0 in float32 keeps one token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        floor = params.min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``probs`` ``[N, V]`` -> ``[N]``."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i of ``logits`` ``[N, V]`` (rule-shaped, before temperature: the model's own
    distribution, as OpenAI reports it) scored ``tokens[i]``."""
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [
            tuple((i, v) for i, v in zip(row_ids, row_values, strict=True) if v > -math.inf)
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]  # tokens a rule forbids (logprob -inf) are no alternatives
    return [TokenLogprob(t, c, tp) for t, c, tp in zip(tokens, chosen, tops, strict=True)]
