"""Rollback by position, batches of different lengths, and k-token vs single-step forwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specserve.model.loader import Model
from specserve.model.transformer import ForwardBatch

SPEC_BENCH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
)


def _forward(model: Model, cache, tokens: list[int], start: int, slot: int = 0) -> torch.Tensor:
    return model.lm(ForwardBatch(torch.tensor([tokens]), [slot], [start]), cache)[0]


def test_rollback_then_reforward_gives_identical_logits(tiny_model: Model) -> None:
    cache = tiny_model.lm.new_cache()
    prompt = list(range(10, 30))
    _forward(tiny_model, cache, prompt, 0)
    first = _forward(tiny_model, cache, [40, 41, 42, 43], len(prompt))
    _forward(tiny_model, cache, [99, 98, 97, 96, 95, 94], len(prompt))  # a rejected draft
    again = _forward(tiny_model, cache, [40, 41, 42, 43], len(prompt))  # rollback = same start
    assert torch.equal(first, again)


def test_batch_of_different_lengths_equals_each_alone(tiny_model: Model) -> None:
    prompts = [list(range(5, 25)), list(range(50, 57)), list(range(100, 112))]
    alone = []
    for prompt in prompts:
        cache = tiny_model.lm.new_cache()
        _forward(tiny_model, cache, prompt, 0)
        alone.append(_forward(tiny_model, cache, [7, 8, 9], len(prompt)))
    cache = tiny_model.lm.new_cache(num_slots=4)
    for slot, prompt in zip([2, 0, 3], prompts, strict=True):
        _forward(tiny_model, cache, prompt, 0, slot)
    batch = ForwardBatch(torch.tensor([[7, 8, 9]] * 3), [2, 0, 3], [len(p) for p in prompts])
    together = tiny_model.lm(batch, cache)
    for b in range(3):
        torch.testing.assert_close(together[b], alone[b], atol=1e-4, rtol=1e-4)


def _real_prompts(model: Model, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()[:: 480 // count]]
    return [
        model.tokenizer.encode_chat([{"role": "user", "content": row["turns"][0]}])
        for row in rows[:count]
    ]


@pytest.mark.slow
def test_k_token_forward_matches_single_steps_on_smollm2(smollm2: Model) -> None:
    """Speculative output equals plain output only if a k-token verify forward computes what
    k single-token steps compute. Checked for k = 1..16 in the default format on real prompts
    of many lengths (so verify windows cross the attention's 64-position blocks): the logits
    must be bit-identical, not merely agree on the argmax."""
    identical = agree = total = 0
    for prompt in _real_prompts(smollm2, 8):
        cache = smollm2.lm.new_cache(max_len=len(prompt) + 64)
        logits = _forward(smollm2, cache, prompt, 0)
        tokens = [int(logits[-1].argmax())]
        single = []  # the reference: greedy continuation one token at a time
        for i in range(16):
            single.append(_forward(smollm2, cache, [tokens[-1]], len(prompt) + i)[-1])
            tokens.append(int(single[-1].argmax()))
        for k in range(1, 17):
            multi = _forward(smollm2, cache, tokens[:k], len(prompt))
            for row, ref in zip(multi, single[:k], strict=True):
                identical += torch.equal(row, ref)
                agree += int(row.argmax()) == int(ref.argmax())
                total += 1
    print(
        f"k-token vs single steps over {total} positions: {identical} bit-identical logits, "
        f"{agree} equal argmax"
    )
    assert identical == total
