"""Self-distillation data: the target answers the prompts, then its features are recorded.

The target generates a greedy response to every prompt (the continuous-batching engine,
run in this thread), so the head learns what the target itself writes; the engine keeps the
features (last hidden states) its forwards computed: the head's inputs; the tokens the target
chose are its labels.

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
from specserve.engine.prompt_file import PromptRecord
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import PADDING_ROOM, Engine
from specserve.model.loader import Model
from specserve.speculative.limits import MAX_DRAFT_TOKEN_COUNT
from specserve.speculative.sampling import SamplingParams

DATA_FILE = "data.safetensors"
DATA_VERSION = "2"  # features recorded during generation, loss_from = the prompt's length


def self_distill(
    model: Model, prompts: Sequence[PromptRecord], max_tokens: int, batch: int = 8
) -> list[TrainingSequence]:
    """The target's greedy answer to every prompt (in order), with the features it computed
    on the way: one training sequence per conversation, the prompt as context only.

    Features come from the generation's own forwards (prefill chunks and decode steps), so
    no second pass over the conversations is needed. The labels of answer positions are the
    tokens the target chose greedily, i.e. its argmax. Only answers count in the loss: on
    prompt positions a head learned an easy task (0.8 accuracy) that never drafts, while its
    accuracy on answers, the real task, stayed at 0.3 (measured).
    """
    # the context the engine serves (its reserve for padding and drafts), less the answer
    room = model.max_context - PADDING_ROOM - MAX_DRAFT_TOKEN_COUNT - max_tokens - 1
    if room < 1:
        raise ValueError(f"--max-tokens {max_tokens} leaves no room for a prompt")
    encoded = [prompt.token_ids(model)[:room] for prompt in prompts]
    # A KV cache as long as the longest conversation, not the model's whole context.
    longest = max(len(ids) for ids in encoded) + max_tokens + 1
    engine = Engine(model, batch, max_context=longest, max_queue=len(prompts), start=False)
    params = SamplingParams(max_tokens=max_tokens)
    results: dict[int, GenerationResult] = {}
    bar = tqdm(total=len(prompts), desc="generating answers", unit="prompt")
    for index, ids in enumerate(encoded):

        def done(
            result: GenerationResult | None, error: BaseException | None, index: int = index
        ) -> None:
            if error is not None:
                raise error
            assert result is not None
            results[index] = result
            bar.update()

        engine.submit(ids, params, lambda piece: None, done, record_features=True)
    while len(results) < len(prompts):
        engine.step()
    engine.stop()
    engine.step()
    bar.close()
    sequences = []
    for index, prompt_ids in enumerate(encoded):
        result = results[index]
        assert result.features is not None
        conversation = torch.tensor(prompt_ids + result.token_ids)
        positions = result.features.shape[0]  # all but the last token, never forwarded
        sequences.append(
            TrainingSequence(
                features=result.features,
                tokens=conversation[:positions],
                target_next=conversation[1 : positions + 1],  # the prompt's own labels never count
                loss_from=min(len(prompt_ids), positions - 1),
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
