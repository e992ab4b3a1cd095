"""The prefix cache on a chat's second turn: time to first token and end to end, with and
without it, on MT-bench's two-turn questions (the server's engine, greedy).

Each question's first turn runs once; its answer goes into the second turn's messages, as a
chat client sends them. The second turn then runs twice, in alternating order per question:
on an engine whose prefix cache kept the first turn (prompt and answer), and on one without a
cache, which prefills the whole conversation. Both outputs must be the same.

    python -m bench.prefix_cache [--model qwen2.5-coder-1.5b-instruct] [--questions 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine_info, set_threads, shared_dir, write_json
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model, load_model
from specserve.model.prefix_cache import MIB, PrefixCache
from specserve.speculative.sampling import SamplingParams

MODEL = "qwen2.5-coder-1.5b-instruct"


def two_turn_questions(count: int) -> list[list[str]]:
    """The first ``count`` MT-bench questions (two user turns each) of Spec-Bench's file."""
    path = shared_dir() / "data" / "spec_bench" / "question.jsonl"
    rows = [json.loads(line) for line in path.open()]
    return [r["turns"] for r in rows if len(r.get("turns", [])) == 2][:count]


def run(engine: Engine, prompt: list[int], max_tokens: int) -> GenerationResult:
    """One request through the engine (its own thread), waited for."""
    done = threading.Event()
    out: dict[str, Any] = {}

    def finished(result: GenerationResult | None, error: BaseException | None) -> None:
        out["result"], out["error"] = result, error
        done.set()

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine.submit(prompt, params, lambda _: None, finished)
    done.wait()
    if out["error"] is not None:
        raise out["error"]
    return out["result"]


def second_turn(model: Model, turns: list[str], answer: str) -> list[int]:
    messages = [
        {"role": "user", "content": turns[0]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": turns[1]},
    ]
    return model.tokenizer.encode_chat(messages)


def measure(model: Model, questions: list[list[str]], max_tokens: int) -> list[dict[str, Any]]:
    cached = Engine(model, max_batch=1, prefix_cache=PrefixCache(256 * MIB))
    plain = Engine(model, max_batch=1)
    engines = {"cached": cached, "plain": plain}
    rows = []
    try:
        run(plain, model.tokenizer.encode_chat([{"role": "user", "content": "hi"}]), 4)
        for i, turns in enumerate(questions):
            first = model.tokenizer.encode_chat([{"role": "user", "content": turns[0]}])
            answer = run(cached, first, max_tokens)
            prompt = second_turn(model, turns, answer.text)
            order = ["cached", "plain"] if i % 2 == 0 else ["plain", "cached"]
            results = {name: run(engines[name], prompt, max_tokens) for name in order}
            rows.append(row(prompt, results))
            print(f"[{i + 1}/{len(questions)}] {rows[-1]}", flush=True)
    finally:
        cached.stop()
        plain.stop()
    return rows


def row(prompt: list[int], results: dict[str, GenerationResult]) -> dict[str, Any]:
    hit, whole = results["cached"], results["plain"]
    return {
        "prompt_tokens": len(prompt),
        "cached_tokens": hit.cached_prompt_tokens,
        "ttft_cached_s": round(hit.time_to_first_token, 4),
        "ttft_plain_s": round(whole.time_to_first_token, 4),
        "total_cached_s": round(hit.time_to_first_token + hit.decode_seconds, 4),
        "total_plain_s": round(whole.time_to_first_token + whole.decode_seconds, 4),
        "tokens": len(hit.token_ids),
        "identical": hit.token_ids == whole.token_ids,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> float:
        return round(sum(r[a] for r in rows) / sum(r[b] for r in rows), 3)

    return {
        "questions": len(rows),
        "cached_share_median": round(
            statistics.median(r["cached_tokens"] / r["prompt_tokens"] for r in rows), 3
        ),
        "ttft_plain_over_cached": ratio("ttft_plain_s", "ttft_cached_s"),
        "total_plain_over_cached": ratio("total_plain_s", "total_cached_s"),
        "identical": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prefix_cache.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model = load_model(args.model, progress=False)
    rows = measure(model, two_turn_questions(args.questions), args.max_tokens)
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    settings = vars(args) | {"out": str(args.out)}
    payload = {"machine": machine_info(args.threads), "settings": settings}
    write_json(args.out, payload | {"summary": summary, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
