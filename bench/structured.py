"""Structured output on the coder model: plain constrained decoding against speculation with
forced-token drafts, and llama.cpp's JSON-schema decoding on the same GGUF, in one run.

Tasks (bench/data/structured_tasks.json, written for this benchmark): ten extractions of a
JSON object from a paragraph (contacts, orders, bug reports, a function signature, events,
recipes, a job posting, git commits, a service configuration, a review), each with a strict
schema. Greedy; the prompt asks for the JSON and shows the schema.

specserve configurations (every one under the same grammar, so every output is schema-valid
and all equal plain decoding):
- plain: constrained decoding, one target forward per token;
- forced drafts: the tokens the grammar forces (keys, punctuation, enum tails) are drafted
  for free and verified in the next forward;
- default mix: forced drafts plus the deployment's default drafter (catalog);
- forced + n-gram k<=16: forced drafts plus prompt lookup (values copied from the text).
llama.cpp: llama-server's /completion with ``json_schema`` (its grammar sampler), plain.

Reported per configuration: summed tokens / summed seconds end to end (prefill included)
and in the decode phase, the ratio to plain, tokens per target forward, the share of tokens
that were free (forced), schema validity and equality with plain.

    LLAMA_CPP_BIN=.../build/bin python -m bench.structured [--tasks 10] [--max-tokens 320]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import jsonschema

from bench.common import RESULTS_DIR, machine_info, markdown_table, set_threads, write_json
from bench.llama_server import llama_complete, llama_server
from specserve.deployments.rules import DrafterFlags, effective_drafter
from specserve.engine.generate import generate
from specserve.model.catalog import resolve
from specserve.model.loader import Model, load_model
from specserve.speculative.config import PLAIN, SpeculationConfig, speculation_for_drafter
from specserve.speculative.grammar import TokenGrammar
from specserve.speculative.sampling import SamplingParams

TARGET = "qwen2.5-coder-1.5b-instruct"
TASKS = Path(__file__).resolve().parent / "data" / "structured_tasks.json"
SYSTEM = (
    "Extract the information in the user's text as one JSON object that follows this JSON "
    "schema. Answer with the JSON object only.\n\nSchema:\n{schema}"
)


def load_tasks(limit: int) -> list[dict[str, Any]]:
    tasks = json.loads(TASKS.read_text(encoding="utf-8"))[:limit]
    for task in tasks:
        task["messages"] = [
            {"role": "system", "content": SYSTEM.format(schema=json.dumps(task["schema"]))},
            {"role": "user", "content": task["text"]},
        ]
    return tasks


def configs(target: Model) -> dict[str, SpeculationConfig]:
    default = effective_drafter(TARGET, DrafterFlags())
    load = lambda name: load_model(name, progress=False)  # noqa: E731
    mix = speculation_for_drafter(**default.fields(), target=target, load=load)
    return {
        "plain": PLAIN,
        "forced drafts": SpeculationConfig(),
        f"default mix ({default.short()})": mix,
        "forced + n-gram k<=16": SpeculationConfig("ngram", 16, ngram_length=3),
    }


def valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run_specserve(
    target: Model, tasks: list[dict[str, Any]], max_tokens: int
) -> list[dict[str, Any]]:
    """Every configuration on every task, in an order rotating from task to task."""
    rows, specs = [], configs(target)
    names = list(specs)
    tok, vocab = target.tokenizer, target.lm.config.vocab_size
    generate(target, tok.encode("warm up"), SamplingParams(max_tokens=8))
    for index, task in enumerate(tasks):
        grammar = TokenGrammar.json_schema(task["schema"], tok, vocab_size=vocab)
        params = SamplingParams(max_tokens=max_tokens, grammar=grammar)
        prompt = tok.encode_chat(task["messages"])
        outputs: dict[str, list[int]] = {}
        for name in names[index % len(names) :] + names[: index % len(names)]:
            began = time.perf_counter()
            result = generate(target, prompt, params, speculation=specs[name])
            seconds = time.perf_counter() - began
            outputs[name] = result.token_ids
            rows.append(
                {
                    "engine": "specserve",
                    "config": name,
                    "task": task["id"],
                    "tokens": len(result.token_ids),
                    "seconds": seconds,
                    "decode_seconds": result.decode_seconds,
                    "target_steps": result.stats.target_steps,
                    "forced_tokens": result.stats.forced_tokens,
                    "valid": valid(result.text, task["schema"]),
                    "finish_reason": result.finish_reason,
                }
            )
        for row in rows[-len(names) :]:
            row["identical"] = outputs[row["config"]] == outputs["plain"]
        print(f"{task['id']}: {len(outputs['plain'])} tokens", flush=True)
    return rows


def run_llama(
    binary: Path, target: Model, tasks: list[dict[str, Any]], max_tokens: int, threads: int
) -> list[dict[str, Any]]:
    rows = []
    server = llama_server(binary, resolve(TARGET)[0], [], threads)
    try:
        llama_complete(target.tokenizer.encode("warm up"), 8)
        for task in tasks:
            prompt = target.tokenizer.encode_chat(task["messages"])
            answer = llama_complete(prompt, max_tokens, json_schema=task["schema"])
            t = answer["timings"]
            rows.append(
                {
                    "engine": "llama.cpp",
                    "config": "llama.cpp json_schema",
                    "task": task["id"],
                    "tokens": t["predicted_n"],
                    "seconds": (t["prompt_ms"] + t["predicted_ms"]) / 1000,
                    "decode_seconds": t["predicted_ms"] / 1000,
                    "target_steps": t["predicted_n"],
                    "forced_tokens": 0,
                    "valid": valid(answer["content"], task["schema"]),
                    "identical": None,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: summed tokens over summed seconds, and ratios to specserve plain."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)

    def rate(group: list[dict[str, Any]], key: str) -> float:
        return sum(r["tokens"] for r in group) / sum(r[key] for r in group)

    plain = by_config["plain"]
    summary = []
    for name, group in by_config.items():
        tokens = sum(r["tokens"] for r in group)
        summary.append(
            {
                "config": name,
                "tasks": len(group),
                "tokens": tokens,
                "tok_s": rate(group, "seconds"),
                "decode_tok_s": rate(group, "decode_seconds"),
                "vs_plain": rate(group, "seconds") / rate(plain, "seconds"),
                "decode_vs_plain": rate(group, "decode_seconds") / rate(plain, "decode_seconds"),
                "tokens_per_forward": tokens / sum(r["target_steps"] for r in group),
                "free_share": sum(r["forced_tokens"] for r in group) / tokens,
                "valid": sum(r["valid"] for r in group),
                "identical": sum(bool(r["identical"]) for r in group),
            }
        )
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    headers = [
        "config",
        "tok/s e2e",
        "decode tok/s",
        "vs plain",
        "decode vs plain",
        "tokens/forward",
        "free tokens",
        "schema-valid",
        "= plain",
    ]
    rows = [
        [s["config"], f"{s['tok_s']:.1f}", f"{s['decode_tok_s']:.1f}", f"{s['vs_plain']:.2f}x",
         f"{s['decode_vs_plain']:.2f}x", f"{s['tokens_per_forward']:.2f}",
         f"{100 * s['free_share']:.0f}%", f"{s['valid']}/{s['tasks']}",
         f"{s['identical']}/{s['tasks']}" if s["config"] != "llama.cpp json_schema" else "-"]
        for s in summary
    ]  # fmt: skip
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "structured.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    target = load_model(TARGET, progress=False)
    tasks = load_tasks(args.tasks)
    rows = run_specserve(target, tasks, args.max_tokens)
    binary = os.environ.get("LLAMA_CPP_BIN")
    if binary:
        rows += run_llama(Path(binary), target, tasks, args.max_tokens, args.threads)
    summary = summarize(rows)
    print(table(summary))
    write_json(
        args.out,
        {"machine": machine_info(args.threads), "model": TARGET, "max_tokens": args.max_tokens,
         "summary": summary, "rows": rows},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
