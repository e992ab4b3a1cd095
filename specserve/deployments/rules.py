"""The product's speculation flag rules, in one place, and the drafter they add up to.

Everybody who accepts drafter flags (``specserve deployment create/update``, the server,
``specserve generate``) calls `check_drafter_flags`, so one rule has one wording, and
`effective_drafter` says what a deployment really runs with:

>>> effective_drafter("gemma-3-270m", DrafterFlags()).describe()
'ngram n=3, up to 4 draft tokens (default)'
>>> check_drafter_flags(DrafterFlags(draft_token_count=4))  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
DeploymentError: --draft-token-count needs --draft-model or --ngram-speculation-length
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specserve.deployments.errors import DeploymentError
from specserve.deployments.vocab import fallback_drafter_for
from specserve.model.catalog import CATALOG, DefaultDrafter
from specserve.speculative.limits import MAX_DRAFT_TOKEN_COUNT, MAX_NGRAM_LENGTH

# Where an effective drafter came from (shown next to it in `deployment list/get`).
SOURCES = {
    "configured": "set with drafter flags on this deployment",
    "default": "the model's default drafter (no drafter configured)",
    "fallback": "the fallback drafter of the model's family (same tokenizer, smaller model)",
    "disabled": "speculation turned off with --no-speculation",
}
# The drafter of models without a catalog entry or a family fallback: prompt lookup costs no
# model and pays on code and rewrites, where the output repeats the prompt.
GENERIC_DEFAULT_DRAFTER = DefaultDrafter(method="ngram", draft_token_count=4, ngram_length=3)
FALLBACK_DRAFT_TOKEN_COUNT = 4  # tokens a family fallback drafter proposes per step
# Replicas (`specserve serve --ray`). A replica's engine batches up to --max-batch (8)
# sequences, and each extra row makes a step dearer, so scaling out starts at half a batch.
DEFAULT_TARGET_ONGOING_REQUESTS = 4.0
MAX_REPLICAS = 256  # a typo guard, far above any cluster this is meant for


@dataclass(frozen=True)
class DrafterFlags:
    """The speculation flags as the user typed them (None / False: not given)."""

    draft_model: str | None = None
    draft_token_count: int | None = None
    ngram_speculation_length: int | None = None
    no_speculation: bool = False

    def is_empty(self) -> bool:
        """True when no drafter is configured: the model's default drafter applies."""
        return self == DrafterFlags()

    def as_cli(self) -> str:
        """The flags spelled as on the command line, e.g. ``--draft-token-count 4``."""
        parts = []
        if self.draft_model is not None:
            parts.append(f"--draft-model {self.draft_model}")
        if self.ngram_speculation_length is not None:
            parts.append(f"--ngram-speculation-length {self.ngram_speculation_length}")
        if self.draft_token_count is not None:
            parts.append(f"--draft-token-count {self.draft_token_count}")
        if self.no_speculation:
            parts.append("--no-speculation")
        return " ".join(parts)


def check_drafter_flags(flags: DrafterFlags) -> None:
    """Raise `DeploymentError` naming the first flag rule that ``flags`` break."""
    draft, ngram, count = flags.draft_model, flags.ngram_speculation_length, flags.draft_token_count
    if draft is not None and not draft.strip():
        raise DeploymentError("--draft-model needs a catalog name or a path")
    if draft is not None and ngram is not None:
        raise DeploymentError(
            "--draft-model and --ngram-speculation-length cannot be used together"
        )
    if flags.no_speculation and not DrafterFlags(draft, count, ngram).is_empty():
        given = DrafterFlags(draft, count, ngram).as_cli()
        raise DeploymentError(
            f"--no-speculation cannot be combined with any other speculation flag (got {given})"
        )
    chosen = draft is not None or ngram is not None
    if chosen and count is None:
        raise DeploymentError(
            "--draft-token-count is required with --draft-model or --ngram-speculation-length"
        )
    if not chosen and count is not None:
        raise DeploymentError(
            "--draft-token-count needs --draft-model or --ngram-speculation-length"
        )
    max_count, max_ngram = MAX_DRAFT_TOKEN_COUNT, MAX_NGRAM_LENGTH
    if count is not None and not 1 <= count <= max_count:
        raise DeploymentError(f"--draft-token-count must be in [1, {max_count}], got {count}")
    if ngram is not None and not 1 <= ngram <= max_ngram:
        raise DeploymentError(
            f"--ngram-speculation-length must be in [1, {max_ngram}], got {ngram}"
        )


@dataclass(frozen=True)
class EffectiveDrafter:
    """The drafter a deployment really runs with, and where it came from (see `SOURCES`)."""

    method: str | None  # "ngram", "draft_model" or None (plain decoding)
    draft_token_count: int  # 0 when method is None
    ngram_length: int | None = None
    draft_model: str | None = None  # catalog name or absolute path
    source: str = "configured"  # "configured" | "default" | "fallback" | "disabled"

    def describe(self) -> str:
        """One line for people, e.g. ``ngram n=3, up to 4 draft tokens (default)``."""
        if self.method is None:
            return f"none, plain decoding ({self.source})"
        what = f"ngram n={self.ngram_length}" if self.method == "ngram" else self.draft_model
        return f"{what}, up to {self.draft_token_count} draft tokens ({self.source})"

    def short(self) -> str:
        """The table form, e.g. ``ngram n=3 k<=4 (default)``."""
        if self.method is None:
            return f"none ({self.source})"
        what = f"ngram n={self.ngram_length}" if self.method == "ngram" else self.draft_model
        return f"{what} k<={self.draft_token_count} ({self.source})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}

    def fields(self) -> dict[str, Any]:
        """The plain fields `speculation_for_drafter` takes (the engine knows no deployments)."""
        return {
            "method": self.method,
            "draft_token_count": self.draft_token_count,
            "draft_model": self.draft_model,
            "ngram_length": self.ngram_length,
        }


def _from_default(default: DefaultDrafter, source: str) -> EffectiveDrafter:
    return EffectiveDrafter(
        method=default.method,
        draft_token_count=default.draft_token_count,
        ngram_length=default.ngram_length if default.method == "ngram" else None,
        draft_model=default.draft_model if default.method == "draft_model" else None,
        source=source,
    )


def effective_drafter(model: str, flags: DrafterFlags) -> EffectiveDrafter:
    """The drafter ``model`` runs with under ``flags`` (assumed to pass the rules).

    Configured flags win; with none, a catalog model gets its entry's default drafter, a
    local model of a known family the family's small catalog model (`FALLBACK_DRAFTERS`),
    anything else the generic n-gram drafter.
    """
    if flags.no_speculation:
        return EffectiveDrafter(method=None, draft_token_count=0, source="disabled")
    # The rules require a count with either drafter; the defaults only cover unchecked flags.
    if flags.draft_model is not None:
        count = flags.draft_token_count or FALLBACK_DRAFT_TOKEN_COUNT
        return EffectiveDrafter("draft_model", count, draft_model=flags.draft_model)
    if flags.ngram_speculation_length is not None:
        count = flags.draft_token_count or GENERIC_DEFAULT_DRAFTER.draft_token_count
        return EffectiveDrafter("ngram", count, ngram_length=flags.ngram_speculation_length)
    entry = CATALOG.get(model)
    if entry is not None:
        return _from_default(entry.default_drafter, "default")
    fallback = fallback_drafter_for(Path(model))
    if fallback is not None:
        return EffectiveDrafter(
            "draft_model", FALLBACK_DRAFT_TOKEN_COUNT, draft_model=fallback, source="fallback"
        )
    return _from_default(GENERIC_DEFAULT_DRAFTER, "default")


@dataclass(frozen=True)
class ReplicaSettings:
    """How many copies of a deployment run under ``specserve serve --ray``, and when Ray
    Serve adds one: it keeps about ``target_ongoing_requests`` requests per replica, between
    ``min_replicas`` and ``max_replicas`` (equal: a fixed count, no autoscaling).

    >>> ReplicaSettings(1, 4).describe()
    '1-4, autoscaling at 4 ongoing requests per replica (default)'
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None  # None: DEFAULT_TARGET_ONGOING_REQUESTS

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas

    @property
    def target(self) -> float:
        given = self.target_ongoing_requests
        return DEFAULT_TARGET_ONGOING_REQUESTS if given is None else given

    def describe(self) -> str:
        if not self.autoscaling:
            return f"{self.min_replicas} (fixed)"
        source = " (default)" if self.target_ongoing_requests is None else ""
        return (
            f"{self.min_replicas}-{self.max_replicas}, autoscaling at {self.target:g} ongoing "
            f"requests per replica{source}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "autoscaling": self.autoscaling}


def replica_settings(
    min_replicas: int | None, max_replicas: int | None, target: float | None
) -> ReplicaSettings:
    """The settings the flags give, checked: ``--max-replicas`` defaults to ``--min-replicas``
    (so ``--min-replicas 2`` alone means two replicas), both to 1."""
    low = 1 if min_replicas is None else min_replicas
    high = max(low, 1) if max_replicas is None else max_replicas
    settings = ReplicaSettings(low, high, target)
    check_replicas(settings)
    return settings


def check_replicas(settings: ReplicaSettings) -> None:
    """Raise `DeploymentError` naming the first replica rule ``settings`` break."""
    low, high, target = settings.min_replicas, settings.max_replicas, settings.target
    if low < 1:
        raise DeploymentError(
            f"--min-replicas must be at least 1, got {low}: a deployment with zero replicas "
            "could not answer (scale to zero is not supported)"
        )
    if high < 1:
        raise DeploymentError(f"--max-replicas must be at least 1, got {high}")
    if low > high:
        raise DeploymentError(
            f"--min-replicas ({low}) cannot be greater than --max-replicas ({high})"
        )
    if high > MAX_REPLICAS:
        raise DeploymentError(f"--max-replicas must be at most {MAX_REPLICAS}, got {high}")
    if not target > 0:  # also refuses NaN
        raise DeploymentError(f"--target-ongoing-requests must be positive, got {target:g}")
