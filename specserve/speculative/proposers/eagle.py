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

from specserve.speculative.eagle_head import CONTEXT, EagleHead
from specserve.speculative.proposers.base import Proposal, SequenceContext, register
from specserve.speculative.sampling import DRAFT_STREAM, SamplingParams, sample, target_probs

# A chain stops before the draft whose estimated chance of being reached and accepted — the
# product of the head's confidences so far — falls below this: such a draft costs a head
# step and a verify row for little expected gain (EAGLE-2 drafts by the same confidence).
MIN_SURVIVAL = 0.25


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
        min_survival: float = MIN_SURVIVAL,
        window: int = CONTEXT,  # positions before the last ``window`` are never computed
    ) -> None:
        self.head = head
        self.window = window
        self.min_survival = min_survival
        self.params = params
        self.vocab_size = vocab_size
        self.cache = head.new_cache(max_len)
        self.features = torch.zeros(max_len, head.config.hidden_size)
        self.known = 0  # true target features are known for positions < known
        self.synced = 0  # the head's cache holds true (feature, token) pairs below this
        self.generator = generator or params.generator(DRAFT_STREAM)
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
        if start < self.known - self.window:  # the window moved past them: skip
            start = self.cache.first = self.known - self.window
        with torch.inference_mode():
            feats = self.features[start : self.known]
            tokens = torch.tensor(ids[start + 1 : self.known + 1])
            predicted, logits = self.head.step(self.cache, feats, tokens, start, self.window)
            self.synced = self.known
            drafted: list[int] = []
            probs: list[torch.Tensor] = []
            feature, row = predicted[-1:], logits[-1]
            survival = 1.0
            for i in range(k):
                token, p, confidence = self._pick(row)
                survival *= confidence
                if survival < self.min_survival:
                    break
                drafted.append(token)
                if p is not None:
                    probs.append(p)
                if i + 1 < k:
                    position = self.known + i
                    step_token = torch.tensor([token])
                    feature, out = self.head.step(
                        self.cache, feature, step_token, position, self.window
                    )
                    row = out[-1]
        self.seconds_per_token = (time.perf_counter() - began) / max(len(drafted), 1)
        return Proposal(drafted, torch.stack(probs) if probs else None, self.method)

    def _pick(self, row: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """Reduced logits ``[N]`` -> a target token id, its draft distribution (sampling
        only) and the head's confidence: the draft's *largest* probability, never the sampled
        token's — a stop that depended on the sample would bias which tokens get proposed,
        and the verifier's min(1, q/p) would no longer give the target's distribution."""
        if self.params.greedy:
            best = int(row.argmax())
            confidence = float(torch.softmax(row.float(), dim=-1)[best])
            return int(self.head.vocab_ids[best]), None, confidence
        full = torch.full((self.vocab_size,), float("-inf"))
        full[self.head.vocab_ids] = row.float()
        p = target_probs(full[None], self.params)
        return int(sample(p, self.generator)[0]), p[0], float(p[0].max())
