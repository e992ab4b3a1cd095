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
from specserve.speculative.proposers.prediction import (
    RESYNC_RUN,
    PredictionProposer,
    PredictionStats,
)
from specserve.speculative.sampling import SamplingParams


class ProposalSource:
    """The proposers of one request, in priority order, each with its own length tuner.

    Predictions come first; where the prediction has nothing to offer (or its measured
    acceptance does not pay), the deployment's drafter proposes. Lookups the request or the
    product adds (the prediction, n-gram next to a model drafter) draft up to
    MAX_LOOKUP_DRAFT tokens; the deployment's drafter up to its ``draft_token_count``.

    In one step, a request's drafts may come from several proposers: when one runs out
    before the length its tuner chose (the prediction ends, the n-gram match reaches the end
    of the text), the next one continues from its last draft, for what it did not cover.
    Each proposer's tuner sees only its own part of the drafts. A sampled request's step
    carries one draft distribution per position: one-hot where a lookup drafted (what the
    verifier assumes of deterministic proposers), the draft model's own after it.
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
        self._parts: list[tuple[Proposer, LengthTuner, int]] = []  # this step's drafters
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
                speculation.draft_model,
                params,
                max_len + speculation.draft_token_count,
                prefix_cache=speculation.draft_prefix_cache,
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
        """At most ``limit`` drafts (possibly none): the first proposer's, continued by the
        next ones where it ran out (not under a grammar, whose masks follow the output)."""
        self._parts = []
        drafts: list[int] = []
        for proposer, tuner in self.entries:
            k = self._length(tuner, len(drafts), limit)
            if k <= 0 and proposer is self.prediction and self.prediction.wants_probe(context):
                k = min(limit, RESYNC_RUN)  # a fresh place in the prediction: worth a look
            if k <= 0 or (drafts and isinstance(proposer, EagleProposer)):
                continue  # an EAGLE head drafts from target features of verified tokens
            proposal = proposer.propose(context.extended(drafts) if drafts else context, k)
            if not proposal.token_ids:
                continue
            self._parts.append((proposer, tuner, len(proposal)))
            if context.allowed is not None:
                return proposal
            if proposal.draft_probs is not None:  # a sampling model drafter: always the last
                return _after_lookups(drafts, proposal, self._parts[0][0].method)
            drafts += proposal.token_ids
            if len(proposal) == k or len(drafts) >= limit:
                break  # it drafted all its tuner trusts: nothing left uncovered
        method = self._parts[0][0].method if self._parts else "none"
        return Proposal(drafts, None, method)

    def _length(self, tuner: LengthTuner, drafts: int, limit: int) -> int:
        """How many drafts to ask of a proposer after ``drafts`` drafts of others: its
        tuner's choice alone, or, continuing, what pays on top of those drafts."""
        room = limit - drafts
        if not self.adaptive:
            return min(room, tuner.max_k)
        if not drafts:
            return min(room, tuner.choose())
        tokens, survive = self._chain(drafts)
        return tuner.choose_after(drafts, tokens, survive, room)

    def _chain(self, k: int) -> tuple[float, float]:
        """Expected tokens from a step keeping the first ``k`` drafts of this step's parts,
        and the probability that all ``k`` are kept: 1 + a1 + a1 a2 + ..., each position's
        rate from the tuner of the proposer that drafted it."""
        curve = self._survival(k)
        return 1.0 + sum(curve), (curve[-1] if curve else 1.0)

    def _survival(self, k: int) -> list[float]:
        """a1, a1 a2, ...: the probability that each of the first ``k`` drafts is kept (fewer
        where this step's parts drafted fewer)."""
        out, survive, left = [], 1.0, k
        for _, tuner, drafted in self._parts:
            for rate in tuner.acceptance.rates()[: min(drafted, left)]:
                survive *= rate
                out.append(survive)
            left -= drafted
            if left <= 0:
                break
        return out

    def add_features(self, start: int, features: torch.Tensor) -> None:
        """Target features of positions ``start..``: EAGLE drafters draft from them."""
        for proposer in self.feature_readers:
            proposer.add_features(start, features)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens from a step keeping ``k`` drafts of the last proposal."""
        return self._chain(k)[0]

    def draft_gains(self, k: int) -> list[float]:
        """What each of the last proposal's first ``k`` drafts adds to the step's expected
        tokens (non-increasing); a draft no tuner priced (a token a grammar forces) adds
        what the one before it did."""
        curve = self._survival(k)
        return curve + [curve[-1] if curve else 1.0] * (k - len(curve))

    def observe(self, proposed: int, accepted: int) -> None:
        """Feed the verification of the last proposal's first ``proposed`` drafts back to the
        tuners of the proposers that drafted them (a part after a rejection was not tried)."""
        start = 0
        for proposer, tuner, drafted in self._parts:
            verified = min(drafted, proposed - start)
            if verified <= 0 or accepted < start:
                break
            tuner.observe(verified, min(accepted - start, verified))
            if isinstance(proposer, (DraftModelProposer, EagleProposer)):
                tuner.draft_cost = proposer.seconds_per_token
            start += drafted


def _after_lookups(lookups: list[int], proposal: Proposal, method: str) -> Proposal:
    """A sampled model drafter's proposal after deterministic drafts: those positions get
    one-hot distributions, so the verifier treats every position as its proposer's."""
    if not lookups:
        return proposal
    assert proposal.draft_probs is not None
    probs = proposal.draft_probs
    one_hot = torch.nn.functional.one_hot(torch.tensor(lookups), probs.shape[-1]).to(probs)
    return Proposal(lookups + proposal.token_ids, torch.cat([one_hot, probs]), method)
