"""Assertions that speculation really ran: counted by the verifier, not by text alignment.

An "identical to plain" test proves nothing if the length tuner or the engine's guard quietly
turned drafting off; these read the verifier's own counters and the engine's step records.
"""

from __future__ import annotations

from typing import Any

from specserve.engine.job import StepRecord
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine


def assert_engaged(result: GenerationResult, *methods: str) -> None:
    """Each method proposed drafts and had some accepted; steps emitted > 1 token on average."""
    assert_engaged_stats(result.stats.as_dict(), *methods)


def assert_engaged_overall(results: list[GenerationResult], *methods: str) -> None:
    """``assert_engaged`` over several requests together (some may never have drafted)."""
    for method in methods:
        counts = [r.stats.by_method[method] for r in results if method in r.stats.by_method]
        proposed, accepted = sum(c.proposed for c in counts), sum(c.accepted for c in counts)
        assert proposed > 0 and accepted > 0, (method, proposed, accepted)
    assert sum(r.stats.generated for r in results) > sum(r.stats.target_steps for r in results)


def assert_engaged_stats(stats: dict[str, Any], *methods: str) -> None:
    """The same, on ``SpecStats.as_dict()`` (what API usage reports as ``speculation``)."""
    for method in methods:
        counts = stats["by_method"].get(method)
        assert counts is not None, f"{method} never proposed: {stats}"
        assert counts["proposed"] > 0 and counts["accepted"] > 0, (method, counts)
    assert stats["tokens_per_step"] > 1.0, stats


class StepLog:
    """Collects an engine's step records (attach before submitting)."""

    def __init__(self, engine: Engine) -> None:
        self.records: list[StepRecord] = []
        engine.stats.step_listeners.append(self.records.append)

    def assert_batched_drafts(self) -> None:
        """At least one decode step verified drafts for several rows in one forward: its
        width (tokens per row) was above 1 with two or more rows."""
        assert any(
            r.kind == "decode" and r.batch_size >= 2 and r.tokens > r.batch_size
            for r in self.records
        ), [(r.kind, r.batch_size, r.tokens) for r in self.records]

    def assert_packed_rows(self) -> None:
        """At least one decode step packed rows of different lengths (no padding computed)."""
        assert any(
            r.kind == "decode" and r.packed and r.tokens % r.batch_size for r in self.records
        ), [(r.kind, r.batch_size, r.tokens, r.packed) for r in self.records]
