"""The shipped drafters' training prompts never come from the evaluation sets."""

from __future__ import annotations

import json
import re

from specserve.drafters.cli import PROMPTS_FILE
from specserve.drafters.prompts import synthetic_prompts
from specserve.engine.prompt_file import load_prompts
from specserve.model.catalog import SHIPPED_DRAFTERS
from tests.paths import SHARED_DATA

SHARED = SHARED_DATA
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


def _copied(texts: list[str]) -> list[str]:
    """The texts that equal an evaluation text or share a 7-word run with one."""
    evaluation = _evaluation_texts()
    assert len(evaluation) > 1000
    seen: set[tuple[str, ...]] = set()
    for text in evaluation:
        seen |= _shingles(text)
    exact = set(evaluation)
    return [t for t in texts if t in exact or _shingles(t) & seen]


def test_built_in_prompts_share_no_text_with_evaluation_sets() -> None:
    prompts = synthetic_prompts(1200)
    assert len(prompts) == 1200 and prompts == synthetic_prompts(1200)  # deterministic
    texts = [p["messages"][0]["content"] for p in prompts]  # type: ignore[index]
    assert len(set(texts)) > 1000  # varied, not one prompt repeated
    overlapping = _copied(texts)
    assert not overlapping, overlapping[:3]


def test_shipped_drafters_record_prompts_that_share_no_text_with_evaluation_sets() -> None:
    """What each drafter recorded as trained on, whatever produced it (not only the generator)."""
    records = sorted(SHIPPED_DRAFTERS.glob(f"*/{PROMPTS_FILE}"))
    assert records, "every shipped drafter records its training prompts"
    for record in records:
        prompts = load_prompts(record)
        texts = [m["content"] for p in prompts for m in p.messages or []]
        assert len(texts) == len(prompts) >= 1000
        overlapping = _copied(texts)
        assert not overlapping, (record, overlapping[:3])
