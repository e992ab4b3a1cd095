"""One request's decoding state, advanced one target step at a time.

A ``Sequence`` does not run the target model: whoever owns the KV cache does (``generate``
for a batch of one, the ``Engine`` for a continuous batch). Per step the owner asks
``next_feed()`` for the tokens to forward — the last emitted token plus this sequence's
drafts —, runs the forward, and hands the logits of those positions to ``accept()``, which
verifies the drafts, records the statistics and returns the text that became safe to stream.

The one-screen version of this step, without batching or tuning, is
``specserve/speculative/reference.py``; ``test_engine_equals_reference_step`` checks that
both emit the same tokens (greedy, and seeded sampling with fixed draft lengths).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Ids

import torch

from specserve.engine.output import TextAssembler
from specserve.engine.result import GenerationResult
from specserve.model.kv_cache import KVCache
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache, PrefixHit
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.limits import MAX_LOOKUP_DRAFT
from specserve.speculative.proposers.base import Proposal, SequenceContext
from specserve.speculative.sampling import (
    ACCEPT_STREAM,
    SAMPLE_STREAM,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
    sample,
    target_probs,
    token_logprobs,
)
from specserve.speculative.source import ProposalSource
from specserve.speculative.stats import FORCED, SpecStats
from specserve.speculative.token_rules import TokenRules
from specserve.speculative.verify import verify_greedy, verify_sampled


def check_prompt(model: Model, prompt_ids: Ids[int], context_limit: int | None = None) -> None:
    """Refuse, before any compute, a prompt that is empty or does not fit the context."""
    limit = context_limit or model.max_context
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt_ids) >= limit:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; the context window here is "
            f"{limit} tokens (and at least one must be left to generate)"
        )
    vocab = model.lm.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")


def pick_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits ``[V]`` -> the next token, greedy or sampled."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(target_probs(logits[None], params), gen)[0])


def _verify(
    logits: torch.Tensor,
    proposal: Proposal,
    params: SamplingParams,
    accept_gen: torch.Generator,
    sample_gen: torch.Generator,
) -> tuple[list[int], int]:
    """logits ``[k + 1, V]`` of one sequence -> (emitted tokens, number of accepted drafts)."""
    drafts = torch.tensor([proposal.token_ids])  # [1, k]
    num = torch.tensor([len(proposal.token_ids)])
    if params.greedy:
        result = verify_greedy(drafts, num, logits.argmax(-1)[None])
    else:
        draft_probs = None if proposal.draft_probs is None else proposal.draft_probs[None]
        probs = target_probs(logits, params)[None]  # [1, k + 1, V]
        result = verify_sampled(drafts, num, draft_probs, probs, [accept_gen], [sample_gen])
    return result.row(0), int(result.num_accepted[0])


class Sequence:
    """Prompt, generated tokens, proposers, stop/length state and statistics of one request."""

    def __init__(
        self,
        model: Model,
        prompt_ids: Ids[int],
        params: SamplingParams,
        speculation: SpeculationConfig = PLAIN,
        prediction_ids: Ids[int] | None = None,
        costs: StepCosts | None = None,
        context_limit: int | None = None,
        record_features: bool = False,
    ) -> None:
        check_prompt(model, prompt_ids, context_limit)
        self.submitted_at = time.perf_counter()
        self.prompt_ids = list(prompt_ids)
        self.params = params
        limit = context_limit or model.max_context
        self.budget = min(params.max_tokens, limit - len(self.prompt_ids))
        self.max_len = len(self.prompt_ids) + self.budget  # positions this sequence may use
        # Independent streams (a sampled drafter draws from a third, its own): plain,
        # recovered and bonus tokens, and the verifier's acceptance uniforms.
        self.sample_gen = params.generator(SAMPLE_STREAM)
        self.accept_gen = params.generator(ACCEPT_STREAM)
        self.costs = costs or StepCosts()
        self.source = ProposalSource(
            model, speculation, params, prediction_ids, self.max_len, self.costs
        )
        self.forced_drafts = speculation.forced_drafts
        self.assembler = TextAssembler(model.tokenizer, self.prompt_ids, params.stop)
        self.eos = frozenset() if params.ignore_eos else frozenset(model.tokenizer.eos_ids)
        self.stats = SpecStats()
        self.rules = TokenRules(params, model.lm.config.vocab_size)
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.out: list[int] = []
        self.all_ids = list(self.prompt_ids)
        self.cached_prompt_tokens = 0  # prompt positions whose KV came from a prefix cache
        self.finish_reason: str | None = None  # "stop" or "length" once done
        self.first_token_at: float | None = None
        self.first_tokens = 0  # tokens out with the first (several: drafts the prefill verified)
        self.finished_at: float | None = None
        self._proposal: Proposal | None = None
        self._from_drafter = 0  # drafts of the pending proposal that the drafter made
        self._source_prefilled = False  # whether the proposers have seen the prompt
        # (start, features [T, C] bf16) of every position whose features the target computed,
        # kept when asked (training data for EAGLE heads: no second forward needed)
        self._features: list[tuple[int, torch.Tensor]] | None = [] if record_features else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the next feed starts: the last emitted token is not in the KV cache yet."""
        return len(self.all_ids) - 1

    def add_prompt_features(self, start: int, features: torch.Tensor) -> None:
        """Target features ``[T, C]`` of prompt positions ``start..`` (for EAGLE drafters)."""
        self.source.add_features(start, features)
        self._keep_features(start, features)

    def restore_prefix(
        self, prefix_cache: PrefixCache, cache: KVCache, slot: int
    ) -> PrefixHit | None:
        """Before the prefill: the longest prompt prefix ``prefix_cache`` keeps, copied into
        ``slot`` of ``cache`` with its features; the prefill then starts at ``hit.length``."""
        hit = prefix_cache.lookup(self.prompt_ids)
        if hit is not None:
            prefix_cache.restore(hit, cache, slot)
            self.add_prompt_features(0, hit.features)
            self.cached_prompt_tokens = hit.length
        return hit

    def start(self, last_prompt_logits: torch.Tensor) -> str:
        """After the prefill: pick the first token from the last prompt position's logits."""
        logits = self.rules.shape(last_prompt_logits[None], [])
        token = pick_token(logits[0], self.params, self.sample_gen)
        self._prefill_source()
        self.first_token_at = time.perf_counter()
        piece = self._emit([token], logits)
        self.first_tokens = len(self.out)
        return piece

    def first_feed(self) -> list[int] | None:
        """Before the prefill's last chunk of a request with a prediction: the feed ``[last
        prompt token, *drafts]`` of its first step (the prediction's drafts, continued as in
        any step), which that chunk then carries and verifies (`start_verified`: no forward
        of their own); None without a prediction or drafts (then `start`)."""
        if self.source.prediction is None:
            return None
        self._prefill_source()
        feed = self.next_feed()
        if len(feed) > 1:
            return feed
        self._proposal = None
        return None

    def start_verified(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> str:
        """After a prefill whose last chunk carried `first_feed`: verify its drafts with the
        logits (and features) of the feed's positions, as `accept` does a step's."""
        self.first_token_at = time.perf_counter()
        piece = self.accept(logits, features)
        self.first_tokens = len(self.out)
        return piece

    def _prefill_source(self) -> None:
        if not self._source_prefilled:
            self.source.prefill(self.prompt_ids)
            self._source_prefilled = True

    def next_feed(self) -> list[int]:
        """The tokens of this sequence's next forward: the last token and up to k drafts."""
        limit = self.budget - len(self.out) - 1
        allowed = self.rules.allowed_after if self.rules.matcher is not None else None
        context = SequenceContext(self.prompt_ids, self.out, self.all_ids, allowed)
        proposal = self.source.propose(context, limit)
        self._from_drafter = len(proposal)
        if self.rules.matcher is not None:
            proposal = self._admit(proposal, min(limit, MAX_LOOKUP_DRAFT))
        self._proposal = proposal
        return [self.all_ids[-1], *proposal.token_ids]

    def _admit(self, proposal: Proposal, limit: int) -> Proposal:
        """The grammar's cut of the drafts, extended by the tokens it forces (one-hot draft
        rows for them if the drafter sampled: a forced token has all the target's mass)."""
        drafts, valid = self.rules.admit(proposal.token_ids, limit, self.forced_drafts)
        self._from_drafter = valid
        probs = proposal.draft_probs
        if probs is not None:
            forced = torch.zeros(len(drafts) - valid, probs.shape[-1], dtype=probs.dtype)
            forced[torch.arange(len(drafts) - valid), drafts[valid:]] = 1.0
            probs = torch.cat([probs[:valid], forced])
        method = proposal.method if valid else FORCED
        return Proposal(drafts, probs, method)

    @property
    def drafts(self) -> int:
        """How many drafts the pending feed carries."""
        return 0 if self._proposal is None else len(self._proposal.token_ids)

    def expected_tokens(self, drafts: int) -> float:
        """Tokens the pending step emits in expectation if it keeps only ``drafts`` drafts."""
        return self.source.expected_tokens(min(drafts, self.drafts))

    def draft_gains(self) -> list[float]:
        """What each pending draft adds to the step's expected tokens, in order."""
        return self.source.draft_gains(self.drafts)

    def truncate(self, drafts: int) -> list[int]:
        """Keep only the first ``drafts`` drafts (lossless: fewer drafts, same verifier)."""
        proposal = self._proposal
        assert proposal is not None, "truncate() without next_feed()"
        if drafts < len(proposal.token_ids):
            probs = None if proposal.draft_probs is None else proposal.draft_probs[:drafts]
            proposal = Proposal(proposal.token_ids[:drafts], probs, proposal.method)
            self._proposal = proposal
            self._from_drafter = min(self._from_drafter, drafts)
        return [self.all_ids[-1], *proposal.token_ids]

    def accept(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> str:
        """Verify with the logits ``[len(feed), V]`` of the last feed; returns new text.

        ``features`` ``[len(feed), C]``: the target's features of the same positions; those
        of the kept positions go to proposers that read them.
        """
        start = self.position
        proposal = self._proposal
        assert proposal is not None, "accept() without next_feed()"
        self._proposal = None
        proposed = len(proposal.token_ids)
        logits = self.rules.shape(logits[: proposed + 1], proposal.token_ids)
        if proposed:
            emitted, accepted = _verify(
                logits, proposal, self.params, self.accept_gen, self.sample_gen
            )
        else:
            emitted, accepted = [pick_token(logits[0], self.params, self.sample_gen)], 0
        if features is not None:
            self.source.add_features(start, features[: accepted + 1])
            self._keep_features(start, features[: accepted + 1])
        self._record(proposal, accepted, len(emitted))
        return self._emit(emitted, logits)

    def _record(self, proposal: Proposal, accepted: int, emitted: int) -> None:
        """Statistics and the tuner's feedback; forced tokens count apart (method "grammar")."""
        drafted = 0 if proposal.method == FORCED else self._from_drafter
        kept = min(accepted, drafted)
        self.source.observe(drafted, kept)
        self.stats.record_step(proposal.method if drafted else None, drafted, kept, emitted)
        self.stats.record_forced(len(proposal) - drafted, accepted - kept)

    def _keep_features(self, start: int, features: torch.Tensor) -> None:
        if self._features is not None:
            self._features.append((start, features.to(torch.bfloat16)))

    def recorded_features(self) -> torch.Tensor:
        """Features ``[len(all_ids) - 1, C]`` (bf16) of every position but the last token's
        (never forwarded), when the sequence was made with ``record_features``."""
        if self._features is None:
            raise ValueError("this sequence does not record features (record_features=False)")
        width = self._features[0][1].shape[-1] if self._features else 0
        features = torch.zeros(len(self.all_ids) - 1, width, dtype=torch.bfloat16)
        for start, chunk in self._features:
            end = min(start + chunk.shape[0], features.shape[0])
            features[start:end] = chunk[: end - start]
        return features

    def _emit(self, emitted: list[int], logits: torch.Tensor) -> str:
        """Append the step's tokens (row i of ``logits`` scored ``emitted[i]``) up to an end
        of sequence or the budget; returns the text that became safe to stream."""
        fresh = []
        for token in emitted:
            if token in self.eos:
                self.finish_reason = "stop"
                break
            if len(self.out) < self.budget:
                self.out.append(token)
                self.all_ids.append(token)
                fresh.append(token)
        self.rules.advance(emitted[: len(fresh) + (self.finish_reason == "stop")])
        if self.logprobs is not None and fresh:
            self.logprobs += token_logprobs(logits, fresh, self.params.logprobs or 0)
        if self.rules.grammar_done and self.finish_reason is None:
            self.finish_reason = "stop"  # the grammar allows nothing but the end
        piece = self.assembler.add(fresh)
        if self.assembler.finished:
            self.finish_reason = "stop"
        elif self.finish_reason is None and len(self.out) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            piece += self.assembler.finish()
            self.finished_at = time.perf_counter()
        return piece

    def result(self) -> GenerationResult:
        first = self.first_token_at or self.submitted_at
        end = self.finished_at or time.perf_counter()
        return GenerationResult(
            text=self.assembler.text,
            token_ids=list(self.out),
            prompt_tokens=len(self.prompt_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
            first_tokens=self.first_tokens,
            finish_reason=self.finish_reason or "cancelled",
            time_to_first_token=first - self.submitted_at,
            decode_seconds=end - first,
            stats=self.stats,
            prediction=self.source.prediction_stats(self.out),
            features=None if self._features is None else self.recorded_features(),
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )
