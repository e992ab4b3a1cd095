"""End-to-end: speculative output equals plain output; the engine equals the reference step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specserve.engine.generate import generate
from specserve.engine.result import GenerationResult
from specserve.engine.sequence import Sequence, pick_token
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from specserve.model.vocab import VocabularyMismatchError
from specserve.speculative.config import SpeculationConfig
from specserve.speculative.draft_length import LengthTuner, StepCosts
from specserve.speculative.proposers.base import SequenceContext
from specserve.speculative.proposers.draft_model import DraftModelProposer
from specserve.speculative.proposers.ngram import NgramProposer
from specserve.speculative.reference import reference_step
from specserve.speculative.sampling import (
    ACCEPT_STREAM,
    DRAFT_STREAM,
    SAMPLE_STREAM,
    SamplingParams,
)
from tests.engaged import assert_engaged
from tests.paths import SHARED_DATA
from tests.tiny import TinySpec, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=48, ignore_eos=True)
SHARED = SHARED_DATA
# A prompt that repeats itself, so n-gram lookup has something to find.
REPEATING = [10, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14, 15, 10, 11, 12]


def _configs(model: Model, draft: Model) -> dict[str, SpeculationConfig]:
    # Fixed lengths: the timing-driven tuner could otherwise switch drafting off, and the
    # output would then equal plain decoding trivially.
    return {
        "ngram": SpeculationConfig("ngram", 4, ngram_length=2, adaptive=False),
        "ngram-long": SpeculationConfig("ngram", 6, ngram_length=1, adaptive=False),
        "draft-self": SpeculationConfig("draft_model", 4, draft_model=model, adaptive=False),
        "draft-other": SpeculationConfig("draft_model", 3, draft_model=draft, adaptive=False),
    }


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """Same vocabulary, the weights rounded to 4 bits: a drafter whose argmax often but not
    always agrees with the target's (drafts are both accepted and rejected)."""
    model_spec = TinySpec(linear_type=Q.Q4_0)
    path = write_tiny_gguf(tmp_path_factory.mktemp("d") / "draft.gguf", model_spec)
    return load_model(str(path), dtype="float32", progress=False)


def test_every_proposer_gives_plain_greedy_output_on_tiny(
    tiny_model: Model, other_tiny: Model
) -> None:
    plain = generate(tiny_model, REPEATING, GREEDY)
    assert plain.stats.proposed == 0 and len(plain.token_ids) == GREEDY.max_tokens
    for name, speculation in _configs(tiny_model, other_tiny).items():
        result = generate(tiny_model, REPEATING, GREEDY, speculation=speculation)
        assert result.token_ids == plain.token_ids, name
        assert speculation.method is not None
        assert_engaged(result, speculation.method)
        if name == "draft-other":  # rejections were exercised too
            assert result.stats.accepted < result.stats.proposed
    edited = [*plain.token_ids[:10], 99, 98, *plain.token_ids[14:]]
    fixed = SpeculationConfig("ngram", 4, adaptive=False)
    result = generate(tiny_model, REPEATING, GREEDY, prediction_ids=edited, speculation=fixed)
    assert result.token_ids == plain.token_ids
    assert_engaged(result, "prediction")


def test_draft_equal_to_target_accepts_everything(tiny_model: Model) -> None:
    speculation = SpeculationConfig("draft_model", 4, draft_model=tiny_model, adaptive=False)
    result = generate(tiny_model, REPEATING, GREEDY, speculation=speculation)
    stats = result.stats.by_method["draft_model"]
    assert stats.proposed > 0 and stats.accepted == stats.proposed


def test_prediction_equal_to_output_is_fully_accepted(tiny_model: Model) -> None:
    plain = generate(tiny_model, REPEATING, GREEDY)
    # Fixed length (no timing-driven tuner): every step proposes up to MAX_LOOKUP_DRAFT.
    fixed = SpeculationConfig(adaptive=False)
    result = generate(
        tiny_model, REPEATING, GREEDY, speculation=fixed, prediction_ids=plain.token_ids
    )
    assert result.token_ids == plain.token_ids
    assert result.prediction is not None
    assert result.prediction.rejected_prediction_tokens == 0
    assert result.prediction.accepted_prediction_tokens == len(plain.token_ids)
    # Each target step emits its accepted drafts plus one (bonus) token, so every other token
    # is an accepted draft; the prefill verified the first drafts (engine/prefill.py), so
    # its tokens count as a step's.
    assert result.stats.generated == len(plain.token_ids)
    accepted = result.stats.by_method["prediction"].accepted
    assert accepted == len(plain.token_ids) - result.stats.target_steps
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
            speculation=SpeculationConfig("draft_model", 4, draft_model=draft),
        )


def _reference_run(
    model: Model, params: SamplingParams, proposer: NgramProposer | DraftModelProposer, k: int
) -> list[int]:
    """Decode REPEATING with the readable reference step, on the request's own streams."""
    cache = model.lm.new_cache(1, len(REPEATING) + params.max_tokens + 8)
    logits = model.lm(ForwardBatch(torch.tensor([REPEATING]), [0], [0]), cache)[0, -1]
    sample_gen = params.generator(SAMPLE_STREAM)
    accept_gen = params.generator(ACCEPT_STREAM)
    all_ids = [*REPEATING, pick_token(logits, params, sample_gen)]
    if isinstance(proposer, DraftModelProposer):
        proposer.prefill(REPEATING)
    while len(all_ids) - len(REPEATING) < params.max_tokens:
        context = SequenceContext(REPEATING, all_ids[len(REPEATING) :], all_ids)
        limit = params.max_tokens - (len(all_ids) - len(REPEATING)) - 1  # as Sequence does
        proposal = proposer.propose(context, min(k, limit))
        all_ids += reference_step(
            model.lm, cache, all_ids, proposal.token_ids, proposal.draft_probs, params,
            accept_gen, sample_gen,
        )  # fmt: skip
    return all_ids[len(REPEATING) :][: params.max_tokens]


@pytest.mark.parametrize("temperature", [0.0, 0.25])
@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_engine_equals_reference_step(
    tiny_model: Model, other_tiny: Model, drafter: str, temperature: float
) -> None:
    """The readable reference step, driven with the same proposer, emits the same tokens as
    the engine: greedy, and seeded fixed-length sampling (same streams, same order)."""
    params = SamplingParams(
        temperature=temperature, top_k=4, top_p=0.95, seed=5, max_tokens=40, ignore_eos=True
    )
    k = 3
    if drafter == "ngram":
        speculation = SpeculationConfig("ngram", k, ngram_length=2, adaptive=False)
        proposer: NgramProposer | DraftModelProposer = NgramProposer(2)
    else:
        speculation = SpeculationConfig("draft_model", k, draft_model=tiny_model, adaptive=False)
        proposer = DraftModelProposer(tiny_model, params, len(REPEATING) + 64)
    engine = generate(tiny_model, REPEATING, params, speculation=speculation)
    assert_engaged(engine, drafter)
    assert _reference_run(tiny_model, params, proposer, k) == engine.token_ids


def test_streams_of_one_seed_are_independent() -> None:
    """Draft, acceptance and sample streams of a seed are uncorrelated at every lag, over many
    seeds; one generator seeded with the seed itself for every purpose (the old construction)
    gives copies of one stream and fails the same bound."""
    seeds, draws, lags = 2000, 8, 4
    bound = 5 / (seeds * (draws - lags)) ** 0.5  # 5 standard errors of a null correlation

    def draws_of(gen: torch.Generator) -> torch.Tensor:
        return torch.rand(draws, generator=gen, dtype=torch.float64)

    def worst_correlation(make: Callable[[int, str], torch.Generator], a: str, b: str) -> float:
        xs = torch.stack([draws_of(make(s, a)) for s in range(seeds)])  # [seeds, draws]
        ys = torch.stack([draws_of(make(s, b)) for s in range(seeds)])
        worst = 0.0
        for lag in range(-lags, lags + 1):
            x = xs[:, max(lag, 0) : draws + min(lag, 0)].flatten()
            y = ys[:, max(-lag, 0) : draws + min(-lag, 0)].flatten()
            worst = max(worst, abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])))
        return worst

    def ours(seed: int, purpose: str) -> torch.Generator:
        return SamplingParams(temperature=1.0, seed=seed).generator(purpose)

    def shared(seed: int, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    for a, b in [(DRAFT_STREAM, ACCEPT_STREAM), (DRAFT_STREAM, SAMPLE_STREAM)]:
        assert worst_correlation(ours, a, b) < bound, (a, b)
    assert worst_correlation(ours, ACCEPT_STREAM, SAMPLE_STREAM) < bound
    assert worst_correlation(shared, DRAFT_STREAM, ACCEPT_STREAM) > 0.99  # the negative control


def test_proposers_draw_from_the_draft_stream(tiny_model: Model) -> None:
    """The wiring: a sampled drafter's generator is the draft stream, not the sequence's."""
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=8)
    speculation = SpeculationConfig("draft_model", 2, draft_model=tiny_model)
    seq = Sequence(tiny_model, REPEATING, params, speculation)
    drafter = seq.source.entries[-1][0]
    assert isinstance(drafter, DraftModelProposer)
    first = [
        torch.rand(4, generator=g) for g in (drafter.generator, seq.accept_gen, seq.sample_gen)
    ]
    want = [
        torch.rand(4, generator=params.generator(p))
        for p in (DRAFT_STREAM, ACCEPT_STREAM, SAMPLE_STREAM)
    ]
    assert all(torch.equal(a, b) for a, b in zip(first, want, strict=True))


def test_sampled_speculation_is_seeded_and_deterministic(tiny_model: Model) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123, max_tokens=32, ignore_eos=True)
    # A fixed length: with self-tuning, draft lengths follow measured step times, and which
    # random numbers a position consumes depends on them (the distribution does not).
    speculation = SpeculationConfig("ngram", 4, ngram_length=1, adaptive=False)
    first = generate(tiny_model, REPEATING, params, speculation=speculation)
    again = generate(tiny_model, REPEATING, params, speculation=speculation)
    other = generate(
        tiny_model,
        REPEATING,
        SamplingParams(temperature=1.0, top_p=0.95, seed=124, max_tokens=32, ignore_eos=True),
        speculation=speculation,
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
    free (n-gram) and the forward cheap enough (test_draft_length.py: when it is not), one
    token when each draft costs time (a model drafter)."""
    costs = StepCosts({1: 0.010, 2: 0.011, 3: 0.012, 4: 0.013, 5: 0.014})
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
    totals: list[GenerationResult] = []
    for prompt, prediction in cases:
        plain = generate(smollm2, prompt, params)
        for speculation in (
            SpeculationConfig("ngram", 4, ngram_length=3),
            SpeculationConfig("draft_model", 4, draft_model=smollm2),
        ):
            result = generate(
                smollm2, prompt, params, speculation=speculation, prediction_ids=prediction
            )
            assert result.token_ids == plain.token_ids, (speculation.method, prediction is not None)
            totals.append(result)
    # Self-tuned lengths (the deployed default) may skip drafting on a prompt, but over
    # all of them each method must have drafted and had drafts accepted.
    for method in ("ngram", "draft_model", "prediction"):
        proposed = sum(
            r.stats.by_method[method].proposed for r in totals if method in r.stats.by_method
        )
        accepted = sum(
            r.stats.by_method[method].accepted for r in totals if method in r.stats.by_method
        )
        assert proposed > 0 and accepted > 0, method
    assert sum(r.stats.generated for r in totals) > sum(r.stats.target_steps for r in totals)
