"""Predictions after whole-line edits: how many steps until the prediction proposes again.

A simulated greedy engine copies a prediction with one line inserted, deleted or replaced.
The target writes the edited text; each step the proposer drafts, the drafts are kept while
they equal the text, and one recovered/bonus token follows (as the verifier does). Counted:
*re-sync steps*, the steps that start once the output has written the edit's last new token
and whose drafts are not all kept. Nothing can draft the new line itself; after it, the
prediction must be found again within a step or two.
"""

from __future__ import annotations

import json

import pytest

from specserve.speculative.proposers import PredictionProposer, SequenceContext
from tests.paths import SHARED_DATA

SHARED = SHARED_DATA
INDENT, NEWLINE = 1, 2  # tokens every line shares, as real code's do


def copy_with_prediction(prediction: list[int], wanted: list[int], k: int = 64) -> list[int]:
    """Re-sync steps of a greedy copy of ``wanted`` (see the module docstring)."""
    suffix = 0  # the edit ends where ``wanted`` and the prediction share their tail
    while suffix < min(len(prediction), len(wanted)) and (
        prediction[-1 - suffix] == wanted[-1 - suffix]
    ):
        suffix += 1
    edit_end = len(wanted) - suffix
    proposer = PredictionProposer(prediction)
    output: list[int] = []
    missed: list[int] = []  # output lengths at the start of each re-sync step
    while len(output) < len(wanted):
        drafts = proposer.propose(SequenceContext.of([0], output), k).token_ids
        ahead = wanted[len(output) :]
        kept = 0
        while kept < min(len(drafts), len(ahead)) and drafts[kept] == ahead[kept]:
            kept += 1
        if len(output) >= edit_end and len(ahead) > 1 and kept < min(len(drafts) or 1, len(ahead)):
            missed.append(len(output))
        output += drafts[:kept]
        if len(output) < len(wanted):
            output.append(ahead[kept])
    assert output == wanted
    return missed


def _line(j: int) -> list[int]:
    return [INDENT, 100 + 3 * j, 101 + 3 * j, 102 + 3 * j, NEWLINE]


LINES = [_line(j) for j in range(8)]
NEW_LINE = [INDENT, 90, 91, NEWLINE]


def _join(lines: list[list[int]]) -> list[int]:
    return [t for line in lines for t in line]


@pytest.mark.parametrize(
    ("edit", "lines", "resync_steps"),
    [
        # "indent L4[1]": two tokens found at once; the step that wrote them re-synced.
        ("deleted", [*LINES[:3], *LINES[4:]], 0),
        # The new line's newline is the old line's too, so its step counts (nothing
        # proposed); there the nearest newline ahead is the replaced line's: L4 follows.
        ("replaced", [*LINES[:3], NEW_LINE, *LINES[4:]], 1),
        # The newline step, then the replacement guess (L4: wrong, capped at RESYNC_RUN);
        # its recovered token L3[1] makes "newline indent L3[1]", found: L3 follows.
        ("inserted", [*LINES[:3], NEW_LINE, *LINES[3:]], 2),
    ],
)
def test_prediction_resyncs_after_a_line_edit(
    edit: str, lines: list[list[int]], resync_steps: int
) -> None:
    missed = copy_with_prediction(_join(LINES), _join(lines))
    assert len(missed) == resync_steps, (edit, missed)


def _real_code_functions(count: int) -> list[list[str]]:
    path = SHARED / "humanevalfix" / "humanevalpack_python.jsonl"
    if not path.exists():
        pytest.skip("shared HumanEvalFix data is not present")
    rows = [json.loads(line) for line in path.open()][:count]
    return [(r["declaration"] + r["canonical_solution"]).rstrip("\n").split("\n") for r in rows]


def test_prediction_resyncs_after_line_edits_in_real_code() -> None:
    """Every line of 30 HumanEval functions (SmolLM2's tokenizer) inserted before, deleted,
    and replaced. Shared tokens (indents, ``)``, ``=``) make some first guesses wrong; still
    nearly every edit re-syncs within two steps and none takes more than three."""
    from tests.real_tokenizers import load_gguf_tokenizer, smollm2_gguf_path

    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())

    def encode(lines: list[str]) -> list[int]:
        return tokenizer.encode("\n".join(lines), add_special_tokens=False)

    steps: dict[str, list[int]] = {"inserted": [], "deleted": [], "replaced": []}
    for code in _real_code_functions(30):
        prediction = encode(code)
        for i in range(1, len(code) - 1):
            indent = code[i][: len(code[i]) - len(code[i].lstrip())]
            edits = {
                "inserted": [*code[:i], indent + "extra_value = compute(x, 3)", *code[i:]],
                "deleted": [*code[:i], *code[i + 1 :]],
                "replaced": [*code[:i], indent + "total = other_thing(y) + 1", *code[i + 1 :]],
            }
            for edit, lines in edits.items():
                steps[edit].append(len(copy_with_prediction(prediction, encode(lines))))
    for edit, counts in steps.items():
        within_two = sum(c <= 2 for c in counts) / len(counts)
        print(f"{edit}: {len(counts)} edits, within 2 steps {within_two:.0%}, max {max(counts)}")
        assert within_two >= 0.9 and max(counts) <= 3, (edit, counts)


def test_a_resynced_place_drafts_short_until_the_output_confirms_it() -> None:
    from specserve.speculative.proposers.prediction import RESYNC_RUN

    proposer = PredictionProposer(list(range(10, 100)))
    output = [*range(10, 15), 99, *range(16, 18)]  # 15 replaced, then "16 17" found
    first = proposer.propose(SequenceContext.of([0], output), 64).token_ids
    assert first == list(range(18, 18 + RESYNC_RUN)) and RESYNC_RUN <= 8
    output += [18]  # the output follows the new place: full runs again
    assert len(proposer.propose(SequenceContext.of([0], output), 64).token_ids) == 64
