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
from dataclasses import fields
from pathlib import Path

from specserve.drafters.pipeline import (
    HELD_OUT_STEPS,
    PROMPTS_FILE,
    TrainingOptions,
    train_drafter,
)
from specserve.model.loader import DTYPE_CHOICES

# PROMPTS_FILE is re-exported: tests find a drafter's training prompts by it.
__all__ = ["PROMPTS_FILE", "add_drafter_parser", "run_drafter_command"]


def add_drafter_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drafter",
        help="train EAGLE-style draft heads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="drafter_command", required=True)
    # The defaults are TrainingOptions' own, so the command and the library agree.
    train = commands.add_parser("train", help="self-distil a draft head from the target")
    train.add_argument("target", help="catalog name or path of the target model")
    train.add_argument("--out", type=Path, required=True, help="drafter directory to write")
    train.add_argument(
        "--data", type=Path, help="JSONL prompts (default: the built-in synthetic set)"
    )
    train.add_argument(
        "--prompts", type=int, default=TrainingOptions.prompts, help="how many prompts to use"
    )
    train.add_argument(
        "--max-tokens", type=int, default=TrainingOptions.max_tokens, help="response length"
    )
    train.add_argument("--epochs", type=int, default=TrainingOptions.epochs)
    train.add_argument("--lr", type=float, default=TrainingOptions.lr)
    train.add_argument(
        "--batch-tokens",
        type=int,
        default=TrainingOptions.batch_tokens,
        help="positions per optimizer step",
    )
    train.add_argument(
        "--draft-vocab",
        type=int,
        default=TrainingOptions.draft_vocab,
        help="rows of the reduced head",
    )
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
    train.add_argument(
        "--batch", type=int, default=TrainingOptions.batch, help="sequences generated at once"
    )
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument("--seed", type=int, default=TrainingOptions.seed)
    train.add_argument("--dtype", choices=DTYPE_CHOICES, default=TrainingOptions.dtype)
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
    options = TrainingOptions(**{f.name: getattr(args, f.name) for f in fields(TrainingOptions)})
    report = train_drafter(options, notify=lambda message: print(message, file=sys.stderr))
    validation = report.held_out_acceptance
    if validation:
        rates = " ".join(f"{a:.2f}" for a in validation["acceptance"])
        print(
            f"held-out answers ({report.held_out} conversations): "
            f"{validation['accepted_length']:.2f} drafts of {HELD_OUT_STEPS} accepted per chain; "
            f"acceptance by position {rates}",
            file=sys.stderr,
        )
    print(
        f"drafter for {report.target} written to {report.path} ({report.positions} positions "
        f"from {report.prompts} prompts, {report.seconds:.0f} s)\n"
        f"use it: specserve deployment create {args.target} --draft-model {report.path} "
        f"--draft-token-count {HELD_OUT_STEPS}",
        file=sys.stderr,
    )
    return 0
