"""How a deployment speculates: `SpeculationConfig`, built from a drafter's plain fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specserve.model.catalog import shipped_drafter
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.speculative.eagle_head import EagleHead
from specserve.speculative.head_artifact import is_drafter_dir, load_drafter
from specserve.speculative.limits import MAX_DRAFT_TOKEN_COUNT, MAX_NGRAM_LENGTH
from specserve.speculative.proposers.draft_model import check_models_share_vocabulary
from specserve.speculative.proposers.eagle import MIN_SURVIVAL


@dataclass(frozen=True)
class SpeculationConfig:
    """The deployment's drafter. ``method=None`` is plain decoding (``--no-speculation``).

    >>> SpeculationConfig(method="ngram", draft_token_count=4, ngram_length=3).method
    'ngram'
    """

    method: str | None = None  # "ngram", "draft_model" or "eagle"
    # Upper bound of the self-tuned length of the deployment's own drafter (the configured k);
    # predictions and companion n-gram proposals are bounded by MAX_LOOKUP_DRAFT instead.
    draft_token_count: int = 4
    ngram_length: int = 3
    draft_model: Model | None = None
    adaptive: bool = True  # False: always propose draft_token_count tokens
    eagle: EagleHead | None = None  # a trained head for this target (method "eagle")
    # Also try n-gram proposals (prompt lookup, free to draft) before the model drafter:
    # they win on long inputs that the output copies.
    with_ngram: bool = False
    # An EAGLE chain stops where the product of the head's confidences falls below this.
    min_draft_survival: float = MIN_SURVIVAL
    # Under a grammar, propose the tokens it forces as drafts (free: no drafter runs, and the
    # target accepts them with certainty). Off only for plain decoding (--no-speculation).
    forced_drafts: bool = True
    # The draft model's own prefix cache (its prompts' KV), shared by the deployment's requests
    draft_prefix_cache: PrefixCache | None = None

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram", "draft_model", "eagle"):
            raise ValueError(f"unknown speculation method {self.method!r}")
        if not 1 <= self.draft_token_count <= MAX_DRAFT_TOKEN_COUNT:
            raise ValueError(
                f"draft token count must be in [1, {MAX_DRAFT_TOKEN_COUNT}], "
                f"got {self.draft_token_count}"
            )
        if not 1 <= self.ngram_length <= MAX_NGRAM_LENGTH:
            raise ValueError(
                f"n-gram speculation length must be in [1, {MAX_NGRAM_LENGTH}], "
                f"got {self.ngram_length}"
            )
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise ValueError("method 'draft_model' needs a draft model, and only it does")
        if (self.method == "eagle") != (self.eagle is not None):
            raise ValueError("method 'eagle' needs a trained head, and only it does")
        if not 0.0 <= self.min_draft_survival <= 1.0:
            raise ValueError(f"min_draft_survival must be in [0, 1], got {self.min_draft_survival}")


PLAIN = SpeculationConfig(forced_drafts=False)  # plain decoding: no drafts of any kind


def speculation_for_drafter(
    method: str | None,
    draft_token_count: int,
    target: Model,
    load: Callable[[str], Model],
    draft_model: str | None = None,
    ngram_length: int | None = None,
    adaptive: bool = True,
) -> SpeculationConfig:
    """The engine's settings for a drafter (a deployment's effective drafter, field by field):
    ``method`` "ngram" / "draft_model" (a model name or path, or a trained EAGLE head's
    directory) / None, loading the draft model with ``load``."""
    if method is None:
        return PLAIN
    if method == "ngram":
        return SpeculationConfig(
            "ngram", draft_token_count, ngram_length=ngram_length or 3, adaptive=adaptive
        )
    if draft_model is None:
        raise ValueError(f"speculation method {method!r} needs a draft model")
    path = shipped_drafter(draft_model) or Path(draft_model)
    if is_drafter_dir(path):  # a trained EAGLE head, not a model
        head = load_drafter(path, target)
        return SpeculationConfig(
            "eagle", draft_token_count, eagle=head, adaptive=adaptive, with_ngram=True
        )
    draft = load(draft_model)
    check_models_share_vocabulary(target, draft)
    return SpeculationConfig("draft_model", draft_token_count, draft_model=draft, adaptive=adaptive)
