"""Offline acceptance of trained drafters on Spec-Bench: how long a greedy draft chain would be
accepted, per group, without timing anything.

SmolLM2-135M answers Spec-Bench prompts greedily once (cached next to the results); the
target's features of those answers are recorded, and each drafter drafts ``--steps`` tokens
from every answer position at once (the unrolled forward: its own features fed back, tokens
as accepted). Exact for greedy decoding — a chain is accepted while each draft equals the
target's argmax — and fast, so training recipes can be compared before a timed benchmark.

    python -m bench.drafter_acceptance [DRAFTER_DIR ...] [--per-group 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    SPEC_BENCH_GROUPS,
    machine_info,
    markdown_table,
    sample_prompts,
    set_threads,
    write_json,
)
from specserve.drafters.collect import load_data, save_data, self_distill
from specserve.drafters.training import TrainingSequence, chain_acceptance
from specserve.engine.prompt_file import PromptRecord
from specserve.model.loader import Model, load_model
from specserve.speculative.head_artifact import load_drafter

SHIPPED = Path(__file__).resolve().parents[1] / "specserve" / "drafters" / "shipped"
CACHE = Path(__file__).resolve().parent / ".cache"


def evaluation_data(
    model: Model, per_group: int, max_tokens: int
) -> dict[str, list[TrainingSequence]]:
    """Greedy answers to ``per_group`` prompts of each Spec-Bench group, with features."""
    prompts = sample_prompts(per_group * len(SPEC_BENCH_GROUPS))
    meta = {"target": model.name, "prompts": str(len(prompts)), "max_tokens": str(max_tokens)}
    meta["format"] = model.fmt
    path = CACHE / f"acceptance-{model.name}-{len(prompts)}-{max_tokens}.safetensors"
    chats = [
        PromptRecord(messages=[{"role": "user", "content": p.text}], prompt=None) for p in prompts
    ]
    sequences = load_data(path, meta)
    if sequences is None:
        sequences = self_distill(model, chats, max_tokens, batch=len(chats))
        save_data(path, sequences, meta)
    by_group: dict[str, list[TrainingSequence]] = defaultdict(list)
    for prompt, sequence in zip(prompts, sequences, strict=True):
        by_group[prompt.category].append(sequence)
    return dict(by_group)


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    model = load_model("smollm2-135m-instruct", progress=False)
    data = evaluation_data(model, args.per_group, args.max_tokens)
    rows = []
    for directory in args.drafters:
        head = load_drafter(directory, model)
        began = time.perf_counter()
        for group, sequences in [*data.items(), ("all", [s for g in data.values() for s in g])]:
            result = chain_acceptance(head, sequences, args.steps)
            rows.append({"drafter": directory.name, "group": group, **result})
        print(f"{directory.name}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    return {
        "machine": machine_info(args.threads),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["drafter", "group", "accepted drafts / chain", "acceptance by position", "anchors"],
        [
            (
                row["drafter"],
                row["group"],
                f"{row['accepted_length']:.2f}",
                " ".join(f"{a:.2f}" for a in row["acceptance"]),
                row["anchors"],
            )
            for row in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "drafters", nargs="*", type=Path, default=sorted(p for p in SHIPPED.iterdir() if p.is_dir())
    )
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "drafter_acceptance.json")
    args = parser.parse_args()
    result = run(args)
    write_json(args.out, result)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
