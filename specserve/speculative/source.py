"""One request's proposers, in priority order, each with its own self-tuned draft length."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specserve.model.loader import Model
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.draft_length import LengthTuner, StepCosts
from specserve.speculative.limits import MAX_LOOKUP_DRAFT
from specserve.speculative.proposers.base import Proposal, Proposer, SequenceContext
from specserve.speculative.proposers.draft_model import (
    DraftModelProposer,
    check_models_share_vocabulary,
)
from specserve.speculative.proposers.eagle import EagleProposer
from specserve.speculative.proposers.ngram import NgramProposer
from specserve.speculative.proposers.prediction import PredictionProposer, PredictionStats
from specserve.speculative.sampling import SamplingParams


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
        speculation: SpeculationConfig,
        params: SamplingParams,
        prediction_ids: Sequence[int] | None,
        max_len: int,
        costs: StepCosts,
    ) -> None:
        self.entries: list[tuple[Proposer, LengthTuner]] = []
        self.prediction: PredictionProposer | None = None
        self.adaptive = speculation.adaptive
        self._last: tuple[Proposer, LengthTuner] | None = None  # who proposed this step
        if prediction_ids:
            self.prediction = PredictionProposer(prediction_ids, max_run=MAX_LOOKUP_DRAFT)
            self.entries.append((self.prediction, LengthTuner(MAX_LOOKUP_DRAFT, costs)))
        self.feature_readers: list[EagleProposer] = []
        if speculation.with_ngram and speculation.method != "ngram":
            ngram = NgramProposer(speculation.ngram_length)
            self.entries.append((ngram, LengthTuner(MAX_LOOKUP_DRAFT, costs)))
        drafter: Proposer | None = None
        if speculation.method == "ngram":
            drafter = NgramProposer(speculation.ngram_length)
        elif speculation.eagle is not None:
            vocab = target.lm.config.vocab_size
            max_drafted = max_len + speculation.draft_token_count + 1
            eagle = EagleProposer(
                speculation.eagle,
                params,
                max_drafted,
                vocab,
                min_survival=speculation.min_draft_survival,
            )
            self.feature_readers.append(eagle)
            drafter = eagle
        elif speculation.draft_model is not None:
            check_models_share_vocabulary(target, speculation.draft_model)
            drafter = DraftModelProposer(
                speculation.draft_model, params, max_len + speculation.draft_token_count
            )
        if drafter is not None:
            self.entries.append((drafter, LengthTuner(speculation.draft_token_count, costs)))

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
