"""Acceptance statistics that come out of the algorithm (gpt-fast ``accept_counts`` style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MethodStats:
    """One proposer's record over a request."""

    steps: int = 0  # verification steps that carried this method's drafts
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    # accepted_per_position[i]: steps whose draft at position i was accepted.
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        grow = proposed - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: accepted drafts + the recovered/bonus one."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_per_position": [
                round(a / p, 4) if p else 0.0
                for a, p in zip(self.accepted_per_position, self.proposed_per_position, strict=True)
            ],
        }


FORCED = "grammar"  # the method name of the tokens a grammar forces


@dataclass
class SpecStats:
    """Per request: every target step, and the drafts of each proposer method."""

    target_steps: int = 0  # decode forwards of the target (plain or verification)
    generated: int = 0  # tokens emitted by those steps
    by_method: dict[str, MethodStats] = field(default_factory=dict)

    def record_step(self, method: str | None, proposed: int, accepted: int, emitted: int) -> None:
        self.target_steps += 1
        self.generated += emitted
        if method is not None and proposed > 0:
            self.by_method.setdefault(method, MethodStats()).record(proposed, accepted)

    def record_forced(self, forced: int, accepted: int) -> None:
        """Tokens the grammar forced (free drafts, method "grammar") in the last step."""
        if forced > 0:
            self.by_method.setdefault(FORCED, MethodStats()).record(forced, accepted)

    @property
    def forced_tokens(self) -> int:
        """Emitted tokens that were free: forced by the grammar, no forward spent guessing."""
        forced = self.by_method.get(FORCED)
        return forced.accepted if forced else 0

    @property
    def proposed(self) -> int:
        return sum(m.proposed for m in self.by_method.values())

    @property
    def accepted(self) -> int:
        return sum(m.accepted for m in self.by_method.values())

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target forward in the decode phase (1.0 for plain)."""
        return self.generated / self.target_steps if self.target_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_steps": self.target_steps,
            "generated": self.generated,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "forced_tokens": self.forced_tokens,
            "by_method": {name: m.as_dict() for name, m in self.by_method.items()},
        }
