"""The generation loop for one request: prefill, then speculative (or plain) decode steps.

This is the batch-of-one driver (CLI, benchmarks, tests); the server's ``Engine`` runs the
same ``Sequence`` steps for many requests in one forward. Each step is the one of
``specserve/speculative/reference.py``, the readable oracle the tests hold the engine to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Ids

import torch

from specserve.engine.prefill import PrefillChunk, prefill_chunk, start_sequence
from specserve.engine.result import GenerationResult
from specserve.engine.sequence import Sequence, check_prompt
from specserve.model.kv_cache import KVCache
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.sampling import SamplingParams

__all__ = ["GenerationResult", "check_prompt", "generate"]


def generate(
    model: Model,
    prompt_ids: Ids[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
    speculation: SpeculationConfig = PLAIN,
    prediction_ids: Ids[int] | None = None,
    costs: StepCosts | None = None,
    prefix_cache: PrefixCache | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt_ids``: speculative when ``speculation`` has a
    drafter or a prediction is given.

    Greedy output is identical to plain decoding token for token; sampled output has the
    target's distribution (the verifier is lossless). ``costs`` lets requests of one model
    share their measured step costs; ``prefix_cache`` their prompts' KV (the prefill starts
    after the longest prefix it holds, and the prompt is kept there afterwards).
    """
    seq = Sequence(model, prompt_ids, params, speculation, prediction_ids, costs)
    cache = model.lm.new_cache(1, seq.max_len)
    lm = model.lm
    piece = start_sequence(seq, _prefill(model, seq, cache, prefix_cache))
    while True:
        if on_text and piece:
            on_text(piece)
        if seq.done:
            return seq.result()
        feed = seq.next_feed()
        began = time.perf_counter()
        batch = ForwardBatch(torch.tensor([feed]), [0], [seq.position])
        logits, features = lm.forward_with_features(batch, cache)
        seq.costs.observe(len(feed), time.perf_counter() - began)
        piece = seq.accept(logits[0], features[0])


def _prefill(
    model: Model, seq: Sequence, cache: KVCache, prefix_cache: PrefixCache | None
) -> PrefillChunk:
    """The prompt into slot 0 of ``cache`` (after the prefix cache's longest hit, if any)
    in one chunk, which verifies the prediction's first drafts too (engine/prefill.py)."""
    hit = seq.restore_prefix(prefix_cache, cache, 0) if prefix_cache is not None else None
    start = 0 if hit is None else hit.length
    chunk = prefill_chunk(model.lm, cache, 0, seq, start, len(seq.prompt_ids))
    if prefix_cache is not None:
        kept = chunk.prompt_features
        kept = kept if hit is None else torch.cat([hit.features, kept])
        prefix_cache.store(seq.prompt_ids, cache, 0, kept)
    return chunk
