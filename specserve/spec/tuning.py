"""Choosing how many tokens to speculate, per sequence, from measured acceptance and cost.

A step that verifies ``k`` drafts costs ``verify(k + 1) + k * draft_cost`` seconds and emits
``1 + a_1 + a_1 a_2 + ... + a_1 ... a_k`` tokens in expectation, where ``a_i`` is the
probability that draft position ``i`` is accepted given that the ones before it were. The
tuner picks the ``k`` in ``0..max_k`` with the most expected tokens per second; ``k = 0`` is a
plain step, so speculation stops by itself when it does not pay. Estimates are exponential
moving averages, so a sequence that changes character (copying, then free text) adapts.
Every ``PROBE_INTERVAL`` steps spent at ``k = 0`` it probes again (the longest ``k`` for free
drafters, one token for drafters that cost time per token), so a sequence that starts to
repeat its input is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Weight of a new observation in the moving averages.
EMA_WEIGHT = 0.2
# Before any measurement: acceptance is assumed fair, and verifying T tokens is assumed to
# cost (1 + MARGINAL_COST_PRIOR * (T - 1)) single steps (int4 CPU kernel, measured ~6%/token).
ACCEPTANCE_PRIOR = 0.6
MARGINAL_COST_PRIOR = 0.06
PROBE_INTERVAL = 16


@dataclass
class StepCosts:
    """Seconds per target forward over T tokens, learned online (shared by a model's requests).

    ``rows``: sequences in the forward (the engine keeps one table per batch size); the prior
    then prices one more token per row like one more token of a single sequence.
    """

    seconds: dict[int, float] = field(default_factory=dict)
    rows: int = 1

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if old is None else old + EMA_WEIGHT * (seconds - old)

    def estimate(self, tokens: int) -> float:
        if tokens in self.seconds:
            return self.seconds[tokens]
        if not self.seconds:
            return self._prior(tokens)  # relative units; only ratios matter
        # Scale the nearest measurement by the prior's marginal cost.
        nearest = min(self.seconds, key=lambda t: abs(t - tokens))
        return self.seconds[nearest] * self._prior(tokens) / self._prior(nearest)

    def _prior(self, tokens: int) -> float:
        return 1.0 + MARGINAL_COST_PRIOR * (self.rows * tokens - 1)


@dataclass
class LengthTuner:
    """Per-sequence, per-method choice of the draft length."""

    max_k: int
    costs: StepCosts
    draft_cost: float = 0.0  # seconds per drafted token (0 for n-gram and predictions)
    acceptance: list[float] = field(default_factory=list)
    _plain_steps: int = 0

    def __post_init__(self) -> None:
        self.acceptance = [ACCEPTANCE_PRIOR] * self.max_k

    def choose(self) -> int:
        """The k with the most expected tokens per second (see the module docstring)."""
        # One pass over k (this runs every decode step): expected tokens accumulate.
        best, best_rate, tokens, survive = 0, 0.0, 1.0, 1.0
        for k in range(self.max_k + 1):
            if k:
                survive *= self.acceptance[k - 1]
                tokens += survive
            rate = tokens / (self.costs.estimate(k + 1) + k * self.draft_cost)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self._plain_steps += 1
            if self._plain_steps >= PROBE_INTERVAL:
                self._plain_steps = 0
                # Free drafts (n-gram, predictions) probe every position; a drafter that
                # pays per token probes the first one, which is where a change shows first.
                return self.max_k if self.draft_cost == 0 else 1
        return best

    def expected_tokens(self, k: int) -> float:
        """Tokens a step with ``k`` drafts emits in expectation: 1 + a1 + a1 a2 + ..."""
        tokens, survive = 1.0, 1.0
        for a in self.acceptance[: min(k, self.max_k)]:
            survive *= a
            tokens += survive
        return tokens

    def observe(self, proposed: int, accepted: int) -> None:
        """Update the conditional acceptance of positions 1..accepted+1."""
        for i in range(min(proposed, accepted + 1)):
            hit = 1.0 if i < accepted else 0.0
            self.acceptance[i] += EMA_WEIGHT * (hit - self.acceptance[i])
