"""``specserve drafter``: train an EAGLE-style draft head for a target, on your prompts.

    specserve drafter train smollm2-135m-instruct --out drafters/mine           # built-in prompts
    specserve drafter train smollm2-135m-instruct --data traffic.jsonl --out drafters/mine
    specserve drafter prompts --count 400 > prompts.jsonl                        # the built-in set

The data file takes the rows `specserve tune` reads (``messages`` or ``prompt``), so the
server's ``--record-traffic`` log trains a drafter adapted to your traffic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from specserve.model.loader import DTYPE_CHOICES, set_compute_threads

if TYPE_CHECKING:
    from specserve.tune.runner import TunePrompt

HOLD_OUT_EVERY = 20  # conversations: 5% held out to report the head's acceptance
PROMPTS_FILE = "prompts.jsonl"  # in the drafter's directory: the prompts it was trained on


def add_drafter_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drafter",
        help="train EAGLE-style draft heads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="drafter_command", required=True)
    train = commands.add_parser("train", help="self-distil a draft head from the target")
    train.add_argument("target", help="catalog name or path of the target model")
    train.add_argument("--out", type=Path, required=True, help="drafter directory to write")
    train.add_argument(
        "--data", type=Path, help="JSONL prompts (default: the built-in synthetic set)"
    )
    train.add_argument("--prompts", type=int, default=1200, help="how many prompts to use")
    train.add_argument("--max-tokens", type=int, default=160, help="response length")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument(
        "--batch-tokens", type=int, default=1024, help="positions per optimizer step"
    )
    train.add_argument("--draft-vocab", type=int, default=8192, help="rows of the reduced head")
    train.add_argument(
        "--unroll-steps",
        type=int,
        help="draft steps trained on the head's own features (training-time test; "
        "default: the built-in recipe's)",
    )
    train.add_argument(
        "--feature-noise",
        type=float,
        help="uniform noise on input features, relative to their RMS (default: the recipe's)",
    )
    train.add_argument("--batch", type=int, default=16, help="sequences generated at once")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    train.add_argument("--threads", type=int)
    prompts = commands.add_parser("prompts", help="print the built-in training prompts (JSONL)")
    prompts.add_argument("--count", type=int, default=1200)
    prompts.add_argument("--seed", type=int, default=0)


def run_drafter_command(args: argparse.Namespace) -> int:
    if args.drafter_command == "prompts":
        from specserve.drafters.prompts import synthetic_prompts

        for row in synthetic_prompts(args.count, args.seed):
            print(json.dumps(row))
        return 0
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from specserve.drafters.artifact import build_head, save_drafter
    from specserve.drafters.collect import (
        DATA_FILE,
        DATA_VERSION,
        load_data,
        save_data,
        self_distill,
    )
    from specserve.drafters.eagle import EagleConfig
    from specserve.drafters.training import DEFAULT_RECIPE, chain_acceptance, choose_vocab, train
    from specserve.model.loader import load_model

    names = ("prompts", "max_tokens", "epochs", "draft_vocab", "batch", "batch_tokens")
    for name in (*names, "unroll_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.feature_noise is not None and args.feature_noise < 0:
        raise ValueError("--feature-noise must not be negative")
    if args.threads:
        set_compute_threads(args.threads)
    began = time.perf_counter()
    prompts, source = _training_prompts(args)
    model = load_model(args.target, dtype=args.dtype)
    checkpoints = args.out / "checkpoints"
    meta = {
        "target": model.name,
        "vocab": model.tokenizer.vocab_fingerprint(),
        "source": source,
        "prompts": str(len(prompts)),
        "max_tokens": str(args.max_tokens),
        "format": model.fmt,
        "data": DATA_VERSION,
    }
    sequences = load_data(checkpoints / DATA_FILE, meta) if args.resume else None
    if sequences is None:
        sequences = self_distill(model, prompts, args.max_tokens, args.batch)
        save_data(checkpoints / DATA_FILE, sequences, meta)
    else:
        print(f"resuming: {len(sequences)} recorded conversations reused", file=sys.stderr)
    recipe = replace(
        DEFAULT_RECIPE,
        steps=DEFAULT_RECIPE.steps if args.unroll_steps is None else args.unroll_steps,
        feature_noise=(
            DEFAULT_RECIPE.feature_noise if args.feature_noise is None else args.feature_noise
        ),
        bf16_autocast=model.lm.dtype == torch.bfloat16,  # matmuls as the head will run them
    )
    # Every HOLD_OUT_EVERY-th conversation is held out: the manifest reports how a chain of
    # drafts fares on answers the head never trained on (with few conversations, none).
    held_out = sequences[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY]
    sequences = [s for i, s in enumerate(sequences) if (i + 1) % HOLD_OUT_EVERY]
    positions = sum(len(s.tokens) for s in sequences)
    vocab_ids = choose_vocab(
        sequences, args.draft_vocab, model.tokenizer.eos_ids, model.lm.config.vocab_size
    )
    config = EagleConfig.for_target(model.lm.config, draft_vocab_size=len(vocab_ids))
    head = build_head(model, config, vocab_ids)
    summary = train(
        head,
        sequences,
        epochs=args.epochs,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        checkpoint_dir=checkpoints,
        resume=args.resume,
        seed=args.seed,
        recipe=recipe,
    )
    validation = chain_acceptance(head, held_out, steps=4) if held_out else None
    training = {
        "data": source,
        "prompts": len(prompts),
        "positions": positions,
        "max_tokens": args.max_tokens,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_tokens": args.batch_tokens,
        "seed": args.seed,
        "summary": summary,
        "held_out": validation and {"conversations": len(held_out), **validation},
        "seconds": round(time.perf_counter() - began, 1),
    }
    _record_prompts(args.out / PROMPTS_FILE, prompts)
    path = save_drafter(args.out, head, model, training)
    if validation:
        rates = " ".join(f"{a:.2f}" for a in validation["acceptance"])
        print(
            f"held-out answers ({len(held_out)} conversations): "
            f"{validation['accepted_length']:.2f} drafts of 4 accepted per chain; "
            f"acceptance by position {rates}",
            file=sys.stderr,
        )
    print(
        f"drafter for {model.name} written to {path} ({positions} positions from "
        f"{len(prompts)} prompts, {training['seconds']:.0f} s)\n"
        f"use it: specserve deployment create {args.target} --draft-model {path} "
        "--draft-token-count 4",
        file=sys.stderr,
    )
    return 0


def _training_prompts(args: argparse.Namespace) -> tuple[list[TunePrompt], str]:
    """The prompts to answer and where they came from."""
    from specserve.drafters.prompts import synthetic_prompts
    from specserve.tune.runner import load_prompts, parse_prompt

    if args.data:
        prompts = load_prompts(args.data, args.prompts)
        source = str(args.data)
    else:
        rows = synthetic_prompts(args.prompts, args.seed)
        prompts = [parse_prompt(row, f"built-in prompt {i}") for i, row in enumerate(rows)]
        source = f"built-in synthetic prompts (specserve/drafters/prompts.py, seed {args.seed})"
    return prompts, source


def _record_prompts(path: Path, prompts: list[TunePrompt]) -> None:
    """The drafter's record of what it was trained on (rows `--data` reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt in prompts:
            out.write(json.dumps(prompt.as_row(), ensure_ascii=False) + "\n")
