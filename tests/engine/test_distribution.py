"""Sampled speculative output has the target's distribution, end to end.

The verifier's own statistical test (test_verify.py) feeds it crafted tables. Here real
requests run through ``generate()`` and the continuous-batching ``Engine``, with every
proposer (a draft model whose distribution differs from the target's, an EAGLE head, n-gram,
a prediction), seeded and unseeded, with temperature, top-k and top-p.

What is tested: each emitted token, given the tokens before it, is distributed as the
target's processed distribution ``p(. | prefix)``, computed here by one plain forward over
the finished output. Tokens are grouped by how the step emitted them — at draft position
``j`` (the j-th draft accepted, or the recovered token there), the bonus token, or a plain
step — and each token is binned by its rank under ``p(. | prefix)`` (ranks 0, 1, 2, 3+).
Summing ``p`` over the group gives the expected count of each bin. A correct sampler then
passes a chi-square test and a total-variation bound; greedy acceptance under sampling (the
negative control) fails both.

The group sums are sums of independent categorical draws with *different* probabilities, so
the Pearson statistic is no larger in distribution than chi-square with ``bins - 1`` degrees
of freedom (its covariance is the multinomial one minus a positive part): the p-values below
are conservative, and the negative control shows the test still has teeth.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import specserve.engine.sequence as sequence_module
from specserve.engine.generate import generate
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.engine.sequence import Sequence
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import SpeculationConfig, speculation_for_drafter
from specserve.speculative.proposers.base import Proposal
from specserve.speculative.sampling import SamplingParams, sample, target_probs
from tests.conftest import train_tiny_drafter
from tests.tiny import TinySpec, write_tiny_gguf

BINS = 4  # ranks 0, 1, 2 and 3+ under the target's distribution
K = 3  # fixed draft length of the model drafters (n-gram: 2, so its bonus is reached)
MIN_P_VALUE = 1e-4
# Sampling noise alone gives a TVD of about 0.8 / sqrt(n) over 4 bins; the bound is ~4x that.
TVD_SCALE = 3.0
MIN_GROUP = 100  # each draft position and the bonus must be seen at least this often
# Low temperature with top-k and top-p: the tiny random model's outputs then repeat enough for
# n-gram lookups and predictions to be accepted, while every position keeps several choices.
SAMPLING = dict(temperature=0.12, top_k=4, top_p=0.95, ignore_eos=True)
# A smaller tiny model than the shared one: these tests run thousands of forwards.
SMALL = TinySpec(hidden=64, ffn=128, heads=2, kv_heads=1, head_dim=32)


@dataclass(frozen=True)
class Run:
    """One distribution check: a drafter, a driver, how many requests of what length, and
    the groups that must be seen at least MIN_GROUP times (smaller ones are not judged)."""

    drafter: str  # "draft_model", "eagle", "ngram", "prediction" or "mix" (both)
    driver: str  # "engine" or "generate"
    seeded: bool
    requests: int
    max_tokens: int
    required: tuple[str, ...] = ("draft 1",)

    @property
    def id(self) -> str:
        return f"{self.drafter}-{self.driver}-{'seeded' if self.seeded else 'unseeded'}"


ALL_POSITIONS = ("draft 1", "draft 2", "draft 3", "bonus")
# The engine runs batch 16 requests per forward and carry the statistics of every draft
# position; generate() runs one request at a time, so they are kept small. Predictions are
# proposed whole (up to 32 tokens): their runs reach the bonus only in short requests. The
# tiny EAGLE head's drafts are rarely accepted, so only its first position is judged.
RUNS = [
    Run("draft_model", "engine", True, 16, 120, ALL_POSITIONS),
    # Unseeded runs draw fresh outputs each time: 3 requests keep "draft 1" well above
    # MIN_GROUP (2 requests gave 88-140 sightings).
    Run("draft_model", "generate", False, 3, 120),
    Run("eagle", "engine", False, 16, 120),
    Run("eagle", "generate", True, 2, 100),
    Run("ngram", "engine", True, 16, 160, ("draft 1", "draft 2", "bonus")),
    Run("ngram", "generate", False, 3, 100),
    # 480 requests saw the bonus 100-132 times (16 runs): too near MIN_GROUP; 640 clear it.
    Run("prediction", "engine", False, 640, 6, ("draft 1", "draft 2", "bonus")),
    Run("prediction", "generate", True, 100, 6),
    # A 3-token prediction continued by the draft model in the same step: positions 1-2
    # come from the prediction (one-hot), 3 onwards from the draft model's distributions.
    Run("mix", "engine", False, 480, 6, ("draft 1", "draft 2", "draft 3")),
]


# ------------------------------------------------------------------ tracing the steps


Trace = dict[int, list[tuple[int, int, int]]]  # id(result.stats) -> (start, proposed, accepted)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """Record every verification step of every sequence, keyed by its stats object (which
    the result carries): where its tokens start, how many drafts it had, how many passed."""
    trace: Trace = {}
    accept = Sequence.accept

    def traced(self: Sequence, logits: torch.Tensor, features: torch.Tensor | None = None) -> str:
        start, proposed, before = len(self.out), self.drafts, self.stats.accepted
        piece = accept(self, logits, features)
        trace.setdefault(id(self.stats), []).append((start, proposed, self.stats.accepted - before))
        return piece

    monkeypatch.setattr(Sequence, "accept", traced)
    return trace


def _groups(result: GenerationResult, trace: Trace) -> Iterator[tuple[str, int]]:
    """(group, output index) of every emitted token: "plain", "draft j" or "bonus"."""
    yield "plain", 0  # the first token comes from the prefill
    for start, proposed, accepted in trace.get(id(result.stats), []):
        for i in range(accepted + 1):
            if start + i >= len(result.token_ids):
                break
            group = "plain" if proposed == 0 else f"draft {i + 1}" if i < proposed else "bonus"
            yield group, start + i


# ------------------------------------------------------------------------- statistics


@dataclass
class Bins:
    observed: torch.Tensor  # [BINS] float64 counts
    expected: torch.Tensor  # [BINS] float64, summed probabilities

    def check(self) -> tuple[float, float]:
        """(TVD, chi-square p-value) of the observed bins against the expected ones."""
        n = float(self.observed.sum())
        tvd = 0.5 * float((self.observed / n - self.expected / n).abs().sum())
        chi2 = ((self.observed - self.expected) ** 2 / self.expected).sum()
        p_value = torch.special.gammaincc(torch.tensor((BINS - 1) / 2), chi2 / 2).item()
        return tvd, p_value

    @property
    def count(self) -> int:
        return int(self.observed.sum())

    def passes(self) -> bool:
        tvd, p_value = self.check()
        return tvd < TVD_SCALE / self.count**0.5 and p_value > MIN_P_VALUE


def _bin_results(
    model: Model, results: list[tuple[list[int], SamplingParams, GenerationResult]], trace: Trace
) -> dict[str, Bins]:
    """Bin every emitted token by its rank under the exact target distribution."""
    bins: dict[str, Bins] = {}
    for prompt, params, result in results:
        ids = prompt + result.token_ids
        cache = model.lm.new_cache(1, len(ids))
        logits = model.lm(ForwardBatch(torch.tensor([ids[:-1]]), [0], [0]), cache)[0]
        probs = target_probs(logits[len(prompt) - 1 :], params)  # [len(output), V]
        for group, i in _groups(result, trace):
            p = probs[i]  # [V]
            chosen = p[result.token_ids[i]]
            assert chosen > 0, f"{group}: a token the target rules out was emitted"
            rank = int((p > chosen).sum())
            top = p.sort(descending=True).values.double()  # [V]
            expected = torch.cat([top[: BINS - 1], top[BINS - 1 :].sum()[None]])  # [BINS]
            entry = bins.setdefault(
                group, Bins(torch.zeros(BINS, dtype=torch.float64), torch.zeros(BINS).double())
            )
            entry.observed[min(rank, BINS - 1)] += 1
            entry.expected += expected
    return bins


# ---------------------------------------------------------------------------- drivers


@pytest.fixture(scope="module")
def target_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("small") / "small.gguf", SMALL)


@pytest.fixture(scope="module")
def target(target_gguf: Path) -> Model:
    return load_model(str(target_gguf), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def quantized_copy(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The target's weights rounded to 4 bits: same vocabulary, a different distribution
    (drafts are accepted often, not always)."""
    path = tmp_path_factory.mktemp("q4") / "small-q4_0.gguf"
    write_tiny_gguf(path, dataclasses.replace(SMALL, linear_type=Q.Q4_0))
    return load_model(str(path), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def eagle_dir(target_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAGLE head trained for the target by the real command."""
    return train_tiny_drafter(target_gguf, tmp_path_factory.mktemp("eagle") / "small-eagle")


def _prompt(rng: random.Random) -> list[int]:
    """A short prompt that repeats itself (n-gram lookups have something to find)."""
    start = rng.randrange(10, 200)
    return list(range(start, start + 5)) * 3


def _requests(
    run: Run, model: Model, speculation: SpeculationConfig
) -> list[tuple[list[int], SamplingParams, list[int] | None]]:
    rng = random.Random(run.id)
    requests = []
    for r in range(run.requests):
        prompt = _prompt(rng)
        seed = 1000 * r + 17 if run.seeded else None
        params = SamplingParams(max_tokens=run.max_tokens, seed=seed, **SAMPLING)  # type: ignore[arg-type]
        prediction = None
        if run.drafter in ("prediction", "mix"):  # the greedy continuation (seed-free)
            greedy = SamplingParams(max_tokens=run.max_tokens, ignore_eos=True)
            prediction = generate(model, prompt, greedy).token_ids
            prediction = prediction[:3] if run.drafter == "mix" else prediction
        requests.append((prompt, params, prediction))
    return requests


def _spec(run: Run, model: Model, draft: Model, drafter_dir: Path) -> SpeculationConfig:
    if run.drafter in ("draft_model", "mix"):
        return SpeculationConfig("draft_model", K, draft_model=draft, adaptive=False)
    if run.drafter == "eagle":
        loaded = speculation_for_drafter(
            "draft_model", K, model, lambda n: model, draft_model=str(drafter_dir)
        )
        # Drafts every position (the tiny head is never confident), no n-gram beside it.
        return SpeculationConfig(
            "eagle", K, eagle=loaded.eagle, adaptive=False, min_draft_survival=0.0
        )
    if run.drafter == "ngram":
        return SpeculationConfig("ngram", 2, ngram_length=1, adaptive=False)
    return SpeculationConfig(adaptive=False)  # a prediction alone, proposed whole


def _run(
    run: Run, model: Model, speculation: SpeculationConfig
) -> list[tuple[list[int], SamplingParams, GenerationResult]]:
    requests = _requests(run, model, speculation)
    if run.driver == "generate":
        return [
            (
                prompt,
                params,
                generate(model, prompt, params, speculation=speculation, prediction_ids=pred),
            )
            for prompt, params, pred in requests
        ]
    engine = Engine(model, max_batch=16, max_queue=len(requests), prefill_chunk=64)
    done: dict[int, GenerationResult] = {}
    finished = threading.Event()

    def finish(i: int, result: GenerationResult | None, error: BaseException | None) -> None:
        assert error is None and result is not None, error
        done[i] = result
        if len(done) == len(requests):
            finished.set()

    try:
        for i, (prompt, params, prediction) in enumerate(requests):
            engine.submit(
                prompt,
                params,
                lambda piece: None,
                lambda r, e, i=i: finish(i, r, e),
                speculation=speculation,
                prediction_ids=prediction,
            )
        assert finished.wait(300), "the engine did not finish the requests"
    finally:
        engine.stop()
    return [(prompt, params, done[i]) for i, (prompt, params, _) in enumerate(requests)]


# ------------------------------------------------------------------------------ tests


def _greedy_acceptance(
    logits: torch.Tensor,
    proposal: Proposal,
    params: SamplingParams,
    accept_gen: torch.Generator,
    sample_gen: torch.Generator,
) -> tuple[list[int], int]:
    """A wrong verifier: keep drafts while they are the target's argmax, then sample."""
    probs = target_probs(logits, params)  # [k + 1, V]
    for i, token in enumerate(proposal.token_ids):
        if token != int(probs[i].argmax()):
            return [*proposal.token_ids[:i], int(sample(probs[i : i + 1], sample_gen)[0])], i
    k = len(proposal.token_ids)
    return [*proposal.token_ids, int(sample(probs[k:], sample_gen)[0])], k


def _check_run(
    run: Run, model: Model, draft: Model, drafter_dir: Path, trace: Trace
) -> dict[str, Bins]:
    speculation = _spec(run, model, draft, drafter_dir)
    bins = _bin_results(model, _run(run, model, speculation), trace)
    for group, entry in sorted(bins.items()):
        print(f"{run.id} {group}: n={entry.count} (TVD, p-value)={entry.check()}")
    return bins


@pytest.mark.parametrize("run", RUNS, ids=[run.id for run in RUNS])
def test_sampled_output_has_the_target_distribution(
    run: Run, target: Model, quantized_copy: Model, eagle_dir: Path, steps: Trace
) -> None:
    bins = _check_run(run, target, quantized_copy, eagle_dir, steps)
    for group in run.required:
        assert group in bins and bins[group].count >= MIN_GROUP, f"{group} too rarely seen"
    for group, entry in bins.items():
        if entry.count >= MIN_GROUP:
            assert entry.passes(), (group, entry.count, entry.check())


def test_greedy_acceptance_under_sampling_fails_the_bounds(
    target: Model,
    quantized_copy: Model,
    eagle_dir: Path,
    steps: Trace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The negative control: the same run with a verifier that accepts a draft when it is the
    target's argmax (a greedy rule applied to sampling) is far from the target's distribution."""
    monkeypatch.setattr(sequence_module, "_verify", _greedy_acceptance)
    bins = _check_run(RUNS[0], target, quantized_copy, eagle_dir, steps)
    tvd, p_value = bins["draft 1"].check()
    assert tvd > TVD_SCALE / bins["draft 1"].count ** 0.5 and p_value < MIN_P_VALUE
