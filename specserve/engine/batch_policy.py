"""How much a batch speculates: its drafts per row, and a guard on realized throughput.

On the native runtime a batch's forward is packed: each row carries only its own tokens, a
step costs what its total token count costs, and `choose_drafts` keeps, over all rows, the
drafts most likely to be accepted, as many as pay. Elsewhere every row pays for the longest
row (padding), so the engine picks one width per step (`choose_width`) from the rows'
acceptance estimates and the measured cost of that batch size and width.
Estimates drift (contexts grow, a measured width goes stale), so a guard also compares the
throughput actually realized — tokens emitted per second of forward — by speculative and
plain steps of each batch size, and runs plain steps while they are faster, probing the
other option now and then. Speculation can then cost a batch at most its probes.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.engine.sequence import Sequence
    from specserve.speculative.draft_length import StepCosts

RATE_EMA_WEIGHT = 0.1
PROBE_INTERVAL = 16  # steps between tries of the option the guard currently rejects


def choose_width(seqs: Seq[Sequence], costs: StepCosts) -> int:
    """The width (tokens per row) with the most expected tokens per second over the batch.

    A lone sequence keeps its own choice, and so do fixed-length (``adaptive=False``) rows.
    """
    longest = max(seq.drafts for seq in seqs) + 1
    if len(seqs) == 1:
        return longest
    fixed = [seq.drafts + 1 for seq in seqs if not seq.source.adaptive]
    if fixed:
        return max(fixed)
    best, best_rate = 1, 0.0
    for width in range(1, longest + 1):
        tokens = sum(seq.expected_tokens(width - 1) for seq in seqs)
        rate = tokens / costs.estimate(width)
        if rate > best_rate:
            best, best_rate = width, rate
    return best


def choose_drafts(seqs: Seq[Sequence], costs: StepCosts) -> list[int]:
    """Drafts each row keeps in a packed forward: the most expected tokens per second.

    ``costs`` prices a forward by its total tokens. For each total, the best choice keeps
    the drafts with the largest gains (a row's gains never grow along it, so that is a
    prefix of every row); the totals are then compared by rate. A lone sequence and
    fixed-length (``adaptive=False``) rows keep all their drafts.
    """
    tuned = [len(seqs) > 1 and seq.source.adaptive for seq in seqs]
    keep = [0 if tuned[row] else seq.drafts for row, seq in enumerate(seqs)]
    row_gains = [seq.draft_gains() for seq in seqs]
    gains = [(gain, row) for row, g in enumerate(row_gains) if tuned[row] for gain in g]
    gains.sort(key=lambda g: -g[0])  # stable: a row's own drafts stay in order
    tokens = len(seqs) + sum(sum(g[:k]) for g, k in zip(row_gains, keep, strict=True))
    total = len(seqs) + sum(keep)
    best_rate, chosen = tokens / costs.estimate(total), 0
    for i, (gain, _) in enumerate(gains):
        tokens, total = tokens + gain, total + 1
        rate = tokens / costs.estimate(total)
        if rate > best_rate:
            best_rate, chosen = rate, i + 1
    for _, row in gains[:chosen]:
        keep[row] += 1
    return keep


def batch_feeds(
    seqs: Seq[Sequence], costs: StepCosts, speculate: bool, packed: bool
) -> list[list[int]]:
    """Each row's tokens for a step: its last token and the drafts it keeps. ``costs``: by
    total tokens for a packed batch, by width for a padded one of this size."""
    if not speculate:
        return [seq.truncate(0) for seq in seqs]
    if packed:  # each row carries only its own tokens: drafts chosen row by row
        keep = choose_drafts(seqs, costs)
        return [seq.truncate(k) for seq, k in zip(seqs, keep, strict=True)]
    width = choose_width(seqs, costs)
    return [seq.truncate(width - 1) for seq in seqs]


@dataclass
class SpeculationGuard:
    """For one batch size: realized tokens/s of speculative vs plain steps (moving averages)."""

    speculative_rate: float | None = None
    plain_rate: float | None = None
    _steps: int = 0

    def allows_speculation(self) -> bool:
        """Speculate this step? While it realizes at least plain's rate (or is unmeasured)."""
        self._steps += 1
        if self.speculative_rate is None or self.plain_rate is None:
            return self.speculative_rate is None  # measure speculation first, then plain once
        preferred = self.speculative_rate >= self.plain_rate
        if self._steps % PROBE_INTERVAL == 0:
            return not preferred  # keep the other estimate fresh
        return preferred

    def observe(self, speculative: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        old = self.speculative_rate if speculative else self.plain_rate
        new = rate if old is None else old + RATE_EMA_WEIGHT * (rate - old)
        if speculative:
            self.speculative_rate = new
        else:
            self.plain_rate = new
