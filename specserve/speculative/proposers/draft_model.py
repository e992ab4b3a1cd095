"""A smaller model of the same vocabulary drafts k tokens autoregressively."""

from __future__ import annotations

import time

import torch

from specserve.model import vocab
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.model.transformer import ForwardBatch
from specserve.speculative.grammar import apply_mask
from specserve.speculative.proposers.base import Proposal, SequenceContext, register
from specserve.speculative.sampling import DRAFT_STREAM, SamplingParams, sample, target_probs


def check_models_share_vocabulary(target: Model, draft: Model) -> None:
    """Refuse a drafter whose vocabulary differs from the target's (ids must agree exactly)."""
    vocab.check_same_vocabulary(target.name, _vocabulary(target), draft.name, _vocabulary(draft))


def _vocabulary(model: Model) -> vocab.Vocabulary:
    return vocab.Vocabulary(model.tokenizer.vocab_size, model.tokenizer.vocab_fingerprint())


@register
class DraftModelProposer:
    """Drafts with its own model and KV cache, kept in step with the accepted tokens.

    The cache holds the draft model's keys/values for ``all_ids[:synced]``. Each call first
    feeds the tokens accepted since (one multi-token forward), then drafts ``k`` tokens one
    forward at a time: greedily for greedy requests (a one-hot draft distribution), or by
    sampling the draft's own processed distribution, which the verifier then needs.
    """

    method = "draft_model"

    def __init__(
        self,
        draft: Model,
        params: SamplingParams,
        max_len: int,
        generator: torch.Generator | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.draft = draft
        self.prefix_cache = prefix_cache
        self.params = params
        self.cache = draft.lm.new_cache(1, max_len)
        self.synced = 0
        self.generator = generator or params.generator(DRAFT_STREAM)
        self.seconds_per_token = 0.0  # measured, for the length tuner

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        batch = ForwardBatch(torch.tensor([tokens]), [0], [start])
        return self.draft.lm(batch, self.cache, last_logits=1)[0, -1]  # [V]

    def prefill(self, prompt_ids: list[int]) -> None:
        """Process the prompt with the draft model alongside the target's prefill, so the
        decode phase (and the measured draft cost) only pays for drafting; after the longest
        prefix its prefix cache keeps, if it has one."""
        ids = prompt_ids[:-1]  # the last prompt token is fed with the first drafts
        if not ids:
            return
        cache = self.prefix_cache
        hit = cache.lookup(prompt_ids) if cache is not None else None  # at most len(ids)
        start = 0
        if cache is not None and hit is not None:
            cache.restore(hit, self.cache, 0)
            start = hit.length
        if start < len(ids):
            self._forward(ids[start:], start)
        if cache is not None:  # no features: a draft model's are read by nothing
            cache.store(ids, self.cache, 0, torch.empty(len(ids), 0))
        self.synced = len(ids)

    def propose(self, context: SequenceContext, k: int) -> Proposal:
        ids = context.all_ids
        if k <= 0 or len(ids) + k > self.cache.max_len:
            return Proposal([], None, self.method)
        logits = self._forward(ids[self.synced :], self.synced)  # catch up on accepted tokens
        # Another proposer's drafts at the end of ids are fed but not kept as synced: if the
        # target rejects them, the next call writes those positions again.
        self.synced = len(ids) - context.drafted
        began = time.perf_counter()
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if context.allowed is not None:  # draft only what the request's grammar allows
                logits = apply_mask(logits.float(), context.allowed(drafted))
            if self.params.greedy:
                token = int(logits.argmax())
            else:
                p = target_probs(logits[None], self.params)  # [1, V]
                token = int(sample(p, self.generator)[0])
                probs.append(p[0])
            drafted.append(token)
            if i + 1 < k:
                logits = self._forward([token], len(ids) + i)
        # The k - 1 single-token draft forwards (the catch-up forward is shared work).
        self.seconds_per_token = (time.perf_counter() - began) / k
        return Proposal(drafted, torch.stack(probs) if probs else None, self.method)
