"""A readable speculative step for one sequence: the oracle the engine is tested against.

No batching, no tensors of proposals, no tuning: propose -> one target forward over
``[last token, drafts...]`` -> accept or reject each draft in a plain loop.
"""

from __future__ import annotations

import torch

from specserve.engine.sampling import SamplingParams, target_probs
from specserve.model.kv_cache import KVCache
from specserve.model.transformer import CausalLM, ForwardBatch


def reference_step(
    lm: CausalLM,
    cache: KVCache,
    all_ids: list[int],
    drafts: list[int],
    draft_probs: torch.Tensor | None,  # [k, V], None for deterministic proposers
    params: SamplingParams,
    generator: torch.Generator,
) -> list[int]:
    """Return the tokens this step emits: the accepted drafts, then a recovered or bonus token.

    ``all_ids[-1]`` is the last token, not yet in ``cache``; everything before it is.
    """
    feed = torch.tensor([[all_ids[-1], *drafts]])
    logits = lm(ForwardBatch(feed, [0], [len(all_ids) - 1]), cache)[0]  # [k + 1, V]
    probs = target_probs(logits, params)  # [k + 1, V]; one-hot rows when greedy
    emitted: list[int] = []
    for i, token in enumerate(drafts):
        if params.greedy:
            best = int(logits[i].argmax())
            emitted.append(best)
            if best != token:
                return emitted  # the recovered token
            continue
        # Leviathan et al.: accept with min(1, p/q); else resample from max(0, p - q).
        q = torch.zeros_like(probs[i])
        if draft_probs is None:
            q[token] = 1.0
        else:
            q = draft_probs[i]
        u = float(torch.rand(1, generator=generator))
        if u < min(1.0, float(probs[i, token] / q[token])):
            emitted.append(token)
            continue
        residual = (probs[i] - q).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:
            residual = probs[i]
        emitted.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return emitted  # the recovered token
    last = probs[len(drafts)]
    bonus = (
        int(last.argmax())
        if params.greedy
        else int(torch.multinomial(last, 1, generator=generator))
    )
    emitted.append(bonus)
    return emitted
