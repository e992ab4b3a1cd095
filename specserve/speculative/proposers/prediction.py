"""Predicted Outputs (OpenAI): the caller sends text it expects the output to mostly repeat.

The proposer walks along the prediction as the output grows and proposes the prediction's
next tokens. When the output departs from it (an edit), it finds its place again from the
last tokens generated, so the prediction keeps helping after every edit, not only before
the first.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from specserve.speculative.proposers.base import Proposal, SequenceContext, register

# Re-synchronization looks for the last MAX_SYNC_TOKENS generated tokens (or a shorter suffix)
# in the prediction. A match of MIN_SYNC_TOKENS or more is trusted anywhere; a single token is
# too common to trust far away, so it only counts within SINGLE_TOKEN_WINDOW tokens after the
# place the output left the prediction: that is where a deletion or a replacement resumes.
MAX_SYNC_TOKENS = 8
MIN_SYNC_TOKENS = 2
SINGLE_TOKEN_WINDOW = 8
# A re-synchronized place is a guess until the output confirms it: until then a proposal is
# at most RESYNC_RUN tokens, so a wrong guess costs a short verify, not a 64-token one.
RESYNC_RUN = 4


@dataclass
class PredictionStats:
    """OpenAI's ``completion_tokens_details`` counters for one request.

    As OpenAI defines them: accepted = tokens of the prediction that appeared in the
    completion, rejected = tokens of the prediction that did not. They describe the text, not
    the speculation steps (those are in ``SpecStats.by_method["prediction"]``): a prediction
    equal to the output is fully accepted, whatever the step boundaries were.
    """

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    @classmethod
    def count(cls, prediction: Sequence[int], output: Sequence[int]) -> PredictionStats:
        """Align the prediction with the output (longest matching blocks, difflib).

        >>> PredictionStats.count([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6])
        PredictionStats(accepted_prediction_tokens=4, rejected_prediction_tokens=1)
        """
        matcher = SequenceMatcher(None, list(prediction), list(output), autojunk=False)
        accepted = sum(block.size for block in matcher.get_matching_blocks())
        return cls(accepted, len(prediction) - accepted)


@register
class PredictionProposer:
    """Proposes the continuation of the prediction from where the output currently is.

    It keeps an alignment: the index in the prediction of the token expected next. Each new
    output token that equals it moves the alignment one step. A token that differs is an edit;
    the alignment is then re-synchronized by the longest suffix (at most MAX_SYNC_TOKENS) of
    the output found in the prediction: among matches of equal length, the first one at or
    after the alignment wins, else the last one before it. A one-token suffix is only trusted
    within SINGLE_TOKEN_WINDOW tokens after the alignment. Without a match it proposes nothing
    and tries again after the next step.

    Example, prediction ``a b c d e f``::

        output a b        -> propose c d e f
        output a b X      (edit: X replaces c)   "b X", "X" not found  -> propose nothing
        output a b X d    "X d" not found; "d" is 1 after the alignment (c) -> propose e f
        output a b d      (c deleted)            "d" just after the alignment -> propose e f
        output a b Y c    (Y inserted)           "c" at the alignment  -> propose d e f

    After a re-sync the place is a guess: proposals stay within RESYNC_RUN tokens until an
    output token follows it. Edits of whole lines, prediction ``L1 L2 L3`` where each line
    is ``indent ... newline`` (the indent and newline tokens occur on every line)::

        L2 deleted:  L1 indent L3[1]        "indent L3[1]" found (2 tokens)  -> propose L3
        L2 replaced: L1 indent X ... newline   "newline" near the alignment  -> propose L3
        L2 inserted: L1 indent Y ... newline   as above -> propose L3, which the output does
                     not take: "newline indent L2[1]" found               -> propose L2

    so the prediction proposes again within one or two steps of the edit's end
    (``tests/unit/test_proposers.py`` counts them on real code).

    A place found again on MIN_SYNC_TOKENS or more tokens is worth trying even where the
    request's record says the prediction does not pay (`wants_probe`): a reply that opens
    with prose ("Here is the fixed code:") fails the prediction's first drafts, its tuner
    may then draft nothing, and the code that follows would wait for the tuner's periodic
    probe.
    """

    method = "prediction"

    def __init__(self, prediction_ids: Sequence[int], max_run: int = 64) -> None:
        if max_run < 1:
            raise ValueError(f"max_run must be at least 1, got {max_run}")
        self.prediction_ids = list(prediction_ids)
        self.max_run = max_run
        # token -> ascending indices in the prediction, so a re-sync never scans it all.
        self._occurrences: dict[int, list[int]] = defaultdict(list)
        for i, token in enumerate(self.prediction_ids):
            self._occurrences[token].append(i)
        self._next = 0  # index in the prediction of the token expected next
        self._aligned = True
        self._confirmed = True  # the output has followed the current place at least once
        self._seen = 0  # output tokens already followed
        self._fresh = False  # the place came from a re-sync that no proposal has tried yet
        self._backing = 0  # output tokens that agree with the place since it was found

    def propose(self, context: SequenceContext, k: int) -> Proposal:
        """The next ``min(k, max_run)`` prediction tokens, or none while the place is lost."""
        self._follow(context.output_ids)
        if not self._aligned or k <= 0:
            return Proposal([], None, self.method)
        run = self.max_run if self._confirmed else min(self.max_run, RESYNC_RUN)
        stop = self._next + min(k, run)
        self._fresh = False
        return Proposal(self.prediction_ids[self._next : stop], None, self.method)

    def wants_probe(self, context: SequenceContext) -> bool:
        """Whether the output has just found its place in the prediction again, on
        MIN_SYNC_TOKENS or more matching tokens (the re-sync's match, or a one-token match
        and the token after it), and no proposal has tried that place yet."""
        self._follow(context.output_ids)
        fresh = self._aligned and self._fresh and self._next < len(self.prediction_ids)
        return fresh and self._backing >= MIN_SYNC_TOKENS

    def _follow(self, output_ids: Sequence[int]) -> None:
        """Move the alignment over the output tokens generated since the last call."""
        if len(output_ids) < self._seen:  # a new output: start over
            self._next, self._aligned, self._confirmed, self._seen = 0, True, True, 0
            self._fresh = False
        if len(output_ids) == self._seen:
            return  # nothing new: the place (or the search's answer) stands
        prediction = self.prediction_ids
        for token in output_ids[self._seen :]:
            if self._aligned and self._next < len(prediction) and prediction[self._next] == token:
                self._next += 1
                self._backing += 1
                self._confirmed = True
            else:
                self._aligned = False
        self._seen = len(output_ids)
        if not self._aligned:
            self._resync(list(output_ids[-MAX_SYNC_TOKENS:]))

    def _resync(self, tail: list[int]) -> None:
        """Align just after the best match of a suffix of ``tail`` (see the class docstring)."""
        ends = self._occurrences.get(tail[-1], [])
        split = bisect_left(ends, self._next)  # ends[split:] are at or after the alignment
        best_key, best_end = (0, 0, 0), -1
        for i, end in enumerate(ends):
            length = self._match_length(tail, end)
            forward = i >= split
            if length < MIN_SYNC_TOKENS and not (
                forward and end - self._next < SINGLE_TOKEN_WINDOW
            ):
                continue
            # Longer first; then forward before backward; then nearest to the alignment.
            key = (length, forward, -abs(end - self._next))
            if key > best_key:
                best_key, best_end = key, end
        if best_end >= 0:
            self._next, self._aligned, self._confirmed = best_end + 1, True, False
            self._fresh, self._backing = True, best_key[0]

    def _match_length(self, tail: list[int], end: int) -> int:
        """How many tokens of ``tail``, from its end, equal the prediction ending at ``end``."""
        prediction = self.prediction_ids
        length = 0
        while (
            length < len(tail) and length <= end and prediction[end - length] == tail[-1 - length]
        ):
            length += 1
        return length
