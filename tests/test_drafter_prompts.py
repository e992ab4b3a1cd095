"""The shipped drafter's training prompts never come from the evaluation sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from specserve.drafters.prompts import synthetic_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHINGLE = 7  # words: a shared run this long would mean copied text


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def _evaluation_texts() -> list[str]:
    texts = []
    for line in (SHARED / "spec_bench" / "question.jsonl").read_text().splitlines():
        texts.extend(json.loads(line)["turns"])
    for line in (SHARED / "humanevalfix" / "humanevalpack_python.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts.extend([row["prompt"], row["instruction"], row["docstring"], row["buggy_solution"]])
    return texts


def test_training_prompts_share_no_text_with_evaluation_sets() -> None:
    prompts = synthetic_prompts(1200)  # the shipped drafter's count
    assert len(prompts) == 1200 and prompts == synthetic_prompts(1200)  # deterministic
    texts = [p["messages"][0]["content"] for p in prompts]  # type: ignore[index]
    assert len(set(texts)) > 1000  # varied, not one prompt repeated
    evaluation = _evaluation_texts()
    assert len(evaluation) > 1000
    exact = set(evaluation)
    assert not [t for t in texts if t in exact]
    seen: set[tuple[str, ...]] = set()
    for text in evaluation:
        seen |= _shingles(text)
    overlapping = [t for t in texts if _shingles(t) & seen]
    assert not overlapping, overlapping[:3]
