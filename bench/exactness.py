"""Exactness of the multi-token forward on real models: a forward over k new tokens gives
bit-identical logits to k single steps, k = 1..32, in the default (gguf) format or others.

For each model and prompt (Spec-Bench first turns, chat template applied): prefill, then 32
greedy single steps, keeping each step's logits. Then for every k, the k-token forward over
the same tokens on a cache whose k positions were first poisoned with NaN (so a forward that
failed to write its own keys and values would read NaN), compared position by position with
``torch.equal``. Not a timed benchmark: it counts identical positions.

    python -m bench.exactness [--models a,b] [--formats auto,bfloat16] [--prompts 3] [--max-k 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, machine_info, sample_prompts, set_threads, write_json
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch

MODELS = (
    "qwen2.5-coder-1.5b-instruct",
    "qwen2.5-coder-0.5b-instruct",
    "smollm2-135m-instruct",
    "gemma-3-270m",  # head norms, tanh-GELU, sliding windows
)


def forward(model: Model, cache: object, tokens: Sequence[int], start: int) -> torch.Tensor:
    batch = ForwardBatch(torch.tensor([list(tokens)]), [0], [start])
    return model.lm(batch, cache)[0]


def check_prompt(model: Model, prompt: list[int], max_k: int) -> dict[str, int]:
    """Identical positions out of all compared, for k = 1..max_k after ``prompt``."""
    cache = model.lm.new_cache(max_len=len(prompt) + max_k + 1)
    tokens = [int(forward(model, cache, prompt, 0)[-1].argmax())]
    single = []
    for i in range(max_k):
        single.append(forward(model, cache, tokens[-1:], len(prompt) + i)[-1])
        tokens.append(int(single[-1].argmax()))
    identical = compared = 0
    for k in range(1, max_k + 1):
        cache.keys[:, 0, :, len(prompt) : len(prompt) + k] = float("nan")
        cache.values[:, 0, :, len(prompt) : len(prompt) + k] = float("nan")
        multi = forward(model, cache, tokens[:k], len(prompt))
        identical += sum(torch.equal(row, ref) for row, ref in zip(multi, single, strict=False))
        compared += k
    return {"identical": identical, "compared": compared}


def check_model(name: str, fmt: str, prompts: int, max_k: int) -> dict[str, object]:
    """One model in one format over ``prompts`` Spec-Bench prompts: the counts, printed too."""
    model = load_model(name, dtype=fmt, progress=False)
    totals = {"identical": 0, "compared": 0}
    for prompt in sample_prompts(prompts):
        ids = model.tokenizer.encode_chat([{"role": "user", "content": prompt.text}])
        counts = check_prompt(model, ids, max_k)
        totals = {key: totals[key] + counts[key] for key in totals}
    print(
        f"{name} ({model.fmt}): {totals['identical']} of {totals['compared']} positions "
        f"bit-identical, k = 1..{max_k}, {prompts} prompts",
        flush=True,
    )
    return {"model": name, "format": model.fmt, **totals}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--formats", default="auto", help="execution formats (--dtype), each run")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "exactness.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    rows = [
        check_model(name, fmt, args.prompts, args.max_k)
        for name in args.models.split(",")
        for fmt in args.formats.split(",")
    ]
    write_json(
        args.out,
        {
            "machine": machine_info(args.threads),
            "max_k": args.max_k,
            "prompts": args.prompts,
            "results": rows,
        },
    )
    return 0 if all(r["identical"] == r["compared"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
