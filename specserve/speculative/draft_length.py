"""Choosing how many tokens to speculate, per sequence, from measured acceptance and cost.

A step that verifies ``k`` drafts costs ``verify(k + 1) + k * draft_cost`` seconds and emits
``1 + a_1 + a_1 a_2 + ... + a_1 ... a_k`` tokens in expectation, where ``a_i`` is the
probability that draft position ``i`` is accepted given that the ones before it were. The
tuner picks the ``k`` in ``0..max_k`` with the most expected tokens per second; ``k = 0`` is a
plain step, so speculation stops by itself when it does not pay.

- ``verify(T)`` comes from the engine's own timing of its forwards, one moving average per
  width T, interpolated between measured widths (`StepCosts`). Forward cost is not linear
  in T at small T (the native runtime on Qwen 1.5B: 28.4, 31.4, 38.5, 55.5, 89.8, 166.7 ms
  at T = 1, 2, 4, 8, 16, 32), so no formula stands in for a measurement once there is one.
- ``a_i`` comes from decayed counts of each method's verified drafts (`Acceptance`): each
  position's own record, shrunk toward the method's record over all positions, so a
  position never drafted yet is priced at the method's overall acceptance. A prediction
  that the output copies exactly earns ~0.999 within a few steps, and then a 64-token
  draft pays: 65 tokens for one ~11-step forward beats 33 for a ~6-step one.

Counts decay at every step that verifies the method's drafts, so a sequence that changes
character (copying, then free text) adapts. Every ``PROBE_INTERVAL`` steps spent at ``k = 0``
it probes again (for free drafters as many positions as a forward of at most
``PROBE_COST_STEPS`` steps verifies, up to ``PROBE_FREE_DRAFTS``; one token for drafters that
cost time per token), so a sequence that starts to repeat its input is noticed.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

# Weight of a new observation in the moving averages; counts decay by 1 - EMA_WEIGHT a step.
EMA_WEIGHT = 0.2
# Before any measurement acceptance is assumed fair, worth PRIOR_TRIALS verified drafts; a
# position's own counts weigh against POSITION_SHRINK drafts of the method's overall rate.
ACCEPTANCE_PRIOR = 0.6
PRIOR_TRIALS = 0.25
POSITION_SHRINK = 2.0
# Before a width is measured, verifying T tokens is priced (1 + MARGINAL_COST_PRIOR (T - 1))
# single steps, scaled from the nearest measured width. Deliberately optimistic (the native
# runtime measures 0.1-0.16 per token): an unmeasured width looks cheap, so it is tried
# once when acceptance asks for it, and from then on its own measurement decides.
MARGINAL_COST_PRIOR = 0.06
PROBE_INTERVAL = 16
# A probe of a free drafter (n-gram, prediction) proposes at most this many tokens: enough
# to see a copy start, cheap next to a 65-token forward (~11 steps on Qwen 1.5B)...
PROBE_FREE_DRAFTS = 8
# ...and only as many as a forward of at most this many single steps verifies (at least
# one): with a probe every PROBE_INTERVAL plain steps, probing text that is never copied
# costs at most ~3% of plain decoding, also where wide forwards are dear (on an AVX2 CPU
# a 9-token forward of the 1.5B costs ~3 steps, on AVX-512 ~2).
PROBE_COST_STEPS = 1.5


@dataclass
class StepCosts:
    """Seconds per target forward over T tokens, learned online (shared by a model's requests).

    ``rows``: sequences in the forward (the engine keeps one table per batch size); the prior
    then prices one more token per row like one more token of a single sequence.

    >>> costs = StepCosts({1: 0.030, 8: 0.058})
    >>> round(costs.estimate(4), 3)  # between measured widths: linear interpolation
    0.042
    >>> round(costs.estimate(16), 4)  # past them: the prior's shape, from the nearest one
    0.0776
    """

    seconds: dict[int, float] = field(default_factory=dict)
    rows: int = 1
    _widths: list[int] = field(default_factory=list, repr=False)  # measured T, ascending

    def __post_init__(self) -> None:
        self._widths = sorted(self.seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.seconds.get(tokens)
        if old is None:
            insort(self._widths, tokens)
        self.seconds[tokens] = seconds if old is None else old + EMA_WEIGHT * (seconds - old)

    def estimate(self, tokens: int) -> float:
        """Seconds (relative units before any measurement) for a forward over ``tokens``."""
        measured, widths = self.seconds, self._widths
        if tokens in measured:
            return measured[tokens]
        if not widths:
            return self._prior(tokens)  # only ratios matter
        i = bisect_left(widths, tokens)
        if 0 < i < len(widths):
            lo, hi = widths[i - 1], widths[i]
            return measured[lo] + (tokens - lo) * (measured[hi] - measured[lo]) / (hi - lo)
        nearest = widths[0] if i == 0 else widths[-1]
        return measured[nearest] * self._prior(tokens) / self._prior(nearest)

    def _prior(self, tokens: int) -> float:
        return 1.0 + MARGINAL_COST_PRIOR * (self.rows * tokens - 1)


@dataclass
class Acceptance:
    """One method's conditional acceptance per draft position, from decayed counts.

    ``trials[i]``: steps whose draft reached position ``i + 1`` with every draft before it
    accepted; ``hits[i]``: those that accepted it too. Both decay at every observation.

    >>> acc = Acceptance(4)
    >>> acc.observe(proposed=2, accepted=2)
    >>> [round(a, 3) for a in acc.rates()]  # positions 3-4: the method's overall rate
    [0.97, 0.97, 0.956, 0.956]
    """

    size: int
    hits: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = [0.0] * self.size
        self.trials = [0.0] * self.size

    def observe(self, proposed: int, accepted: int) -> None:
        """A verified step: ``accepted`` of its ``proposed`` drafts were kept."""
        keep = 1.0 - EMA_WEIGHT
        self.hits = [h * keep for h in self.hits]
        self.trials = [t * keep for t in self.trials]
        for i in range(min(proposed, accepted + 1, self.size)):
            self.trials[i] += 1.0
            self.hits[i] += 1.0 if i < accepted else 0.0

    def overall(self) -> float:
        """Acceptance over all positions together (the prior counts as PRIOR_TRIALS drafts)."""
        hits = sum(self.hits) + PRIOR_TRIALS * ACCEPTANCE_PRIOR
        return hits / (sum(self.trials) + PRIOR_TRIALS)

    def rates(self) -> list[float]:
        """``a_1 .. a_size``: each position's record, shrunk toward the overall rate."""
        pooled = self.overall() * POSITION_SHRINK
        return [
            (h + pooled) / (t + POSITION_SHRINK)
            for h, t in zip(self.hits, self.trials, strict=True)
        ]


@dataclass
class LengthTuner:
    """Per-sequence, per-method choice of the draft length."""

    max_k: int
    costs: StepCosts
    draft_cost: float = 0.0  # seconds per drafted token (0 for n-gram and predictions)
    acceptance: Acceptance = field(init=False)
    _plain_steps: int = 0

    def __post_init__(self) -> None:
        self.acceptance = Acceptance(self.max_k)

    def choose(self) -> int:
        """The k with the most expected tokens per second (see the module docstring): a
        step with no drafts before this proposer's, which keeps its 1 token for sure."""
        best = self.choose_after(0, tokens=1.0, survive=1.0, room=self.max_k)
        if best == 0:
            self._plain_steps += 1
            if self._plain_steps >= PROBE_INTERVAL:
                self._plain_steps = 0
                # Free drafts (n-gram, predictions) probe a few positions; a drafter that
                # pays per token probes the first one, which is where a change shows first.
                return self.free_probe() if self.draft_cost == 0 else 1
        return best

    def free_probe(self) -> int:
        """A free drafter's probe: up to PROBE_FREE_DRAFTS drafts, fewer where verifying them
        would cost more than PROBE_COST_STEPS single steps (but at least one)."""
        budget = PROBE_COST_STEPS * self.costs.estimate(1)
        k = min(self.max_k, PROBE_FREE_DRAFTS)
        while k > 1 and self.costs.estimate(k + 1) > budget:
            k -= 1
        return k

    def choose_after(self, drafts: int, tokens: float, survive: float, room: int) -> int:
        """Drafts to add after ``drafts`` drafts of other proposers, from which a step expects
        ``tokens`` tokens and which are all kept with probability ``survive``: the k in
        0..room with the most expected tokens per second for the whole step."""
        best, best_rate = 0, 0.0
        for k, more in enumerate(self._expected_by_k(min(room, self.max_k))):
            seconds = self.costs.estimate(drafts + k + 1) + k * self.draft_cost
            rate = (tokens + survive * (more - 1.0)) / seconds
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _expected_by_k(self, k_max: int) -> list[float]:
        """Expected tokens for k = 0..k_max, in one pass (this runs every decode step)."""
        tokens, survive, out = 1.0, 1.0, [1.0]
        for a in self.acceptance.rates()[:k_max]:
            survive *= a
            tokens += survive
            out.append(tokens)
        return out

    def observe(self, proposed: int, accepted: int) -> None:
        """Update the conditional acceptance of positions 1..accepted+1."""
        self.acceptance.observe(proposed, accepted)
