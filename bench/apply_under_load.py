"""An editor's apply request while chats run: packed batches and short prefill chunks.

Each HumanEvalFix fix (the buggy function as the Predicted Output) is submitted to the
server's engine together with ``--chats`` Spec-Bench chat requests, all with the coder
model's default drafter (n-gram, plus the prediction on the apply request), greedy, on three
engines in turn (rotating the order per fix):

- ``padded``: rows padded to one width per step, 512-token prefill chunks (the engine
  before packing; what runtimes without packed forwards do);
- ``packed``: each row only its own tokens, 512-token prefill chunks;
- ``packed + 64``: packed, and 64-token prefill chunks while others decode (the default).

Reported: the apply request's latency, the whole batch's throughput, and whether every
engine produced the same outputs.

    python -m bench.apply_under_load [--fixes 6] [--chats 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    sample_prompts,
    set_threads,
    write_json,
)
from bench.fast_apply import TARGET, load_tasks
from specserve.deployments.rules import DrafterFlags, effective_drafter
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import PREFILL_CHUNK, PREFILL_CHUNK_BESIDE_DECODES, Engine
from specserve.model.loader import Model, load_model
from specserve.speculative.config import SpeculationConfig, speculation_for_drafter
from specserve.speculative.sampling import SamplingParams

ENGINES = {  # name -> (packed_batches, prefill chunk while others decode)
    "padded": (False, PREFILL_CHUNK),
    "packed": (True, PREFILL_CHUNK),
    "packed + 64": (True, PREFILL_CHUNK_BESIDE_DECODES),
}
HEADERS = ["fix", *(f"apply s, {name}" for name in ENGINES), "speed-up", "batch tok/s"]


def run_batch(
    model: Model,
    requests: list[tuple[list[int], list[int] | None]],
    speculation: SpeculationConfig,
    max_tokens: int,
    engine_kind: str,
) -> dict[str, Any]:
    """All requests at once on a fresh engine, stepped here; the first is the apply."""
    packed, busy_chunk = ENGINES[engine_kind]
    engine = Engine(
        model, max_batch=8, start=False, packed_batches=packed, prefill_chunk_busy=busy_chunk
    )
    done: dict[int, tuple[GenerationResult, float]] = {}
    began = time.perf_counter()

    def finisher(i: int) -> Any:
        def finished(result: GenerationResult | None, error: BaseException | None) -> None:
            if error is not None:
                raise error
            assert result is not None
            done[i] = (result, time.perf_counter() - began)

        return finished

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, (prompt, prediction) in enumerate(requests):
        engine.submit(
            prompt, params, lambda _: None, finisher(i), speculation, prediction_ids=prediction
        )
    while len(done) < len(requests):
        engine.step()
    seconds = time.perf_counter() - began
    tokens = sum(len(result.token_ids) for result, _ in done.values())
    return {
        "apply_seconds": round(done[0][1], 3),
        "batch_seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "outputs": [done[i][0].token_ids for i in range(len(requests))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixes", type=int, default=6)
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "apply_under_load.json")
    args = parser.parse_args()
    set_threads(args.threads)
    model = load_model(TARGET, progress=False)
    default = effective_drafter(TARGET, DrafterFlags())
    speculation = speculation_for_drafter(**default.fields(), target=model, load=load_model)
    chats = [
        model.tokenizer.encode_chat([{"role": "user", "content": p.text}])
        for p in sample_prompts(args.chats)
    ]
    rows, runs = [], []
    names = list(ENGINES)
    for n, task in enumerate(load_tasks(args.fixes, 0, 0)):
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": task["text"]}])
        prediction = model.tokenizer.encode(task["prediction"], add_special_tokens=False)
        requests: list[tuple[list[int], list[int] | None]] = [(prompt, prediction)]
        requests += [(chat, None) for chat in chats]
        order = names[n % len(names) :] + names[: n % len(names)]
        measured = {
            kind: run_batch(model, requests, speculation, args.max_tokens, kind) for kind in order
        }
        outputs = [measured[kind].pop("outputs") for kind in names]
        same = all(o == outputs[0] for o in outputs)
        runs.append({"task": task["id"], **measured, "same_outputs": same})
        first, last = measured[names[0]], measured[names[-1]]
        speedup = first["apply_seconds"] / last["apply_seconds"]
        rows.append([task["id"], *(measured[k]["apply_seconds"] for k in names), f"{speedup:.2f}x"])
        rows[-1].append(" / ".join(str(measured[k]["tokens_per_second"]) for k in names))
        print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], f"same={same}", flush=True)
    summary = _summary(runs)
    table = markdown_table(HEADERS, rows)
    print(table)
    print(summary)
    write_json(
        args.out,
        {
            "benchmark": "apply_under_load",
            "model": TARGET,
            "drafter": default.describe(),
            "settings": vars(args) | {"out": str(args.out)},
            "machine": machine_info(args.threads),
            "runs": runs,
            "summary": summary,
            "table": table,
        },
    )


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def total(kind: str, key: str) -> float:
        return sum(run[kind][key] for run in runs)

    summary: dict[str, Any] = {
        f"apply_seconds ({kind})": round(total(kind, "apply_seconds"), 2) for kind in ENGINES
    }
    summary |= {
        f"batch_tokens_per_second ({kind})": round(
            total(kind, "tokens") / total(kind, "batch_seconds"), 1
        )
        for kind in ENGINES
    }
    first, *_, last = ENGINES
    ratios = [run[first]["apply_seconds"] / run[last]["apply_seconds"] for run in runs]
    summary["apply_speedup_median (padded -> packed + 64)"] = round(statistics.median(ratios), 3)
    summary["same_outputs"] = f"{sum(run['same_outputs'] for run in runs)}/{len(runs)}"
    return summary


if __name__ == "__main__":
    main()
