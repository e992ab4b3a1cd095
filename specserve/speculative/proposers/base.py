"""The one interface every proposer implements, and the registry keyed by method name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch


@dataclass(frozen=True, slots=True)
class SequenceContext:
    """What a proposer may look at: one sequence's tokens so far.

    ``all_ids`` is ``prompt_ids + output_ids`` as one list; the engine passes the list it
    already keeps, so building a context each step costs nothing.
    """

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # generated so far
    all_ids: list[int]  # prompt_ids + output_ids
    # Under a grammar: drafts so far -> the bool mask [V] of tokens allowed next. Model
    # drafters draft inside it; drafts outside it would be cut before the forward anyway.
    allowed: Callable[[Sequence[int]], torch.Tensor] | None = None
    # Trailing ids that are this step's drafts, not verified yet (a proposer continuing
    # another's drafts sees them as if generated; a draft model must not keep them).
    drafted: int = 0

    @classmethod
    def of(cls, prompt_ids: Sequence[int], output_ids: Sequence[int] = ()) -> SequenceContext:
        """A context that builds its own ``all_ids`` (tests, one-off callers)."""
        return cls(prompt_ids, output_ids, [*prompt_ids, *output_ids])

    def extended(self, drafts: Sequence[int]) -> SequenceContext:
        """This context with ``drafts`` appended as if generated (grammar-free contexts)."""
        assert self.allowed is None, "drafts under a grammar are not continued"
        output = [*self.output_ids, *drafts]
        return SequenceContext(
            self.prompt_ids, output, [*self.all_ids, *drafts], None, self.drafted + len(drafts)
        )


@dataclass(frozen=True)
class Proposal:
    """Up to k guessed next tokens, and the distributions they were sampled from (if any)."""

    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [k, V], or None for deterministic proposers
    method: str  # the proposer's registry key, for per-method acceptance stats

    def __len__(self) -> int:
        return len(self.token_ids)


class Proposer(Protocol):
    """Guesses the next tokens of a sequence; the verifier decides which are kept."""

    method: str

    def propose(self, context: SequenceContext, k: int) -> Proposal:
        """At most ``k`` tokens that may follow ``context.all_ids`` (possibly none)."""
        ...


P = TypeVar("P", bound=type[Proposer])

# Method name -> proposer class. Each proposer module registers itself with @register; the
# engine looks classes up here instead of branching on method names.
PROPOSERS: dict[str, type[Proposer]] = {}


def register(cls: P) -> P:
    """Class decorator: make ``cls`` available as ``PROPOSERS[cls.method]``."""
    method = cls.method
    if PROPOSERS.get(method, cls) is not cls:
        raise ValueError(f"proposer method {method!r} is already registered")
    PROPOSERS[method] = cls
    return cls
