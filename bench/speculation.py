"""Speculative decoding vs plain decoding, greedy, in one process.

Each prompt runs plain decoding and every method back to back (interleaved, so machine noise
hits all alike). Reported per Spec-Bench group and for HumanEvalFix (buggy code as the
Predicted Output): decode-phase tokens/s ratio to plain (sum of tokens / sum of seconds),
end-to-end ratio, mean tokens per target step, and whether every output equalled plain.

The methods depend on the target. SmolLM2-135M (the default): n-gram tuned and fixed, the
shipped EAGLE head, the bf16 target drafted by its quantized copy, transformers as a peer.
Qwen2.5-Coder-1.5B: n-gram, the 0.5B as draft model, both together (n-gram first, the 0.5B
where n-gram has nothing); no transformers peer (an fp32 1.5B is too slow on a laptop CPU).
Each target writes its own results file.

    python -m bench.speculation [--per-category 2] [--humanevalfix 4] [--max-tokens 128]
    python -m bench.speculation --model qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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
from specserve.engine.generate import GenerationResult, generate
from specserve.model.loader import Model, load_model
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.head_artifact import is_drafter_dir, load_drafter
from specserve.speculative.sampling import SamplingParams

SMOLLM2 = "smollm2-135m-instruct"
QWEN_CODER = "qwen2.5-coder-1.5b-instruct"
QWEN_DRAFT = "qwen2.5-coder-0.5b-instruct"  # same 151,936-token vocabulary as the 1.5B
SHIPPED_EAGLE = (
    Path(__file__).resolve().parents[1]
    / "specserve"
    / "drafters"
    / "shipped"
    / "smollm2-135m-instruct-eagle"
)
NGRAM_TUNED = "ngram (n=3, k<=4, tuned)"  # the catalog default drafter of both targets
METHODS = {
    NGRAM_TUNED: SpeculationConfig("ngram", 4, ngram_length=3),
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

        path, _ = resolve(SMOLLM2)  # pad_token_id below is SmolLM2's too
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
    first_tokens: int = 1,  # out with the first token (more: drafts the prefill verified)
) -> dict[str, Any]:
    steps = stats["target_steps"] if stats else 0  # unknown for peers
    generated = stats["generated"] if stats else 0
    return {
        "category": category,
        "prompt": i,
        "method": method,
        "new_tokens": len(tokens),
        "decode_tokens": len(tokens) - first_tokens,
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
        result.first_tokens,
    )


def _eagle_methods(path: Path | None, model: Model) -> dict[str, SpeculationConfig]:
    """Rows for a trained EAGLE head for this target, if ``path`` is one."""
    if path is None or not is_drafter_dir(path):
        return {}
    head = load_drafter(path, model)
    return {
        "eagle (k<=4, tuned)": SpeculationConfig("eagle", 4, eagle=head),
        "eagle + ngram (k<=4, tuned)": SpeculationConfig("eagle", 4, eagle=head, with_ngram=True),
    }


def _qwen_methods() -> dict[str, SpeculationConfig]:
    """The coder target's default-drafter candidates (issue 11): n-gram, the 0.5B, or both.

    Names must not start with "draft" or "HF": summarize() maps those prefixes to other
    baselines than plain.
    """
    draft = load_model(QWEN_DRAFT, progress=False)
    return {
        NGRAM_TUNED: METHODS[NGRAM_TUNED],
        "0.5B draft model (k<=4, tuned)": SpeculationConfig("draft_model", 4, draft_model=draft),
        # with_ngram: n-gram proposes first (free to draft); the 0.5B where it has nothing.
        "ngram + 0.5B draft model (k<=4, tuned)": SpeculationConfig(
            "draft_model", 4, draft_model=draft, with_ngram=True
        ),
    }


def _methods(args: argparse.Namespace, model: Model) -> dict[str, SpeculationConfig]:
    if args.model == QWEN_CODER:
        return _qwen_methods()
    return {**METHODS, **_eagle_methods(args.eagle, model)}


Case = tuple[str, list[int], list[int] | None]  # (category, prompt ids, prediction ids)


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    model = load_model(args.model, progress=False)
    params = SamplingParams(max_tokens=args.max_tokens)
    costs = StepCosts()
    cases = _cases(args, model)
    all_methods = _methods(args, model)
    for speculation in (PLAIN, *all_methods.values()):  # warm-up, the draft model's too
        generate(model, cases[0][1], SamplingParams(max_tokens=8), speculation=speculation)
    peer = HFPeer() if "hf" in args.peers else None
    # Draft-model rows: the bf16 target drafted by its quantized copy (a low-bit self-drafter).
    bf16 = load_model(args.model, dtype="bfloat16", progress=False) if args.draft_rows else None
    rows = []
    for i, (category, ids, prediction) in enumerate(cases):
        # Interleaved: plain and every method on this prompt before the next prompt.
        plain, target_rows = _target_rows(
            model, category, i, ids, prediction, params, all_methods, costs
        )
        rows += target_rows
        if bf16 is not None:
            rows += _self_draft_rows(bf16, model, category, i, ids, params)
        if peer is not None:
            rows += _peer_rows(peer, category, i, ids, args.max_tokens)
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


def _cases(args: argparse.Namespace, model: Model) -> list[Case]:
    """Spec-Bench prompts (no prediction), then HumanEvalFix (the buggy code predicted)."""
    tok = model.tokenizer
    cases: list[Case] = []
    for prompt in sample_prompts(args.per_category * len(SPEC_BENCH_GROUPS)):
        ids = tok.encode_chat([{"role": "user", "content": prompt.text}])
        cases.append((prompt.category, ids, None))
    for row in _humanevalfix(args.humanevalfix):
        code = row["declaration"] + row["buggy_solution"]
        ids = tok.encode_chat(
            [{"role": "user", "content": f"Fix the bug in this Python function:\n\n{code}"}]
        )
        cases.append(("humanevalfix", ids, tok.encode(code, add_special_tokens=False)))
    return cases


def _target_rows(
    model: Model,
    category: str,
    i: int,
    ids: list[int],
    prediction: list[int] | None,
    params: SamplingParams,
    all_methods: dict[str, SpeculationConfig],
    costs: StepCosts,
) -> tuple[GenerationResult, list[dict[str, Any]]]:
    """Plain decoding and every method on one prompt (with a prediction: also the
    prediction, first); plain's result and the rows."""
    plain = generate(model, ids, params, speculation=PLAIN)
    runs = {"plain": (plain, True)}
    methods = dict(all_methods)
    if prediction is not None:
        methods = {
            "prediction + ngram": SpeculationConfig("ngram", 4, ngram_length=3),
            **methods,
        }
    for name, speculation in methods.items():
        pred = prediction if name.startswith("prediction") else None
        result = generate(
            model, ids, params, speculation=speculation, prediction_ids=pred, costs=costs
        )
        runs[name] = (result, result.token_ids == plain.token_ids)
    return plain, [_result_row(category, i, name, r, same) for name, (r, same) in runs.items()]


def _self_draft_rows(
    bf16: Model, model: Model, category: str, i: int, ids: list[int], params: SamplingParams
) -> list[dict[str, Any]]:
    """The bf16 target plain, and drafted by ``model`` (its quantized copy)."""
    base = generate(bf16, ids, params)
    speculation = SpeculationConfig("draft_model", 4, draft_model=model)
    drafted = generate(bf16, ids, params, speculation=speculation)
    return [
        _result_row(category, i, name, result, result.token_ids == base.token_ids)
        for name, result in (
            ("plain (bf16 target)", base),
            ("draft: int4 copy -> bf16 target", drafted),
        )
    ]


def _peer_rows(
    peer: HFPeer, category: str, i: int, ids: list[int], max_tokens: int
) -> list[dict[str, Any]]:
    """transformers' plain greedy decoding and its prompt lookup on one prompt."""
    hf_plain = peer.run(ids, max_tokens, lookup=False)
    hf_pld = peer.run(ids, max_tokens, lookup=True)
    return [
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
        for name, hf in (("HF plain (fp32)", hf_plain), ("HF prompt lookup (fp32)", hf_pld))
    ]


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
    # Method-name prefix -> its baseline row; any other method is compared with "plain".
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


def _per_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the target: SmolLM2 keeps the historical settings."""
    small = args.model == SMOLLM2
    if args.peers is None:
        args.peers = "hf" if small else "none"
    elif "hf" in args.peers and not small:
        print(
            f"--peers hf: skipped for {args.model} (fp32 transformers is too slow)", file=sys.stderr
        )
        args.peers = "none"
    if args.draft_rows is None:
        args.draft_rows = small  # a bf16 1.5B target is too slow and heavy to be worth a row
    if args.eagle is None and small:
        args.eagle = SHIPPED_EAGLE  # the only shipped head is SmolLM2's
    if args.out is None:
        name = "speculation.json" if small else f"speculation-{args.model}.json"
        args.out = RESULTS_DIR / name
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=[SMOLLM2, QWEN_CODER], default=SMOLLM2)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--humanevalfix", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peers", help="'hf' or 'none' (default: 'hf' for SmolLM2, 'none' for Qwen)"
    )
    parser.add_argument(
        "--draft-rows",
        action=argparse.BooleanOptionalAction,
        help="measure the bf16 target drafted by its quantized copy (default: SmolLM2 only)",
    )
    parser.add_argument(
        "--eagle",
        type=Path,
        help="a trained EAGLE drafter directory for this target (default: SmolLM2's shipped one)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results file (default: bench/results/speculation.json for SmolLM2, "
        "speculation-<model>.json otherwise)",
    )
    args = _per_model_defaults(parser.parse_args())
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
