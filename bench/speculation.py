"""Speculative decoding vs plain decoding on SmolLM2-135M, greedy, in one process.

Each prompt runs plain decoding and every method back to back (interleaved, so machine noise
hits all alike). Reported per Spec-Bench group and for HumanEvalFix (buggy code as the
Predicted Output): decode-phase tokens/s ratio to plain (sum of tokens / sum of seconds),
end-to-end ratio, mean tokens per target step, and whether every output equalled plain.

    python bench/speculation.py [--per-category 2] [--humanevalfix 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS_DIR,
    SPEC_BENCH_GROUPS,
    fmt_number,
    machine_info,
    markdown_table,
    sample_prompts,
    set_threads,
    shared_dir,
    write_json,
)
from specserve.drafters.artifact import is_drafter_dir, load_drafter
from specserve.engine.generate import GenerationResult, generate
from specserve.engine.sampling import SamplingParams
from specserve.engine.speculation import PLAIN, SpeculationConfig
from specserve.model.loader import load_model
from specserve.spec.tuning import StepCosts

SHIPPED_EAGLE = (
    Path(__file__).resolve().parents[1]
    / "specserve"
    / "drafters"
    / "shipped"
    / "smollm2-135m-instruct-eagle"
)
METHODS = {
    "ngram (n=3, k<=4, tuned)": SpeculationConfig("ngram", 4, ngram_length=3),
    "ngram (n=3, k=4, fixed)": SpeculationConfig("ngram", 4, ngram_length=3, adaptive=False),
}


def _humanevalfix(count: int) -> list[dict[str, str]]:
    path = shared_dir() / "data" / "humanevalfix" / "humanevalpack_python.jsonl"
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    step = max(1, len(rows) // count)
    return rows[::step][:count]


class HFPeer:
    """Hugging Face transformers (float32, same GGUF): plain greedy vs its prompt lookup."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from specserve.model.catalog import resolve

        path, _ = resolve("smollm2-135m-instruct")
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )

    def _generate(self, ids: list[int], max_new: int, lookup: bool) -> tuple[list[int], float]:
        extra = {"prompt_lookup_num_tokens": 10} if lookup else {}
        inputs = self.torch.tensor([ids])
        began = time.perf_counter()
        out = self.model.generate(
            inputs,
            attention_mask=self.torch.ones_like(inputs),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=2,
            **extra,
        )
        return out[0, len(ids) :].tolist(), time.perf_counter() - began

    def run(self, ids: list[int], max_new: int, lookup: bool) -> dict[str, Any]:
        """Decode-phase time = full generate minus a 1-token generate (the prefill)."""
        _, prefill = self._generate(ids, 1, lookup=False)
        tokens, total = self._generate(ids, max_new, lookup)
        return {
            "tokens": tokens,
            "decode_seconds": max(total - prefill, 1e-9),
            "total_seconds": total,
        }


def _row(
    category: str,
    i: int,
    method: str,
    tokens: list[int],
    decode_s: float,
    total_s: float,
    same: bool,
    stats: dict[str, Any] | None,
    prediction: Any = None,
) -> dict[str, Any]:
    steps = stats["target_steps"] if stats else 0  # unknown for peers
    generated = stats["generated"] if stats else 0
    return {
        "category": category,
        "prompt": i,
        "method": method,
        "new_tokens": len(tokens),
        "decode_tokens": len(tokens) - 1,
        "decode_seconds": decode_s,
        "total_seconds": total_s,
        "target_steps": steps,
        "generated": generated,
        "identical_to_plain": same,
        "speculation": stats,
        "prediction": prediction,
    }


def _result_row(
    category: str, i: int, method: str, result: GenerationResult, same: bool
) -> dict[str, Any]:
    prediction = None if result.prediction is None else vars(result.prediction)
    return _row(
        category,
        i,
        method,
        result.token_ids,
        result.decode_seconds,
        result.decode_seconds + result.time_to_first_token,
        same,
        result.stats.as_dict(),
        prediction,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    model = load_model("smollm2-135m-instruct", progress=False)
    tok = model.tokenizer
    params = SamplingParams(max_tokens=args.max_tokens)
    costs = StepCosts()
    cases: list[tuple[str, list[int], list[int] | None]] = []
    for prompt in sample_prompts(args.per_category * len(SPEC_BENCH_GROUPS)):
        ids = tok.encode_chat([{"role": "user", "content": prompt.text}])
        cases.append((prompt.category, ids, None))
    for row in _humanevalfix(args.humanevalfix):
        code = row["declaration"] + row["buggy_solution"]
        ids = tok.encode_chat(
            [{"role": "user", "content": f"Fix the bug in this Python function:\n\n{code}"}]
        )
        cases.append(("humanevalfix", ids, tok.encode(code, add_special_tokens=False)))
    generate(model, cases[0][1], SamplingParams(max_tokens=8))  # warm-up
    eagle = {}
    if args.eagle and is_drafter_dir(args.eagle):
        head = load_drafter(args.eagle, model)  # a trained EAGLE head for this target
        eagle = {
            "eagle (k<=4, tuned)": SpeculationConfig("eagle", 4, eagle=head),
            "eagle + ngram (k<=4, tuned)": SpeculationConfig(
                "eagle", 4, eagle=head, with_ngram=True
            ),
        }
    peer = HFPeer() if "hf" in args.peers else None
    # Draft-model rows: the bf16 target drafted by its int4 copy (a low-bit self-drafter).
    bf16 = (
        load_model("smollm2-135m-instruct", dtype="bfloat16", progress=False)
        if args.draft_rows
        else None
    )
    rows = []
    for i, (category, ids, prediction) in enumerate(cases):
        plain = generate(model, ids, params, spec=PLAIN)
        runs = {"plain": (plain, True)}
        methods = {**METHODS, **eagle}
        if prediction is not None:
            methods = {
                "prediction + ngram": SpeculationConfig("ngram", 4, ngram_length=3),
                **methods,
            }
        for name, spec in methods.items():
            pred = prediction if name.startswith("prediction") else None
            result = generate(model, ids, params, spec=spec, prediction_ids=pred, costs=costs)
            runs[name] = (result, result.token_ids == plain.token_ids)
        for name, (result, same) in runs.items():
            rows.append(_result_row(category, i, name, result, same))
        if bf16 is not None:
            base = generate(bf16, ids, params)
            spec = SpeculationConfig("draft_model", 4, draft_model=model)
            drafted = generate(bf16, ids, params, spec=spec)
            for name, result in (
                ("plain (bf16 target)", base),
                ("draft: int4 copy -> bf16 target", drafted),
            ):
                rows.append(
                    _result_row(category, i, name, result, result.token_ids == base.token_ids)
                )
        if peer is not None:
            hf_plain = peer.run(ids, args.max_tokens, lookup=False)
            hf_pld = peer.run(ids, args.max_tokens, lookup=True)
            for name, hf in (("HF plain (fp32)", hf_plain), ("HF prompt lookup (fp32)", hf_pld)):
                rows.append(
                    _row(
                        category,
                        i,
                        name,
                        hf["tokens"],
                        hf["decode_seconds"],
                        hf["total_seconds"],
                        hf["tokens"] == hf_plain["tokens"],
                        None,
                    )
                )
        print(
            f"[{i + 1}/{len(cases)}] {category}: plain {plain.decode_tokens_per_second:.1f} tok/s",
            file=sys.stderr,
        )
    return {
        "machine": machine_info(args.threads),
        "settings": vars(args),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        for key in ("decode_tokens", "decode_seconds", "new_tokens", "total_seconds"):
            sums[row["category"], row["method"]][key] += row[key]
        s = sums[row["category"], row["method"]]
        s["steps"] += row["target_steps"]
        s["generated"] += row["generated"]
        s["identical"] += row["identical_to_plain"]
        s["count"] += 1
    table = []
    baselines = {"HF": "HF plain (fp32)", "draft": "plain (bf16 target)"}
    for (category, method), s in sums.items():
        baseline = next(
            (b for prefix, b in baselines.items() if method.startswith(prefix)), "plain"
        )
        plain = sums[category, baseline]
        table.append(
            {
                "category": category,
                "method": method,
                "decode_tok_s": s["decode_tokens"] / s["decode_seconds"],
                "decode_speedup": (s["decode_tokens"] / s["decode_seconds"])
                / (plain["decode_tokens"] / plain["decode_seconds"]),
                "end_to_end_speedup": (s["new_tokens"] / s["total_seconds"])
                / (plain["new_tokens"] / plain["total_seconds"]),
                "baseline": baseline,
                "tokens_per_step": s["generated"] / s["steps"] if s["steps"] else None,
                "all_identical": s["identical"] == s["count"],
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--humanevalfix", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="hf", help="'hf' or 'none'")
    parser.add_argument(
        "--draft-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the bf16 target drafted by its int4 copy",
    )
    parser.add_argument(
        "--eagle",
        type=Path,
        default=SHIPPED_EAGLE,
        help="a trained EAGLE drafter directory to add rows for (default: the shipped one)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "speculation.json")
    args = parser.parse_args()
    payload = run(args)
    payload["summary"] = summarize(payload["rows"])
    write_json(args.out, payload)
    print(
        markdown_table(
            [
                "category",
                "method",
                "decode tok/s",
                "decode speed-up",
                "end-to-end",
                "tokens/step",
                "identical",
            ],
            [
                [
                    r["category"],
                    r["method"],
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['decode_speedup']:.2f}x",
                    f"{r['end_to_end_speedup']:.2f}x",
                    fmt_number(r["tokens_per_step"], 2),
                    "yes" if r["all_identical"] else "NO",
                ]
                for r in payload["summary"]
            ],
        )
    )


if __name__ == "__main__":
    main()
