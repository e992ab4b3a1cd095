"""How a packed batch picks each row's drafts: checked against trying every choice."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, cast

from specserve.engine.batch_policy import choose_drafts
from specserve.speculative.draft_length import StepCosts

COSTS = {1: 1.0, 2: 1.05, 4: 1.2, 8: 1.9, 16: 3.6, 32: 7.0}  # seconds by total tokens


@dataclass
class FakeSource:
    adaptive: bool = True


@dataclass
class FakeRow:
    """What `choose_drafts` reads of a sequence: its drafts and what each one adds."""

    gains: list[float]
    source: FakeSource = field(default_factory=FakeSource)

    @property
    def drafts(self) -> int:
        return len(self.gains)

    def draft_gains(self) -> list[float]:
        return self.gains


def _gains(rng: random.Random, drafts: int) -> list[float]:
    survive, out = 1.0, []
    for _ in range(drafts):
        survive *= rng.choice([0.3, 0.6, 0.9, 0.97, 1.0])
        out.append(survive)
    return out


def _rate(rows: list[FakeRow], keep: list[int], costs: StepCosts) -> float:
    tokens = sum(1 + sum(row.gains[:k]) for row, k in zip(rows, keep, strict=True))
    return tokens / costs.estimate(len(rows) + sum(keep))


def test_packed_choice_is_the_best_of_every_choice() -> None:
    """For each total of kept drafts the largest gains are the best; so the greedy cut
    matches trying every combination of per-row prefixes (random rows, 200 cases)."""
    rng = random.Random(11)
    costs = StepCosts(dict(COSTS))
    for _ in range(200):
        rows = [FakeRow(_gains(rng, rng.randint(0, 5))) for _ in range(rng.randint(2, 4))]
        chosen = choose_drafts(cast(Any, rows), costs)
        assert all(0 <= k <= row.drafts for k, row in zip(chosen, rows, strict=True))
        every = itertools.product(*(range(row.drafts + 1) for row in rows))
        best = max(_rate(rows, list(keep), costs) for keep in every)
        assert abs(_rate(rows, chosen, costs) - best) < 1e-12, (chosen, [r.gains for r in rows])


def test_sure_drafts_are_kept_and_unlikely_ones_dropped() -> None:
    costs = StepCosts(dict(COSTS))
    copying = FakeRow([1.0] * 12)  # a prediction the output follows
    guessing = FakeRow([0.3, 0.09, 0.027])
    assert choose_drafts(cast(Any, [copying, guessing]), costs) == [12, 0]


def test_a_lone_row_and_fixed_rows_keep_their_drafts() -> None:
    costs = StepCosts(dict(COSTS))
    unlikely = [0.01, 0.0001]
    assert choose_drafts(cast(Any, [FakeRow(unlikely)]), costs) == [2]
    fixed = FakeRow(unlikely, FakeSource(adaptive=False))
    assert choose_drafts(cast(Any, [fixed, FakeRow(unlikely)]), costs) == [2, 0]
