"""A readable speculative step for one sequence: the oracle the engine is tested against.

No batching, no tensors of proposals, no tuning: propose -> one target forward over
``[last token, drafts...]`` -> accept or reject each draft in a plain loop.
"""

from __future__ import annotations

import torch

from specserve.model.kv_cache import KVCache
from specserve.model.transformer import CausalLM, ForwardBatch
from specserve.speculative.sampling import SamplingParams, target_probs


def reference_step(
    lm: CausalLM,
    cache: KVCache,
    all_ids: list[int],
    drafts: list[int],
    draft_probs: torch.Tensor | None,  # [k, V], None for deterministic proposers
    params: SamplingParams,
    accept_gen: torch.Generator,
    sample_gen: torch.Generator,
) -> list[int]:
    """Return the tokens this step emits: the accepted drafts, then a recovered or bonus token.

    ``all_ids[-1]`` is the last token, not yet in ``cache``; everything before it is. The
    acceptance uniforms come from ``accept_gen``, the recovered or bonus token from
    ``sample_gen`` (the request's streams of those purposes), consumed as the engine does.
    """
    feed = torch.tensor([[all_ids[-1], *drafts]])
    logits = lm(ForwardBatch(feed, [0], [len(all_ids) - 1]), cache)[0]  # [k + 1, V]
    probs = target_probs(logits, params)  # [k + 1, V]; one-hot rows when greedy
    if params.greedy:
        for i, token in enumerate(drafts):
            if int(logits[i].argmax()) != token:
                return [*drafts[:i], int(logits[i].argmax())]  # the recovered token
        return [*drafts, int(logits[len(drafts)].argmax())]  # the bonus token
    # One uniform per draft, drawn up front (as the engine draws them) even if unused.
    uniforms = torch.rand(len(drafts), generator=accept_gen) if drafts else torch.empty(0)
    for i, token in enumerate(drafts):
        # Leviathan et al.: accept with min(1, p/q); else resample from max(0, p - q).
        q = torch.zeros_like(probs[i])
        if draft_probs is None:
            q[token] = 1.0  # a deterministic proposer: one-hot on its draft
        else:
            q = draft_probs[i]
        if bool(uniforms[i] * q[token] < probs[i, token]):  # u < p / q, without dividing
            continue
        residual = (probs[i] - q).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:
            residual = probs[i]
        recovered = int(torch.multinomial(residual / residual.sum(), 1, generator=sample_gen))
        return [*drafts[:i], recovered]
    bonus = int(torch.multinomial(probs[len(drafts)], 1, generator=sample_gen))
    return [*drafts, bonus]
