"""One step's drafts from several proposers: where the first runs out, the next continues
(greedy and sampled requests); each tuner learns from its own part; the output stays
plain's (greedy; tests/engine/test_distribution.py checks the sampled mix's distribution)."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

from specserve.engine.generate import generate
from specserve.model.loader import Model, load_model
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.proposers.base import SequenceContext
from specserve.speculative.proposers.draft_model import DraftModelProposer
from specserve.speculative.proposers.prediction import RESYNC_RUN
from specserve.speculative.sampling import SamplingParams
from specserve.speculative.source import ProposalSource
from tests.tiny import TinySpec, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=60, ignore_eos=True)
# The output so far ends in 7, 8; the prompt continues "7, 8" with 9, 1, 2, 3.
PROMPT = [5, 7, 8, 9, 1, 2, 3, 4]
OUTPUT = [6, 7, 8]
NGRAM = SpeculationConfig("ngram", 4, ngram_length=2, adaptive=False)


def _source(model: Model, prediction: list[int], params: SamplingParams) -> ProposalSource:
    return ProposalSource(model, NGRAM, params, prediction, 200, StepCosts())


def _trials(source: ProposalSource) -> list[float]:
    """Verified draft positions per tuner (prediction's, then n-gram's)."""
    return [sum(tuner.acceptance.trials) for _, tuner in source.entries]


def test_ngram_continues_where_the_prediction_ends(tiny_model: Model) -> None:
    # The prediction is aligned after OUTPUT's first token and has two tokens left.
    source = _source(tiny_model, [6, 7, 8, 9, 1], GREEDY)
    proposal = source.propose(SequenceContext.of(PROMPT, OUTPUT), 10)
    # n-gram continues from "... 8, 9, 1": the prompt's "9, 1" is followed by 2, 3, 4, 6.
    assert proposal.token_ids == [9, 1, 2, 3, 4, 6]
    assert proposal.method == "prediction" and proposal.draft_probs is None
    source.observe(proposed=6, accepted=3)  # 9, 1 (prediction) and 2 (n-gram) kept
    assert _trials(source) == [2.0, 2.0]  # n-gram: position 1 kept, position 2 rejected
    assert source.expected_tokens(6) > source.expected_tokens(2) > 1.0
    source.propose(SequenceContext.of(PROMPT, OUTPUT), 10)
    source.observe(proposed=6, accepted=1)  # rejected inside the prediction's part
    assert _trials(source) == [2.0 * 0.8 + 2.0, 2.0]  # n-gram's part was never tried


def test_a_fresh_place_in_the_prediction_is_tried_where_its_record_says_no(
    tiny_model: Model,
) -> None:
    """A reply that opens with prose fails the prediction's first drafts, and its tuner
    then drafts nothing. When the output meets the prediction again on two tokens, the
    prediction still proposes (at most RESYNC_RUN tokens); a one-token match does not."""
    adaptive = SpeculationConfig("ngram", 4, ngram_length=2, adaptive=True)
    prediction = list(range(20, 30))
    prompt = [40, 41, 42, 43]  # nothing for n-gram to copy

    def discouraged() -> ProposalSource:
        source = ProposalSource(tiny_model, adaptive, GREEDY, prediction, 200, StepCosts())
        for _ in range(10):
            source.entries[0][1].observe(proposed=4, accepted=0)
        assert source.entries[0][1].choose() == 0
        return source

    source = discouraged()
    assert source.propose(SequenceContext.of(prompt, [30, 31, 32]), 16).token_ids == []
    assert source.propose(SequenceContext.of(prompt, [30, 31, 32, 22]), 16).token_ids == []
    proposal = source.propose(SequenceContext.of(prompt, [30, 31, 32, 22, 23]), 16)
    assert proposal.method == "prediction"
    assert proposal.token_ids == list(range(24, 24 + RESYNC_RUN))
    # Tried once: the same place is left to the tuner's record from then on.
    assert source.propose(SequenceContext.of(prompt, [30, 31, 32, 22, 23]), 16).token_ids == []
    # Without that probe the place would wait for the tuner's periodic one.
    fresh = discouraged()
    fresh.prediction = None
    assert fresh.propose(SequenceContext.of(prompt, [30, 31, 32, 22, 23]), 16).token_ids == []


def test_sampled_requests_continue_too_and_the_limit_truncates(tiny_model: Model) -> None:
    sampled = SamplingParams(max_tokens=60, temperature=0.8, seed=1)
    source = _source(tiny_model, [6, 7, 8, 9, 1], sampled)
    proposal = source.propose(SequenceContext.of(PROMPT, OUTPUT), 10)
    assert proposal.token_ids == [9, 1, 2, 3, 4, 6] and proposal.draft_probs is None
    greedy = _source(tiny_model, [6, 7, 8, 9, 1], GREEDY)
    assert greedy.propose(SequenceContext.of(PROMPT, OUTPUT), 1).token_ids == [9]


def test_a_sampling_draft_model_after_a_prediction_gets_one_hot_rows(tiny_model: Model) -> None:
    """Sampled, the draft model continues the prediction with its own distributions; the
    prediction's positions carry one-hot rows, as the verifier assumes for lookups."""
    sampled = SamplingParams(max_tokens=60, temperature=0.8, seed=1)
    spec = SpeculationConfig("draft_model", 3, draft_model=tiny_model, adaptive=False)
    source = ProposalSource(tiny_model, spec, sampled, [6, 7, 8, 9, 1], 200, StepCosts())
    proposal = source.propose(SequenceContext.of(PROMPT, OUTPUT), 10)
    assert proposal.token_ids[:2] == [9, 1] and len(proposal) == 5
    assert proposal.method == "prediction" and proposal.draft_probs is not None
    probs = proposal.draft_probs
    assert probs.shape == (5, tiny_model.lm.config.vocab_size)
    assert torch.equal(probs[:2].argmax(-1), torch.tensor([9, 1]))
    assert torch.equal(probs[:2].sum(-1), torch.ones(2)) and int((probs[:2] > 0).sum()) == 2
    drafted = torch.tensor(proposal.token_ids[2:])
    assert bool((probs[2:].gather(-1, drafted[:, None]) > 0).all())  # sampled from its rows


def test_a_draft_model_keeps_only_verified_tokens(tiny_model: Model) -> None:
    """Drafting after another proposer's drafts, the draft model feeds them but counts only
    the verified tokens as in its cache: the next step writes those positions again."""
    continuing = DraftModelProposer(tiny_model, GREEDY, 100)
    continuing.propose(SequenceContext.of(PROMPT, OUTPUT).extended([9, 1]), 3)
    assert continuing.synced == len(PROMPT) + len(OUTPUT)
    after = SequenceContext.of(PROMPT, [*OUTPUT, 9, 5])  # the target kept 9, then chose 5
    fresh = DraftModelProposer(tiny_model, GREEDY, 100)
    assert continuing.propose(after, 3).token_ids == fresh.propose(after, 3).token_ids


def test_a_draft_model_continues_a_prediction_and_output_stays_plain(tiny_model: Model) -> None:
    """The prediction covers only the output's first 10 tokens; the target drafting for
    itself continues it in the same step (its drafts are all accepted)."""
    plain = generate(tiny_model, PROMPT, GREEDY)
    itself = SpeculationConfig("draft_model", 4, draft_model=tiny_model, adaptive=False)
    result = generate(
        tiny_model, PROMPT, GREEDY, speculation=itself, prediction_ids=plain.token_ids[:10]
    )
    assert result.token_ids == plain.token_ids
    stats = result.stats.by_method["prediction"]
    # The prefill's last chunk verified the first step (engine/prefill.py): the prediction's
    # 10 tokens and 4 more from the model, and the target kept all 14.
    assert len(stats.proposed_per_position) == 14 and stats.accepted_per_position[13] >= 1


def test_mixed_drafts_with_an_imperfect_drafter_stay_lossless(
    tiny_model: Model, tmp_path: Path
) -> None:
    path = write_tiny_gguf(tmp_path / "draft.gguf", TinySpec(linear_type=Q.Q4_0))
    draft = load_model(str(path), dtype="float32", progress=False)
    plain = generate(tiny_model, PROMPT, GREEDY)
    out = plain.token_ids
    edited = [*out[:12], 3, 3, *out[14:30]]  # a replaced stretch, then it stops early
    mix = SpeculationConfig(
        "draft_model", 3, draft_model=draft, with_ngram=True, ngram_length=2, adaptive=False
    )
    result = generate(tiny_model, PROMPT, GREEDY, speculation=mix, prediction_ids=edited)
    assert result.token_ids == plain.token_ids
    assert result.stats.by_method["prediction"].proposed > 0
