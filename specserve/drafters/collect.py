"""Self-distillation data: the target answers the prompts, then its features are recorded.

1. The target generates a greedy response to every prompt (the continuous-batching engine,
   run in this thread), so the head learns what the target itself writes.
2. One forward over prompt + response per conversation records the target's features (last
   hidden states) and its argmax prediction at every position: the head's inputs and labels.

The result is cached in safetensors (``data.safetensors`` next to the checkpoints), so a
resumed run does not generate again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specserve.drafters.training import TrainingSequence
from specserve.engine.result import GenerationResult
from specserve.engine.sampling import SamplingParams
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model
from specserve.model.transformer import ForwardBatch
from specserve.tune.runner import TunePrompt

DATA_FILE = "data.safetensors"


def generate_responses(
    model: Model, prompts: Sequence[TunePrompt], max_tokens: int, batch: int = 8
) -> list[list[int]]:
    """prompt + greedy response ids for every prompt (in order)."""
    engine = Engine(model, max_batch=batch, max_queue=len(prompts), start=False)
    params = SamplingParams(max_tokens=max_tokens)
    outputs: dict[int, list[int]] = {}
    bar = tqdm(total=len(prompts), desc="generating responses", unit="prompt")
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = prompt.token_ids(model)[: engine.context_limit - max_tokens]
        encoded.append(ids)

        def done(
            result: GenerationResult | None, error: BaseException | None, index: int = index
        ) -> None:
            if error is not None:
                raise error
            assert result is not None
            outputs[index] = result.token_ids
            bar.update()

        engine.submit(ids, params, lambda piece: None, done)
    while len(outputs) < len(prompts):
        engine.step()
    engine.stop()
    engine.step()
    bar.close()
    return [encoded[i] + outputs[i] for i in range(len(prompts))]


def record_features(
    model: Model, conversations: Sequence[list[int]], loss_from: Sequence[int]
) -> list[TrainingSequence]:
    """The target's features and argmax predictions at every position of each conversation."""
    sequences = []
    for ids, start in tqdm(
        list(zip(conversations, loss_from, strict=True)), desc="recording features", unit="conv"
    ):
        cache = model.lm.new_cache(1, len(ids))
        batch = ForwardBatch(torch.tensor([ids]), [0], [0])
        logits, features = model.lm.forward_with_features(batch, cache)
        sequences.append(
            TrainingSequence(
                features=features[0].to(torch.bfloat16),
                tokens=torch.tensor(ids),
                target_next=logits[0].argmax(-1),
                loss_from=start,
            )
        )
    return sequences


def save_data(path: Path, sequences: Sequence[TrainingSequence], meta: dict[str, str]) -> None:
    lengths = [len(s.tokens) for s in sequences]
    tensors = {
        "features": torch.cat([s.features.to(torch.bfloat16) for s in sequences]),
        "tokens": torch.cat([s.tokens for s in sequences]),
        "target_next": torch.cat([s.target_next for s in sequences]),
        "lengths": torch.tensor(lengths),
        "loss_from": torch.tensor([s.loss_from for s in sequences]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_data(path: Path, meta: dict[str, str]) -> list[TrainingSequence] | None:
    """The cached data if it was collected for the same target and prompts, else None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        stored = json.loads((handle.metadata() or {}).get("meta", "{}"))
    if stored != meta:
        return None
    tensors = load_file(str(path))
    sequences, offset = [], 0
    for length, start in zip(
        tensors["lengths"].tolist(), tensors["loss_from"].tolist(), strict=True
    ):
        end = offset + length
        sequences.append(
            TrainingSequence(
                features=tensors["features"][offset:end],
                tokens=tensors["tokens"][offset:end],
                target_next=tensors["target_next"][offset:end],
                loss_from=start,
            )
        )
        offset = end
    return sequences
