"""What `specserve tune` measures: the candidates, and one record per candidate and prompt.

These are plain data with no torch in them, so the analysis (`ranking`) and the report
(`report`) can be tested on synthetic numbers and re-run on a saved ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.deployments.rules import DrafterFlags

METHODS = (None, "ngram", "draft_model")


@dataclass(frozen=True)
class Candidate:
    """One speculation setting to measure.

    The fields mirror the CLI flags, so a winner can be deployed exactly as measured.
    """

    name: str  # unique display name, e.g. "plain", "ngram n=3 k<=4"
    method: str | None  # None (plain decoding), "ngram" or "draft_model"
    draft_token_count: int = 0  # the k bound (0 for plain)
    ngram_length: int | None = None
    draft_model: str | None = None
    is_default: bool = False  # the model's default drafter (as a deployment gets it)

    def __post_init__(self) -> None:
        # Checked here so that a malformed candidate fails when it is made, not as a
        # confusing flag error after minutes of measuring.
        if self.method not in METHODS:
            raise ValueError(f"candidate {self.name!r}: unknown method {self.method!r}")
        if self.method == "ngram" and self.ngram_length is None:
            raise ValueError(f"candidate {self.name!r}: method 'ngram' needs ngram_length")
        if self.method == "draft_model" and not self.draft_model:
            raise ValueError(f"candidate {self.name!r}: method 'draft_model' needs draft_model")
        if self.method is not None and self.draft_token_count < 1:
            raise ValueError(f"candidate {self.name!r}: draft_token_count must be >= 1")

    @property
    def is_plain(self) -> bool:
        """True for plain decoding, the baseline every speedup is relative to."""
        return self.method is None

    def flags(self) -> DrafterFlags:
        """The drafter flags that deploy this setting.

        The default drafter is spelled out too: explicit flags keep a deployment on the
        measured setting even if the model's default changes in a later release.
        """
        if self.method is None:
            return DrafterFlags(no_speculation=True)
        if self.method == "ngram":
            return DrafterFlags(
                ngram_speculation_length=self.ngram_length,
                draft_token_count=self.draft_token_count,
            )
        return DrafterFlags(draft_model=self.draft_model, draft_token_count=self.draft_token_count)

    def cli_flags(self) -> str:
        """The flags as typed, e.g. ``--ngram-speculation-length 3 --draft-token-count 4``."""
        return self.flags().as_cli()


@dataclass
class Measurement:
    """One candidate on one prompt (greedy)."""

    candidate: str  # Candidate.name
    prompt_index: int
    tokens: int  # generated tokens
    decode_seconds: float  # first token -> last
    total_seconds: float  # submission -> last token (prefill included)
    target_steps: int
    proposed: int
    accepted: int
    proposed_per_position: list[int]  # drafts proposed at draft position 1, 2, ...
    accepted_per_position: list[int]  # of those, accepted by the target
    identical_to_plain: bool  # output tokens equal plain's on this prompt
    first_tokens: int = 1  # out with the first token (more when the prefill verified drafts)


@dataclass
class ThroughputPoint:
    """Aggregate throughput of one candidate with several sequences decoding at once."""

    candidate: str
    concurrency: int
    tokens_per_second: float  # generated tokens / wall seconds at this concurrency
