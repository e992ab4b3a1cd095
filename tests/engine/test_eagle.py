"""EAGLE drafters in the decoding loop: trained by the CLI, lossless, batched, deployable."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from specserve.deployments.rules import DrafterFlags
from specserve.deployments.service import create_deployment
from specserve.deployments.store import DeploymentStore
from specserve.drafters.cli import PROMPTS_FILE
from specserve.drafters.collect import self_distill
from specserve.drafters.prompts import synthetic_prompts
from specserve.engine.generate import generate
from specserve.engine.prompt_file import PromptRecord, load_prompts, parse_prompt
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from specserve.model.vocab import VocabularyMismatchError
from specserve.speculative.config import SpeculationConfig, speculation_for_drafter
from specserve.speculative.head_artifact import DrafterError, load_drafter, read_manifest
from specserve.speculative.proposers.base import SequenceContext
from specserve.speculative.proposers.eagle import EagleProposer
from specserve.speculative.sampling import SamplingParams
from tests.engaged import StepLog, assert_engaged_overall
from tests.tiny import TinySpec, write_tiny_gguf

PROMPTS = [[5, 6, 7, 8] * 5, list(range(40, 60)), [9, 10, 11] * 6]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


def _eagle(model: Model, path: Path, with_ngram: bool = False) -> SpeculationConfig:
    speculation = speculation_for_drafter(
        "draft_model", 4, model, lambda n: model, draft_model=str(path)
    )
    assert (
        speculation.method == "eagle" and speculation.with_ngram
    )  # a trained head comes with n-gram
    if not with_ngram:
        speculation = SpeculationConfig("eagle", 4, eagle=speculation.eagle)
    # The tiny random head is never confident: without this it would hardly ever draft. Fixed
    # length, so the timing-driven tuner cannot switch drafting off.
    return dataclasses.replace(speculation, min_draft_survival=0.0, adaptive=False)


def test_training_command_writes_a_drafter(drafter_dir: Path, tiny_model: Model) -> None:
    manifest = read_manifest(drafter_dir)
    assert manifest["method"] == "eagle"
    assert manifest["target"]["vocab_fingerprint"] == tiny_model.tokenizer.vocab_fingerprint()
    training = manifest["training"]
    assert training["prompts"] == 20 and training["positions"] > 300
    recorded = load_prompts(drafter_dir / PROMPTS_FILE)  # the drafter's training prompts
    assert recorded == [parse_prompt(row, "built-in") for row in synthetic_prompts(20)]
    assert training["summary"]["recipe"]["steps"] == 2  # the recipe is recorded with the drafter
    held_out = training["held_out"]  # the 20th conversation, never trained on
    assert held_out["conversations"] == 1 and held_out["anchors"] > 0
    assert len(held_out["acceptance"]) == 4


@pytest.mark.parametrize("with_ngram", [False, True])
def test_eagle_greedy_output_equals_plain(
    drafter_dir: Path, tiny_model: Model, with_ngram: bool
) -> None:
    speculation = _eagle(tiny_model, drafter_dir, with_ngram)
    results = []
    for prompt in PROMPTS:
        plain = generate(tiny_model, prompt, GREEDY)
        result = generate(tiny_model, prompt, GREEDY, speculation=speculation)
        assert result.token_ids == plain.token_ids
        results.append(result)
    # The head drafted. (The tiny head's greedy drafts are never accepted, so
    # accepted > 0 cannot be asked here; the distribution tests see its drafts accepted.)
    assert all(r.stats.by_method["eagle"].proposed > 0 for r in results)


def test_eagle_sampling_runs_with_draft_distributions(drafter_dir: Path, tiny_model: Model) -> None:
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    result = generate(tiny_model, PROMPTS[0], params, speculation=_eagle(tiny_model, drafter_dir))
    assert len(result.token_ids) == 24
    assert all(0 <= t < tiny_model.lm.config.vocab_size for t in result.token_ids)


def test_eagle_in_a_batch_equals_alone(drafter_dir: Path, tiny_model: Model) -> None:
    speculation = _eagle(tiny_model, drafter_dir)
    alone = [generate(tiny_model, p, GREEDY, speculation=speculation).token_ids for p in PROMPTS]
    engine = Engine(tiny_model, max_batch=3, prefill_chunk=8)  # features arrive in chunks
    steps = StepLog(engine)
    results: dict[int, GenerationResult] = {}
    done = threading.Event()

    def finish(i: int, result: GenerationResult | None) -> None:
        assert result is not None
        results[i] = result
        if len(results) == len(PROMPTS):
            done.set()

    try:
        for i, prompt in enumerate(PROMPTS):
            engine.submit(
                prompt,
                GREEDY,
                lambda piece: None,
                lambda r, e, i=i: finish(i, r),
                speculation=speculation,
            )
        assert done.wait(60)
    finally:
        engine.stop()
    assert [results[i].token_ids for i in range(len(PROMPTS))] == alone
    assert all(r.stats.by_method["eagle"].proposed > 0 for r in results.values())
    steps.assert_batched_drafts()


def test_drafter_serves_only_its_target(drafter_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "d.db")
    flags = DrafterFlags(draft_model=str(drafter_dir), draft_token_count=4)
    deployment = create_deployment(store, str(tiny_gguf), flags, id="tiny")
    assert deployment.effective_drafter().source == "configured"
    other_vocab = write_tiny_gguf(tmp_path / "other.gguf", TinySpec(extra_tokens=3))
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        create_deployment(store, str(other_vocab), flags, id="other")
    other_weights = write_tiny_gguf(tmp_path / "seed1.gguf", TinySpec(seed=1))
    model = load_model(str(other_weights), dtype="float32", progress=False)
    with pytest.raises(DrafterError, match="drafter train"):
        load_drafter(drafter_dir, model)


def test_self_distillation_keeps_the_generation_features(tiny_model: Model) -> None:
    """The engine's recorded features (chunked prefill + decode steps, batched) equal one
    full forward over the conversation; labels are the greedy answer's next tokens."""
    prompts = [PromptRecord(messages=None, prompt=None, prompt_token_ids=p) for p in PROMPTS]
    sequences = self_distill(tiny_model, prompts, max_tokens=12, batch=2)
    for prompt, seq in zip(PROMPTS, sequences, strict=True):
        answer = generate(tiny_model, prompt, SamplingParams(max_tokens=12)).token_ids
        conversation = prompt + answer
        assert seq.tokens.tolist() == conversation[:-1]
        assert seq.target_next.tolist() == conversation[1:]
        assert seq.loss_from == len(prompt)
        lm = tiny_model.lm
        batch = ForwardBatch(torch.tensor([conversation[:-1]]), [0], [0])
        _, features = lm.forward_with_features(batch, lm.new_cache(1, len(conversation)))
        torch.testing.assert_close(seq.features.float(), features[0], atol=0.05, rtol=0.02)


def test_the_window_skips_positions_the_head_never_reads(
    drafter_dir: Path, tiny_model: Model
) -> None:
    """A proposer with a window of W drafts from the last W positions only: the same drafts
    as a proposer that was handed just those positions, and nothing before them is computed."""
    head = load_drafter(drafter_dir, tiny_model)
    prompt, W = PROMPTS[1], 6  # 20 tokens
    lm, vocab = tiny_model.lm, tiny_model.lm.config.vocab_size
    batch = ForwardBatch(torch.tensor([prompt]), [0], [0])
    _, features = lm.forward_with_features(batch, lm.new_cache(1, 64))
    known = len(prompt) - 1  # a proposer drafts once the features of all but the last token are in
    windowed = EagleProposer(head, GREEDY, 64, vocab, min_survival=0.0, window=W)
    windowed.add_features(0, features[0, :known])
    drafts = windowed.propose(SequenceContext.of(prompt), 4).token_ids
    assert windowed.cache.first == known - W and len(drafts) == 4
    alone = EagleProposer(head, GREEDY, 64, vocab, min_survival=0.0, window=64)
    alone.add_features(known - W, features[0, known - W : known])
    alone.synced = alone.cache.first = known - W
    assert alone.propose(SequenceContext.of(prompt), 4).token_ids == drafts


@pytest.mark.slow
def test_shipped_eagle_head_is_accepted_and_lossless_on_smollm2(smollm2: Model) -> None:
    """The shipped head on the real SmolLM2: greedy output equals plain and the verifier
    accepts some of its drafts (the tiny random head above never has any accepted)."""
    speculation = speculation_for_drafter(
        "draft_model", 4, smollm2, lambda n: smollm2, draft_model="smollm2-135m-instruct-eagle"
    )
    speculation = SpeculationConfig(
        "eagle", 4, eagle=speculation.eagle, adaptive=False
    )  # no n-gram help
    params = SamplingParams(max_tokens=48)
    prompts = ["Explain what a hash map is.", "Write a haiku about autumn rain."]
    results = []
    for text in prompts:
        prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": text}])
        plain = generate(smollm2, prompt, params)
        result = generate(smollm2, prompt, params, speculation=speculation)
        assert result.token_ids == plain.token_ids, text
        results.append(result)
    assert_engaged_overall(results, "eagle")
