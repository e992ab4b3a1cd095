"""Training a drafter from start to end: prompts -> the target's answers -> a head on disk.

`train_drafter` is what ``specserve drafter train`` runs. It prints nothing but progress
bars and returns a `TrainingReport`; the command only maps flags onto `TrainingOptions` and
prints the report.

>>> options = TrainingOptions("smollm2-135m-instruct", Path("drafters/mine"), prompts=400)
>>> report = train_drafter(options)  # doctest: +SKIP
>>> report.held_out_acceptance["accepted_length"]  # drafts of 4 accepted  # doctest: +SKIP

Heavy modules (the engine, the training loop) are imported when training runs, so that
importing this module (every ``specserve`` command does, through the CLI) stays cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specserve.drafters.training import Recipe, TrainingSequence
    from specserve.engine.prompt_file import PromptRecord
    from specserve.model.loader import Model
    from specserve.speculative.eagle_head import EagleHead

HOLD_OUT_EVERY = 20  # conversations: 5% held out to report the head's acceptance
PROMPTS_FILE = "prompts.jsonl"  # in the drafter's directory: the prompts it was trained on
CHECKPOINTS_DIR = "checkpoints"  # in the drafter's directory: the answers and the checkpoints
HELD_OUT_STEPS = 4  # drafts per chain in the held-out report (the k the command suggests)
# Settings that must be positive integers when given (None: the recipe's default).
POSITIVE = ("prompts", "max_tokens", "epochs", "draft_vocab", "batch", "batch_tokens")


@dataclass(frozen=True)
class TrainingOptions:
    """What to train, on what, and how: the flags of ``specserve drafter train``."""

    target: str  # catalog name or path of the target model
    out: Path  # the drafter directory to write
    data: Path | None = None  # JSONL prompts; None: the built-in synthetic set
    prompts: int = 1200  # how many prompts to use
    max_tokens: int = 160  # length of the target's answers
    epochs: int = 12
    lr: float = 2e-3
    batch_tokens: int = 1024  # positions per optimizer step
    draft_vocab: int = 8192  # rows of the reduced head
    unroll_steps: int | None = None  # None: the built-in recipe's
    feature_noise: float | None = None  # None: the built-in recipe's
    batch: int = 16  # sequences generated at once
    resume: bool = False  # continue an interrupted run
    seed: int = 0
    dtype: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        """ValueError naming the flag of the first setting out of range."""
        for name in (*POSITIVE, "unroll_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.feature_noise is not None and self.feature_noise < 0:
            raise ValueError("--feature-noise must not be negative")


@dataclass(frozen=True)
class TrainingReport:
    """What a finished training run wrote and measured."""

    target: str  # the target model's name
    path: Path  # the drafter directory written
    prompts: int
    positions: int  # training positions (the held-out conversations' not counted)
    seconds: float  # from the start to the trained head (saving not counted)
    held_out: int  # conversations held out of training
    # chain_acceptance on the held-out answers ("accepted_length", "acceptance" by draft
    # position, "anchors"); None when too few conversations left none to hold out.
    held_out_acceptance: dict[str, Any] | None
    resumed: bool  # the target's answers were reused from an interrupted run


def train_drafter(
    options: TrainingOptions, notify: Callable[[str], None] = lambda message: None
) -> TrainingReport:
    """Self-distil a draft head for ``options.target`` and write it to ``options.out``.

    ``notify`` hears what the run decided on the way (it reuses recorded answers).
    """
    from specserve.drafters.training import chain_acceptance, train
    from specserve.model.loader import load_model, set_compute_threads
    from specserve.speculative.head_artifact import save_drafter

    options.check()
    if options.threads is not None:
        set_compute_threads(options.threads)
    began = time.perf_counter()
    prompts, source = _training_prompts(options)
    model = load_model(options.target, dtype=options.dtype)
    checkpoints = options.out / CHECKPOINTS_DIR
    sequences, resumed = _answers(model, prompts, source, options, checkpoints)
    if resumed:
        notify(f"resuming: {len(sequences)} recorded conversations reused")
    sequences, held_out = _hold_out(sequences)
    head = _new_head(model, sequences, options.draft_vocab)
    summary = train(
        head,
        sequences,
        epochs=options.epochs,
        lr=options.lr,
        batch_tokens=options.batch_tokens,
        checkpoint_dir=checkpoints,
        resume=options.resume,
        seed=options.seed,
        recipe=_recipe(options, model),
    )
    validation = chain_acceptance(head, held_out, steps=HELD_OUT_STEPS) if held_out else None
    report = TrainingReport(
        target=model.name,
        path=options.out,
        prompts=len(prompts),
        positions=sum(len(s.tokens) for s in sequences),
        seconds=round(time.perf_counter() - began, 1),
        held_out=len(held_out),
        held_out_acceptance=validation,
        resumed=resumed,
    )
    _record_prompts(options.out / PROMPTS_FILE, prompts)
    save_drafter(options.out, head, model, _manifest_record(options, source, summary, report))
    return report


def _training_prompts(options: TrainingOptions) -> tuple[list[PromptRecord], str]:
    """The prompts to answer and where they came from."""
    from specserve.drafters.prompts import synthetic_prompts
    from specserve.engine.prompt_file import load_prompts, parse_prompt

    if options.data:
        prompts = load_prompts(options.data, options.prompts)
        source = str(options.data)
    else:
        rows = synthetic_prompts(options.prompts, options.seed)
        prompts = [parse_prompt(row, f"built-in prompt {i}") for i, row in enumerate(rows)]
        source = f"built-in synthetic prompts (specserve/drafters/prompts.py, seed {options.seed})"
    return prompts, source


def _answers(
    model: Model,
    prompts: list[PromptRecord],
    source: str,
    options: TrainingOptions,
    checkpoints: Path,
) -> tuple[list[TrainingSequence], bool]:
    """The target's answers with their features, and whether they were reused: with
    ``resume``, those an earlier run recorded for the same target and prompts; else the
    target answers now (and they are recorded for a resumed run)."""
    from specserve.drafters.collect import (
        DATA_FILE,
        DATA_VERSION,
        load_data,
        save_data,
        self_distill,
    )

    meta = {
        "target": model.name,
        "vocab": model.tokenizer.vocab_fingerprint(),
        "source": source,
        "prompts": str(len(prompts)),
        "max_tokens": str(options.max_tokens),
        "format": model.fmt,
        "data": DATA_VERSION,
    }
    sequences = load_data(checkpoints / DATA_FILE, meta) if options.resume else None
    if sequences is not None:
        return sequences, True
    sequences = self_distill(model, prompts, options.max_tokens, options.batch)
    save_data(checkpoints / DATA_FILE, sequences, meta)
    return sequences, False


def _hold_out(
    sequences: list[TrainingSequence],
) -> tuple[list[TrainingSequence], list[TrainingSequence]]:
    """(training, held out): every HOLD_OUT_EVERY-th conversation is held out, so that the
    manifest reports how a chain of drafts fares on answers the head never trained on (with
    few conversations, none is)."""
    held_out = sequences[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY]
    training = [s for i, s in enumerate(sequences) if (i + 1) % HOLD_OUT_EVERY]
    return training, held_out


def _new_head(model: Model, sequences: list[TrainingSequence], draft_vocab: int) -> EagleHead:
    """An untrained head for ``model`` whose reduced vocabulary fits ``sequences``."""
    from specserve.drafters.training import choose_vocab
    from specserve.speculative.eagle_head import EagleConfig
    from specserve.speculative.head_artifact import build_head

    vocab_ids = choose_vocab(
        sequences, draft_vocab, model.tokenizer.eos_ids, model.lm.config.vocab_size
    )
    config = EagleConfig.for_target(model.lm.config, draft_vocab_size=len(vocab_ids))
    return build_head(model, config, vocab_ids)


def _recipe(options: TrainingOptions, model: Model) -> Recipe:
    """The built-in recipe with the options' overrides."""
    import torch

    from specserve.drafters.training import DEFAULT_RECIPE

    return replace(
        DEFAULT_RECIPE,
        steps=DEFAULT_RECIPE.steps if options.unroll_steps is None else options.unroll_steps,
        feature_noise=(
            DEFAULT_RECIPE.feature_noise if options.feature_noise is None else options.feature_noise
        ),
        bf16_autocast=model.lm.dtype == torch.bfloat16,  # matmuls as the head will run them
    )


def _manifest_record(
    options: TrainingOptions, source: str, summary: dict[str, Any], report: TrainingReport
) -> dict[str, Any]:
    """What the drafter's manifest records about its training."""
    validation = report.held_out_acceptance
    return {
        "data": source,
        "prompts": report.prompts,
        "positions": report.positions,
        "max_tokens": options.max_tokens,
        "epochs": options.epochs,
        "lr": options.lr,
        "batch_tokens": options.batch_tokens,
        "seed": options.seed,
        "summary": summary,
        "held_out": validation and {"conversations": report.held_out, **validation},
        "seconds": report.seconds,
    }


def _record_prompts(path: Path, prompts: list[PromptRecord]) -> None:
    """The drafter's record of what it was trained on (rows `--data` reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt in prompts:
            out.write(json.dumps(prompt.as_row(), ensure_ascii=False) + "\n")
