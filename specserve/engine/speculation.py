"""How a request speculates: the configuration, and the proposers + tuners built from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specserve.drafters.artifact import is_drafter_dir, load_drafter
from specserve.drafters.eagle import EagleHead
from specserve.engine.sampling import SamplingParams
from specserve.model.catalog import shipped_drafter
from specserve.model.loader import Model
from specserve.spec.proposers.base import Proposal, Proposer, SequenceContext
from specserve.spec.proposers.draft_model import DraftModelProposer, check_same_vocabulary
from specserve.spec.proposers.eagle import MIN_SURVIVAL, EagleProposer
from specserve.spec.proposers.ngram import NgramProposer
from specserve.spec.proposers.prediction import PredictionProposer, PredictionStats
from specserve.spec.tuning import LengthTuner, StepCosts

if TYPE_CHECKING:  # deployments describe drafters; the engine only reads them
    from specserve.deployments.rules import EffectiveDrafter

# The bound of the model drafters (draft model, EAGLE head): --draft-token-count 1..32.
MAX_DRAFT_TOKEN_COUNT = 32
# Lookups (a request's prediction, and the n-gram proposals the product adds next to a model
# drafter) cost nothing to draft, so they are bounded apart: up to 64 tokens a step, the
# self-tuned length keeping the verify forward to what measured acceptance pays for.
MAX_LOOKUP_DRAFT = 64
MAX_NGRAM_LENGTH = 16


@dataclass(frozen=True)
class SpeculationConfig:
    """The deployment's drafter. ``method=None`` is plain decoding (``--no-speculation``).

    >>> SpeculationConfig(method="ngram", draft_token_count=4, ngram_length=3).method
    'ngram'
    """

    method: str | None = None  # "ngram", "draft_model" or "eagle"
    # Upper bound of the self-tuned length of the deployment's own drafter (the configured k);
    # predictions and companion n-gram proposals are bounded by MAX_LOOKUP_DRAFT instead.
    draft_token_count: int = 4
    ngram_length: int = 3
    draft_model: Model | None = None
    adaptive: bool = True  # False: always propose draft_token_count tokens
    eagle: EagleHead | None = None  # a trained head for this target (method "eagle")
    # Also try n-gram proposals (prompt lookup, free to draft) before the model drafter:
    # they win on long inputs that the output copies.
    with_ngram: bool = False
    # An EAGLE chain stops where the product of the head's confidences falls below this.
    min_draft_survival: float = MIN_SURVIVAL

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram", "draft_model", "eagle"):
            raise ValueError(f"unknown speculation method {self.method!r}")
        if not 1 <= self.draft_token_count <= MAX_DRAFT_TOKEN_COUNT:
            raise ValueError(
                f"draft token count must be in [1, {MAX_DRAFT_TOKEN_COUNT}], "
                f"got {self.draft_token_count}"
            )
        if not 1 <= self.ngram_length <= MAX_NGRAM_LENGTH:
            raise ValueError(
                f"n-gram speculation length must be in [1, {MAX_NGRAM_LENGTH}], "
                f"got {self.ngram_length}"
            )
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise ValueError("method 'draft_model' needs a draft model, and only it does")
        if (self.method == "eagle") != (self.eagle is not None):
            raise ValueError("method 'eagle' needs a trained head, and only it does")
        if not 0.0 <= self.min_draft_survival <= 1.0:
            raise ValueError(f"min_draft_survival must be in [0, 1], got {self.min_draft_survival}")


PLAIN = SpeculationConfig()


def speculation_for_drafter(
    drafter: EffectiveDrafter,
    target: Model,
    load: Callable[[str], Model],
    adaptive: bool = True,
) -> SpeculationConfig:
    """The engine's settings for a deployment's effective drafter (loading a draft model)."""
    if drafter.method is None:
        return PLAIN
    if drafter.method == "ngram":
        length = drafter.ngram_length or 3
        return SpeculationConfig(
            "ngram", drafter.draft_token_count, ngram_length=length, adaptive=adaptive
        )
    assert drafter.draft_model is not None
    path = shipped_drafter(drafter.draft_model) or Path(drafter.draft_model)
    if is_drafter_dir(path):  # a trained EAGLE head, not a model
        head = load_drafter(path, target)
        return SpeculationConfig(
            "eagle", drafter.draft_token_count, eagle=head, adaptive=adaptive, with_ngram=True
        )
    draft = load(drafter.draft_model)
    check_same_vocabulary(target, draft)
    return SpeculationConfig(
        "draft_model", drafter.draft_token_count, draft_model=draft, adaptive=adaptive
    )


class ProposalSource:
    """The proposers of one request, in priority order, each with its own length tuner.

    Predictions come first; where the prediction has nothing to offer (or its measured
    acceptance does not pay), the deployment's drafter proposes. Lookups the request or the
    product adds (the prediction, n-gram next to a model drafter) draft up to
    MAX_LOOKUP_DRAFT tokens; the deployment's drafter up to its ``draft_token_count``.
    """

    def __init__(
        self,
        target: Model,
        spec: SpeculationConfig,
        params: SamplingParams,
        prediction_ids: Sequence[int] | None,
        max_len: int,
        costs: StepCosts,
    ) -> None:
        self.entries: list[tuple[Proposer, LengthTuner]] = []
        self.prediction: PredictionProposer | None = None
        self.adaptive = spec.adaptive
        self._last: tuple[Proposer, LengthTuner] | None = None  # who proposed this step
        if prediction_ids:
            self.prediction = PredictionProposer(prediction_ids, max_run=MAX_LOOKUP_DRAFT)
            self.entries.append((self.prediction, LengthTuner(MAX_LOOKUP_DRAFT, costs)))
        self.feature_readers: list[EagleProposer] = []
        if spec.with_ngram and spec.method != "ngram":
            ngram = NgramProposer(spec.ngram_length)
            self.entries.append((ngram, LengthTuner(MAX_LOOKUP_DRAFT, costs)))
        drafter: Proposer | None = None
        if spec.method == "ngram":
            drafter = NgramProposer(spec.ngram_length)
        elif spec.eagle is not None:
            vocab = target.lm.config.vocab_size
            max_drafted = max_len + spec.draft_token_count + 1
            eagle = EagleProposer(
                spec.eagle, params, max_drafted, vocab, min_survival=spec.min_draft_survival
            )
            self.feature_readers.append(eagle)
            drafter = eagle
        elif spec.draft_model is not None:
            check_same_vocabulary(target, spec.draft_model)
            drafter = DraftModelProposer(spec.draft_model, params, max_len + spec.draft_token_count)
        if drafter is not None:
            self.entries.append((drafter, LengthTuner(spec.draft_token_count, costs)))

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Let proposers with state (a draft model's KV cache) process the prompt."""
        for proposer, _ in self.entries:
            if isinstance(proposer, DraftModelProposer):
                proposer.prefill(list(prompt_ids))

    def prediction_stats(self, output_ids: Sequence[int]) -> PredictionStats | None:
        """OpenAI's accepted/rejected prediction token counts for this output."""
        if self.prediction is None:
            return None
        return PredictionStats.count(self.prediction.prediction_ids, output_ids)

    def propose(self, context: SequenceContext, limit: int) -> Proposal:
        """The first non-empty proposal of at most ``limit`` tokens (possibly none)."""
        self._last = None
        for proposer, tuner in self.entries:
            k = min(limit, tuner.choose() if self.adaptive else tuner.max_k)
            if k <= 0:
                continue
            proposal = proposer.propose(context, k)
            if proposal.token_ids:
                self._last = (proposer, tuner)
                return proposal
        return Proposal([], None, "none")

    def add_features(self, start: int, features: torch.Tensor) -> None:
        """Target features of positions ``start..``: EAGLE drafters draft from them."""
        for proposer in self.feature_readers:
            proposer.add_features(start, features)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens from a step keeping ``k`` drafts of the last proposal."""
        return 1.0 if self._last is None else self._last[1].expected_tokens(k)

    def observe(self, proposed: int, accepted: int) -> None:
        """Feed the verification of the last proposal back to its tuner and counters."""
        if self._last is None:
            return
        proposer, tuner = self._last
        tuner.observe(proposed, accepted)
        if isinstance(proposer, (DraftModelProposer, EagleProposer)):
            tuner.draft_cost = proposer.seconds_per_token
