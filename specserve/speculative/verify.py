"""The lossless verifier: pure functions from proposals and target distributions to tokens.

One verification step looks at ``K`` draft tokens per sequence (row ``b`` uses the first
``num_drafts[b]``) and the target model's distribution at the ``K + 1`` positions that one
forward pass over ``[last token, draft_0, ..., draft_{K-1}]`` scores. It emits, per row:

- **accepted** tokens: the longest prefix of the drafts that the target keeps;
- then exactly one more token, either
  - the **recovered** token, chosen by the target at the first rejected position, or
  - the **bonus** token, chosen from the target's last distribution when every draft is accepted.

So a row emits ``num_accepted + 1`` tokens, between 1 and ``num_drafts + 1``. Outputs are
``[B, K + 1]`` tensors padded with ``PLACEHOLDER_TOKEN_ID``, as in vLLM's rejection sampler.

Greedy: a draft is accepted while it equals the target's argmax; the recovered or bonus token
is the target's argmax. Sampled (Leviathan et al. 2023, Chen et al. 2023): a draft ``x`` is
accepted with probability ``min(1, p_target(x) / p_draft(x))``; the recovered token is sampled
from ``normalize(max(0, p_target - p_draft))``. Each emitted token is then distributed exactly
as if sampled from the target, whatever the draft distribution. Deterministic proposers
(n-gram, predictions) have a one-hot draft distribution: accept with probability
``p_target(x)``, recover from ``p_target`` with ``x`` zeroed out.

Example (greedy, K = 3)::

    draft_ids  = [[7, 8, 9]]        num_drafts = [3]
    target_ids = [[7, 8, 5, 2]]     # target argmax at the 4 verified positions
    -> output_ids = [[7, 8, 5, -1]], num_accepted = [2]   # 7, 8 accepted; 5 recovered
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class VerifyResult:
    """Per row: ``num_accepted`` accepted drafts, then one recovered or bonus token."""

    output_ids: torch.Tensor  # [B, K + 1] int64, padded with PLACEHOLDER_TOKEN_ID
    num_accepted: torch.Tensor  # [B] int64

    def row(self, b: int) -> list[int]:
        """The tokens row ``b`` emits: its accepted drafts, then the recovered or bonus token."""
        return self.output_ids[b, : int(self.num_accepted[b]) + 1].tolist()


def verify_greedy(
    draft_ids: torch.Tensor, num_drafts: torch.Tensor, target_ids: torch.Tensor
) -> VerifyResult:
    """Greedy verification: keep drafts while they equal the target's argmax.

    ``draft_ids`` ``[B, K]`` (``PLACEHOLDER_TOKEN_ID`` in unused slots), ``num_drafts`` ``[B]``,
    ``target_ids`` ``[B, K + 1]``: the target's argmax at each verified position.
    """
    _check_drafts(draft_ids, num_drafts)
    assert target_ids.ndim == 2, "target_ids must be [B, K + 1]"
    batch, k = draft_ids.shape
    assert target_ids.shape == (batch, k + 1), "target_ids must be [B, K + 1]"
    num_drafts = num_drafts.to(draft_ids.device)
    matches = (draft_ids == target_ids[:, :k]) & _in_proposal(num_drafts, k)  # [B, K]
    num_accepted = _prefix_length(matches)  # [B]
    # The accepted drafts equal the target's tokens, so the whole emitted row is target_ids.
    positions = torch.arange(k + 1, device=draft_ids.device)  # [K + 1]
    emitted = positions[None, :] <= num_accepted[:, None]  # [B, K + 1]
    output_ids = torch.where(emitted, target_ids.long(), PLACEHOLDER_TOKEN_ID)  # [B, K + 1]
    return VerifyResult(output_ids, num_accepted)


def verify_sampled(
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    accept_generators: Sequence[torch.Generator],
    sample_generators: Sequence[torch.Generator],
) -> VerifyResult:
    """Rejection-sampling verification: the output is distributed exactly as the target's.

    ``draft_ids`` ``[B, K]``, ``num_drafts`` ``[B]``; ``draft_probs`` ``[B, K, V]`` the
    distributions the drafts were sampled from, or None when every proposer is deterministic.
    A ``[V]`` row of zeros (a deterministic proposer in a batch with a draft model) is read as
    one-hot on its draft token too. ``target_probs`` ``[B, K + 1, V]`` is already processed
    (temperature, top-k, top-p, min-p) by the caller. Row ``b`` draws ``num_drafts[b]``
    acceptance uniforms from ``accept_generators[b]`` and one multinomial sample (its
    recovered or bonus token) from ``sample_generators[b]``, and nothing else, so its output
    does not depend on the other rows. The streams must be independent of the one the drafts
    were sampled from: acceptance is lossless only for a uniform independent of the draft.
    """
    _check_drafts(draft_ids, num_drafts)
    assert target_probs.ndim == 3, "target_probs must be [B, K + 1, V]"
    batch, k = draft_ids.shape
    vocab = target_probs.shape[-1]
    assert target_probs.shape[:2] == (batch, k + 1), "target_probs must be [B, K + 1, V]"
    if draft_probs is not None:
        assert draft_probs.ndim == 3, "draft_probs must be [B, K, V]"
        assert draft_probs.shape == (batch, k, vocab), "draft_probs must be [B, K, V]"
        draft_probs = draft_probs.float()  # [B, K, V]
    assert len(accept_generators) == len(sample_generators) == batch, "generators per row"
    device = target_probs.device
    draft_ids, num_drafts = draft_ids.to(device), num_drafts.to(device)
    target_probs = target_probs.float()  # [B, K + 1, V]
    token_ids = draft_ids.clamp(min=0)  # [B, K]; placeholders read token 0, masked out below

    p_target, p_draft, one_hot = _probs_of_drafts(token_ids, draft_probs, target_probs)
    uniforms, noise = _draw(  # [B, K], [B, V]
        num_drafts, k, vocab, accept_generators, sample_generators, device
    )
    # u < p_t / p_d, written without the division: a token the target rules out (p_t = 0) is
    # never accepted, even with u = 0.
    accepted = (uniforms * p_draft < p_target) & _in_proposal(num_drafts, k)  # [B, K]
    num_accepted = _prefix_length(accepted)  # [B]

    final_probs = _final_distribution(  # [B, V]
        target_probs, draft_probs, one_hot, token_ids, num_accepted, num_drafts
    )
    # argmax(p / Exp(1) noise) is a multinomial draw from normalize(p): exactly what
    # torch.multinomial(p, 1) computes, done here for all rows at once.
    final_ids = (final_probs / noise).argmax(-1)  # [B]

    prefix = torch.arange(k, device=device)[None, :] < num_accepted[:, None]  # [B, K]
    output_ids = torch.full((batch, k + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    output_ids[:, :k] = torch.where(prefix, draft_ids.long(), PLACEHOLDER_TOKEN_ID)
    output_ids[torch.arange(batch, device=device), num_accepted] = final_ids
    return VerifyResult(output_ids, num_accepted)


def _probs_of_drafts(
    token_ids: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, K]`` each: p_target(draft), p_draft(draft), and whether the draft is one-hot."""
    k = token_ids.shape[1]
    p_target = target_probs[:, :k].gather(-1, token_ids[..., None]).squeeze(-1)  # [B, K]
    if draft_probs is None:
        one_hot = torch.ones_like(token_ids, dtype=torch.bool)  # [B, K]
        return p_target, torch.ones_like(p_target), one_hot
    one_hot = draft_probs.sum(-1) == 0  # [B, K]
    p_draft = draft_probs.gather(-1, token_ids[..., None]).squeeze(-1)  # [B, K]
    return p_target, torch.where(one_hot, 1.0, p_draft), one_hot


def _final_distribution(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    one_hot: torch.Tensor,
    token_ids: torch.Tensor,
    num_accepted: torch.Tensor,
    num_drafts: torch.Tensor,
) -> torch.Tensor:
    """``[B, V]``, unnormalized: the recovered token's residual distribution on rejection,
    the target's distribution after the last draft (the bonus token) otherwise."""
    batch, k = token_ids.shape
    rows = torch.arange(batch, device=target_probs.device)  # [B]
    last_target = target_probs[rows, num_accepted]  # [B, V]
    if k == 0:
        return last_target
    at = num_accepted.clamp(max=k - 1)  # [B]; the first rejected position, if any
    last_draft = (  # [B, V]
        torch.zeros_like(last_target) if draft_probs is None else draft_probs[rows, at].clone()
    )
    # One-hot rows are all zeros here (None or the zero-row convention): put the one in.
    last_draft[rows, token_ids[rows, at]] += one_hot[rows, at].float()
    last_draft *= (num_accepted < num_drafts)[:, None]  # nothing to subtract for the bonus
    residual = (last_target - last_draft).clamp(min=0.0)  # [B, V]
    # p_t <= p_d everywhere means p_t == p_d: rejection had probability 0 and only rounding
    # got here, so the target itself is the right distribution.
    degenerate = residual.sum(-1, keepdim=True) <= 0  # [B, 1]
    return torch.where(degenerate, last_target, residual)  # [B, V]


def _check_drafts(draft_ids: torch.Tensor, num_drafts: torch.Tensor) -> None:
    assert draft_ids.ndim == 2, "draft_ids must be [B, K]"
    assert num_drafts.ndim == 1, "num_drafts must be [B]"
    assert num_drafts.shape[0] == draft_ids.shape[0], "one num_drafts per row"
    if num_drafts.numel():
        assert 0 <= int(num_drafts.min()) <= int(num_drafts.max()) <= draft_ids.shape[1]


def _in_proposal(num_drafts: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K]``: True where the slot holds one of the row's drafts."""
    positions = torch.arange(k, device=num_drafts.device)  # [K]
    return positions[None, :] < num_drafts[:, None]  # [B, K]


def _prefix_length(ok: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool -> ``[B]`` int64: how many leading slots are True."""
    return ok.long().cumprod(dim=1).sum(dim=1)  # [B]


def _draw(
    num_drafts: torch.Tensor,
    k: int,
    vocab: int,
    accept_generators: Sequence[torch.Generator],
    sample_generators: Sequence[torch.Generator],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``b``'s uniforms for its drafts, and the Exp(1) noise of its one multinomial draw.

    Only the row's own generators are used: seeded output is reproducible and independent of
    the batch. Rows without drafts draw no uniforms, and their one draw is the same as plain
    sampling's ``torch.multinomial`` with the same sample generator.
    """
    batch = len(sample_generators)
    uniforms = torch.ones(batch, k, device=device)  # [B, K]; unused slots masked
    noise = torch.empty(batch, vocab, device=device)  # [B, V]
    rows = zip(num_drafts.tolist(), accept_generators, sample_generators, strict=True)
    for b, (n, accept_gen, sample_gen) in enumerate(rows):
        if n:
            uniforms[b, :n] = torch.rand(n, generator=accept_gen, device=device)
        noise[b].exponential_(generator=sample_gen)
    return uniforms, noise
