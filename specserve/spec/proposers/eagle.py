"""EAGLE-style drafting: a one-layer head extrapolates the target's own features.

The target's verification forward already computes its last hidden state (the *feature*)
at every position; the head turns (feature at t, token at t + 1) into a guess of the feature
at t + 1, whose logits through a reduced copy of the target's LM head give the next draft,
and so on autoregressively. Features of accepted positions arrive after each verification
(`add_features`), so the head re-reads true features instead of its own guesses; its KV
cache is indexed by position, so discarded guesses are simply overwritten.
"""

from __future__ import annotations

import time

import torch

from specserve.drafters.eagle import EagleHead
from specserve.engine.sampling import SamplingParams, sample, target_probs
from specserve.spec.proposers.base import Proposal, SequenceContext, register


@register
class EagleProposer:
    method = "eagle"

    def __init__(
        self,
        head: EagleHead,
        params: SamplingParams,
        max_len: int,
        vocab_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self.head = head
        self.params = params
        self.vocab_size = vocab_size
        self.cache = head.new_cache(max_len)
        self.features = torch.zeros(max_len, head.config.hidden_size)
        self.known = 0  # true target features are known for positions < known
        self.synced = 0  # the head's cache holds true (feature, token) pairs below this
        self.generator = generator or params.generator()
        self.seconds_per_token = 0.0  # measured, for the length tuner

    def add_features(self, start: int, features: torch.Tensor) -> None:
        end = start + features.shape[0]
        self.features[start:end] = features
        self.known = end
        self.synced = min(self.synced, start)  # anything from `start` on must be re-read

    def propose(self, context: SequenceContext, k: int) -> Proposal:
        ids = context.all_ids
        # Pairs (feature p, token p + 1) for p < known; the last one predicts the feature of
        # the last token, whose logits give the first draft.
        if k <= 0 or self.known != len(ids) - 1 or len(ids) + k >= self.features.shape[0]:
            return Proposal([], None, self.method)
        began = time.perf_counter()
        start = self.synced
        with torch.inference_mode():
            feats = self.features[start : self.known]
            tokens = torch.tensor(ids[start + 1 : self.known + 1])
            predicted, logits = self.head.step(self.cache, feats, tokens, start)
            self.synced = self.known
            drafted: list[int] = []
            probs: list[torch.Tensor] = []
            feature, row = predicted[-1:], logits[-1]
            for i in range(k):
                token, p = self._pick(row)
                drafted.append(token)
                if p is not None:
                    probs.append(p)
                if i + 1 < k:
                    position = self.known + i
                    step_token = torch.tensor([token])
                    feature, out = self.head.step(self.cache, feature, step_token, position)
                    row = out[-1]
        self.seconds_per_token = (time.perf_counter() - began) / k
        return Proposal(drafted, torch.stack(probs) if probs else None, self.method)

    def _pick(self, row: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Reduced logits ``[N]`` -> a target token id (and its draft distribution)."""
        if self.params.greedy:
            return int(self.head.vocab_ids[int(row.argmax())]), None
        full = torch.full((self.vocab_size,), float("-inf"))
        full[self.head.vocab_ids] = row.float()
        p = target_probs(full[None], self.params)
        return int(sample(p, self.generator)[0]), p[0]
