"""One forward of a prompt's prefill, shared by `generate` and the engine.

The last chunk may also verify the first drafts of a request's prediction: instead of
ending at the last prompt token and picking the first output token from its logits, it
carries ``[last prompt token, *drafts]`` (`Sequence.first_feed`) and verifies them from the
logits of those positions, exactly as a decode step verifies its feed. An apply request
then saves the forward of its first step: the drafts cost the chunk only their own rows,
never another pass over the weights. Lossless as any step: each row's result does not
depend on what else the forward computes (the runtime's batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.engine.sequence import Sequence
from specserve.model.kv_cache import KVCache
from specserve.model.transformer import CausalLM, ForwardBatch


@dataclass
class PrefillChunk:
    """What one chunk's forward gave: prompt positions ``start..end`` and, on the last
    chunk, the feed it verified (None: the chunk ended at the prompt's last token)."""

    start: int
    end: int
    feed: list[int] | None
    logits: torch.Tensor  # [len(feed) or 1, V]: from the last prompt position on
    features: torch.Tensor  # [T, C]: every position the chunk computed

    @property
    def prompt_features(self) -> torch.Tensor:
        """Features of the chunk's prompt positions (``end - start`` rows)."""
        return self.features[: self.end - self.start]

    @property
    def last_prompt_logits(self) -> torch.Tensor:
        """Logits ``[V]`` of the prompt's last position (the chunk's first logits row)."""
        return self.logits[0]

    def output_features(self, seq: Sequence) -> torch.Tensor:
        """Features of the output positions whose KV the verified feed wrote for good (the
        accepted drafts; `Sequence.start_verified` emitted them and a last token)."""
        kept = max(len(seq.out) - 1, 0) if self.feed is not None else 0
        first = self.end - self.start
        return self.features[first : first + kept]


def prefill_chunk(
    lm: CausalLM,
    cache: KVCache,
    slot: int,
    seq: Sequence,
    start: int,
    end: int,
    drafts: bool = True,
) -> PrefillChunk:
    """Forward prompt positions ``start..end`` of ``seq`` into ``slot`` of ``cache`` and
    hand their features to it. The last chunk carries the prediction's first drafts when
    ``drafts`` is set and it has any; `start_sequence` then verifies them."""
    last = end == len(seq.prompt_ids)
    feed = seq.first_feed() if last and drafts else None
    ids = seq.prompt_ids[start:end]
    if feed is not None:
        ids = ids[:-1] + feed  # feed[0] is the last prompt token
    batch = ForwardBatch(torch.tensor([ids]), [slot], [start])
    rows = len(feed) if feed is not None else 1
    logits, features = lm.forward_with_features(batch, cache, last_logits=rows)
    chunk = PrefillChunk(start, end, feed, logits[0], features[0])
    prompt = chunk.prompt_features
    # The feed's first row (the last prompt position) reaches the sequence with the feed.
    seq.add_prompt_features(start, prompt if feed is None else prompt[:-1])
    return chunk


def start_sequence(seq: Sequence, chunk: PrefillChunk) -> str:
    """After the last chunk: the first token(s), and the text that became safe to stream."""
    if chunk.feed is None:
        return seq.start(chunk.last_prompt_logits)
    feed_rows = chunk.features[chunk.end - chunk.start - 1 :]
    return seq.start_verified(chunk.logits, feed_rows)
