"""A request's rules on the target's logits: grammar, presence/frequency penalties, logit bias.

They apply to the logits before `target_probs`, at every position the target scores, and each
position sees exactly the state plain decoding would have there: the penalties count the
output *and the drafts before that position*, the grammar's mask is the matcher's state after
those drafts. So greedy speculative output equals plain greedy output, and the sampled
distribution is the rule-shaped target distribution, with or without drafts.

Per step of a sequence::

    drafts, valid = rules.admit(proposed, limit)  # cut at the first draft the grammar
                                            # forbids, then append the tokens it forces
    logits = rules.shape(logits, drafts)    # [k + 1, V]: row i as plain decoding sees it
    rules.advance(emitted)                  # the tokens the verifier kept

Row i of the shaped logits is ``logits[i] - presence * (count > 0) - frequency * count + bias``
with the grammar's forbidden ids at -inf (OpenAI's definition of the penalties; the counts are
of generated tokens, as vLLM counts them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from specserve.speculative.grammar import GrammarMatcher, TokenGrammar, apply_mask
from specserve.speculative.sampling import InvalidRequestError, SamplingParams


class TokenRules:
    """One sequence's rules and their state (the counts so far, the grammar matcher)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.penalized = self.presence != 0.0 or self.frequency != 0.0
        self.counts: Counter[int] = Counter()  # of the output, kept only when penalized
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, value in params.logit_bias:
                if not 0 <= token < vocab_size:
                    raise InvalidRequestError(
                        f"logit_bias token id {token} is not in this model's vocabulary "
                        f"[0, {vocab_size})"
                    )
                self.bias[token] = value
        grammar: TokenGrammar | None = params.grammar
        self.matcher: GrammarMatcher | None = grammar.matcher() if grammar is not None else None
        self._masks: list[torch.Tensor] = []  # of the pending step's positions (admit)

    @property
    def active(self) -> bool:
        return self.penalized or self.bias is not None or self.matcher is not None

    @property
    def grammar_done(self) -> bool:
        """The grammar has ended: nothing but the end of the sequence may follow."""
        return self.matcher is not None and self.matcher.is_done()

    def admit(self, drafts: Sequence[int], limit: int, force: bool = True) -> tuple[list[int], int]:
        """(the drafts this step may verify, how many of them came from ``drafts``): those
        before the first one the grammar forbids, then the tokens the grammar forces from
        there (free drafts, no drafter needed; not if ``force`` is False), at most ``limit``
        in all. Records each position's mask for `shape`. Only under a grammar."""
        m = self.matcher
        assert m is not None, "admit() checks drafts against a grammar"
        kept: list[int] = []
        self._masks = [m.allowed()]
        for token in drafts[:limit]:
            if not m.accept(token):
                break
            kept.append(token)
            self._masks.append(m.allowed())
        valid = len(kept)
        forced = m.forced(limit - len(kept)) if force and len(kept) < limit else []
        for token in forced:
            if not m.accept(token):  # forced tokens are allowed by definition; stay safe
                break
            kept.append(token)
            self._masks.append(m.allowed())
        m.rollback(len(kept))
        return kept, valid

    def allowed_after(self, drafts: Sequence[int]) -> torch.Tensor:
        """The grammar's mask [W] after ``drafts`` (all allowed: a model drafter's own)."""
        assert self.matcher is not None
        m, walked = self.matcher, 0
        for token in drafts:
            if not m.accept(token):
                break
            walked += 1
        mask = m.allowed()
        m.rollback(walked)
        return mask

    def shape(self, logits: torch.Tensor, drafts: Sequence[int]) -> torch.Tensor:
        """Logits ``[N, V]`` of positions last token, drafts[0], ... -> the rule-shaped
        logits (float32), row i as plain decoding would see it after ``drafts[:i]``."""
        if not self.active:
            return logits
        rows = logits.shape[0]
        shaped = logits.float().clone()
        if self.penalized:
            self._penalize(shaped, drafts[: rows - 1])
        if self.bias is not None:
            shaped[:, : self.bias.shape[0]] += self.bias
        if self.matcher is not None:
            # Without admit() for this step (the first token), the current state's mask.
            masks = self._masks[:rows] if len(self._masks) >= rows else [self.matcher.allowed()]
            shaped = apply_mask(shaped, torch.stack(masks))  # masks [N, W]
        return shaped

    def _penalize(self, shaped: torch.Tensor, drafts: Sequence[int]) -> None:
        """Subtract each row's penalties: the output's counts (every row), then what the
        drafts before row i add to them (row i only)."""
        if self.counts:
            tokens = torch.tensor(list(self.counts))
            penalties = [self._penalty(count) for count in self.counts.values()]
            shaped[:, tokens] -= torch.tensor(penalties, dtype=shaped.dtype)
        rows, cols, extras = [], [], []
        running: Counter[int] = Counter()
        for i, token in enumerate(drafts, start=1):
            running[token] += 1
            for t, extra in running.items():
                base = self.counts.get(t, 0)
                rows.append(i)
                cols.append(t)
                extras.append(self._penalty(base + extra) - self._penalty(base))
        if extras:
            index = (torch.tensor(rows), torch.tensor(cols))
            shaped.index_put_(index, -torch.tensor(extras, dtype=shaped.dtype), accumulate=True)

    def _penalty(self, count: int) -> float:
        return (self.presence if count > 0 else 0.0) + self.frequency * count

    def advance(self, emitted: Sequence[int]) -> None:
        """The verifier kept ``emitted``: count them (for the penalties) and move the grammar
        past them."""
        self._masks = []
        if self.penalized:
            self.counts.update(emitted)
        if self.matcher is None:
            return
        for token in emitted:
            if not self.matcher.is_done():
                accepted = self.matcher.accept(token)
                assert accepted, f"token {token} was emitted against the grammar"
