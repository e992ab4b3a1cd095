"""End-to-end: speculative output equals plain output; the engine equals the reference step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specserve.engine.generate import generate
from specserve.engine.sampling import SamplingParams
from specserve.engine.speculation import SpeculationConfig
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from specserve.spec.proposers.base import SequenceContext
from specserve.spec.proposers.draft_model import VocabularyMismatchError
from specserve.spec.proposers.ngram import NgramProposer
from specserve.spec.reference import reference_step
from specserve.spec.tuning import LengthTuner, StepCosts
from tests.tiny import TinySpec, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=48, ignore_eos=True)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# A prompt that repeats itself, so n-gram lookup has something to find.
REPEATING = [10, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14, 15, 10, 11, 12]


def _configs(model: Model, draft: Model) -> dict[str, SpeculationConfig]:
    return {
        "ngram": SpeculationConfig("ngram", 4, ngram_length=2),
        "ngram-fixed": SpeculationConfig("ngram", 6, ngram_length=1, adaptive=False),
        "draft-self": SpeculationConfig("draft_model", 4, draft_model=model),
        "draft-other": SpeculationConfig("draft_model", 3, draft_model=draft, adaptive=False),
    }


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """Same vocabulary, different random weights: a poor but valid drafter."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("d") / "draft.gguf", TinySpec(seed=7))
    return load_model(str(path), dtype="float32", progress=False)


def test_every_proposer_gives_plain_greedy_output_on_tiny(
    tiny_model: Model, other_tiny: Model
) -> None:
    plain = generate(tiny_model, REPEATING, GREEDY)
    assert plain.stats.proposed == 0 and len(plain.token_ids) == GREEDY.max_tokens
    for name, spec in _configs(tiny_model, other_tiny).items():
        result = generate(tiny_model, REPEATING, GREEDY, spec=spec)
        assert result.token_ids == plain.token_ids, name
    edited = [*plain.token_ids[:10], 99, 98, *plain.token_ids[14:]]
    result = generate(
        tiny_model, REPEATING, GREEDY, prediction_ids=edited, spec=SpeculationConfig("ngram", 4)
    )
    assert result.token_ids == plain.token_ids
    assert result.prediction is not None and result.prediction.accepted_prediction_tokens > 20


def test_draft_equal_to_target_accepts_everything(tiny_model: Model) -> None:
    spec = SpeculationConfig("draft_model", 4, draft_model=tiny_model, adaptive=False)
    result = generate(tiny_model, REPEATING, GREEDY, spec=spec)
    stats = result.stats.by_method["draft_model"]
    assert stats.proposed > 0 and stats.accepted == stats.proposed


def test_prediction_equal_to_output_is_fully_accepted(tiny_model: Model) -> None:
    plain = generate(tiny_model, REPEATING, GREEDY)
    # Fixed length (no timing-driven tuner): every step proposes up to PREDICTION_MAX_RUN.
    fixed = SpeculationConfig(adaptive=False)
    result = generate(tiny_model, REPEATING, GREEDY, spec=fixed, prediction_ids=plain.token_ids)
    assert result.token_ids == plain.token_ids
    assert result.prediction is not None
    assert result.prediction.rejected_prediction_tokens == 0
    assert result.prediction.accepted_prediction_tokens == len(plain.token_ids)
    # Each target step emits its accepted drafts plus one (bonus) token, so every other token
    # after the first (which comes from the prefill) is an accepted draft.
    generated = len(plain.token_ids) - 1
    assert result.stats.by_method["prediction"].accepted == generated - result.stats.target_steps
    assert result.stats.tokens_per_step > 3.0


def test_vocabulary_mismatch_is_refused(tiny_model: Model, tmp_path: Path) -> None:
    draft = load_model(str(tiny_model.path), dtype="float32", progress=False)
    # Same size, one token spelled differently: ids would not mean the same thing.
    draft.tokenizer.vocab_fingerprint = lambda: "another vocabulary"  # type: ignore[method-assign]
    with pytest.raises(VocabularyMismatchError, match="vocabularies differ"):
        generate(
            tiny_model,
            REPEATING,
            GREEDY,
            spec=SpeculationConfig("draft_model", 4, draft_model=draft),
        )


def test_engine_equals_reference_step(tiny_model: Model, other_tiny: Model) -> None:
    """Drive the readable reference step with the same drafts; outputs must agree."""
    engine = generate(
        tiny_model,
        REPEATING,
        GREEDY,
        spec=SpeculationConfig("ngram", 3, ngram_length=2, adaptive=False),
    )
    cache = tiny_model.lm.new_cache(1, len(REPEATING) + GREEDY.max_tokens + 8)
    logits = tiny_model.lm(ForwardBatch(torch.tensor([REPEATING]), [0], [0]), cache)
    all_ids = [*REPEATING, int(logits[0, -1].argmax())]
    proposer = NgramProposer(2)
    gen = torch.Generator().manual_seed(0)
    while len(all_ids) - len(REPEATING) < GREEDY.max_tokens:
        context = SequenceContext(REPEATING, all_ids[len(REPEATING) :], all_ids)
        drafts = proposer.propose(context, 3).token_ids
        all_ids += reference_step(tiny_model.lm, cache, all_ids, drafts, None, GREEDY, gen)
    assert all_ids[len(REPEATING) :][: GREEDY.max_tokens] == engine.token_ids


def test_sampled_speculation_is_seeded_and_deterministic(tiny_model: Model) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123, max_tokens=32, ignore_eos=True)
    # A fixed length: with self-tuning, draft lengths follow measured step times, and which
    # random numbers a position consumes depends on them (the distribution does not).
    spec = SpeculationConfig("ngram", 4, ngram_length=1, adaptive=False)
    first = generate(tiny_model, REPEATING, params, spec=spec)
    again = generate(tiny_model, REPEATING, params, spec=spec)
    other = generate(
        tiny_model,
        REPEATING,
        SamplingParams(temperature=1.0, top_p=0.95, seed=124, max_tokens=32, ignore_eos=True),
        spec=spec,
    )
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_tuner_stops_speculating_when_it_does_not_pay() -> None:
    costs = StepCosts({1: 0.010, 2: 0.0125, 3: 0.015, 4: 0.0175, 5: 0.020})
    tuner = LengthTuner(4, costs)
    for _ in range(50):
        tuner.observe(proposed=4, accepted=0)
    assert tuner.choose() == 0
    for _ in range(50):
        tuner.observe(proposed=4, accepted=4)
    assert tuner.choose() == 4
    # Mid acceptance with an expensive drafter: the best k is short but not zero.
    tuner = LengthTuner(4, costs, draft_cost=0.004)
    for _ in range(50):
        tuner.observe(proposed=4, accepted=1)
    assert 0 < tuner.choose() < 4


@pytest.mark.parametrize(("draft_cost", "probe"), [(0.0, 4), (0.004, 1)])
def test_tuner_probes_after_plain_steps(draft_cost: float, probe: int) -> None:
    """Switched off, the tuner still probes every 16 steps: all positions when drafting is
    free (n-gram), one token when each draft costs time (a model drafter)."""
    costs = StepCosts({1: 0.010, 2: 0.0125, 3: 0.015, 4: 0.0175, 5: 0.020})
    tuner = LengthTuner(4, costs, draft_cost=draft_cost)
    for _ in range(50):
        tuner.observe(proposed=4, accepted=0)
    picks = [tuner.choose() for _ in range(32)]
    assert picks.count(0) == 30 and sorted(set(picks)) == [0, probe]


def _spec_bench_prompts(model: Model, per_category: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (SHARED / "spec_bench" / "question.jsonl").open()]
    chosen: dict[str, list[str]] = {}
    for row in rows:
        texts = chosen.setdefault(row["category"], [])
        if len(texts) < per_category:
            texts.append(row["turns"][0])
    return [
        model.tokenizer.encode_chat([{"role": "user", "content": text}])
        for texts in chosen.values()
        for text in texts
    ]


@pytest.mark.slow
def test_speculative_equals_plain_on_smollm2_real_prompts(smollm2: Model) -> None:
    params = SamplingParams(max_tokens=64)
    fixes = [
        json.loads(line) for line in (SHARED / "humanevalfix" / "humanevalpack_python.jsonl").open()
    ][:2]
    cases = [(ids, None) for ids in _spec_bench_prompts(smollm2, 1)]
    for fix in fixes:
        code = fix["declaration"] + fix["buggy_solution"]
        prompt = smollm2.tokenizer.encode_chat(
            [{"role": "user", "content": f"Fix the bug in this function:\n{code}"}]
        )
        cases.append((prompt, smollm2.tokenizer.encode(code, add_special_tokens=False)))
    for prompt, prediction in cases:
        plain = generate(smollm2, prompt, params)
        for spec in (
            SpeculationConfig("ngram", 4, ngram_length=3),
            SpeculationConfig("draft_model", 4, draft_model=smollm2),
        ):
            result = generate(smollm2, prompt, params, spec=spec, prediction_ids=prediction)
            assert result.token_ids == plain.token_ids, (spec.method, prediction is not None)
