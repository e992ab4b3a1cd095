"""The report of ``bench/runtime.py``: its figures against llama.cpp's, the issue's goals
met or not, and the markdown table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.common import fmt_number, markdown_table
from bench.machine_state import describe

if TYPE_CHECKING:
    from bench.runtime import Settings

QWEN_PAIR = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # target, drafter
# The goals (specserve): k-token forward / one-token forward, and a drafter step
# (0.5B) / a target step (1.5B), about their ratio of weight bytes (0.44).
K_FORWARD_LIMITS = {8: 1.3, 16: 2.0}
DRAFT_STEP_LIMIT = 0.45


def vs_llama(results: dict[str, dict[str, Any]]) -> None:
    """specserve / llama.cpp for decode and prefill, on specserve's entry of each model."""
    for engines in results.values():
        ours, peer = engines.get("specserve", {}), engines.get("llama.cpp", {})
        if "decode" in ours and "decode" in peer:
            ours["vs_llama_cpp"] = {
                part: round(ours[part]["tokens_per_second"] / peer[part]["tokens_per_second"], 3)
                for part in ("decode", "prefill")
            }


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals for specserve, each with its measured figure and whether it is met."""
    found = []
    for model, engines in results.items():
        ours = engines.get("specserve", {})
        for part, ratio in ours.get("vs_llama_cpp", {}).items():
            found.append((model, f"{part} >= llama.cpp", ratio, ratio >= 1.0))
        to_k1 = ours.get("forward", {}).get("ratio_to_k1", {})
        found += [
            (model, f"k={k} forward <= {limit}x k=1", to_k1[str(k)], to_k1[str(k)] <= limit)
            for k, limit in K_FORWARD_LIMITS.items()
            if str(k) in to_k1
        ]
    big, small = (results.get(m, {}).get("specserve", {}).get("decode") for m in QWEN_PAIR)
    if big and small:  # a step's time is 1 / tok/s
        step = round(big["tokens_per_second"] / small["tokens_per_second"], 3)
        found.append(
            ("qwen 0.5B vs 1.5B", f"step <= {DRAFT_STEP_LIMIT}x", step, step <= DRAFT_STEP_LIMIT)
        )
    return [dict(zip(("model", "goal", "measured", "met"), g, strict=True)) for g in found]


def table(results: dict[str, dict[str, Any]], s: Settings) -> str:
    headers = ["model", "engine", "decode tok/s", "prefill tok/s"]
    headers += [f"k={k} ms (x k=1)" for k in s.ks]
    headers += ["peak RSS MB", "decode vs llama.cpp", "prefill vs llama.cpp"]
    rows = []
    for model, engines in results.items():
        for engine, r in engines.items():
            if "error" in r:
                rows.append([model, engine, "failed: see the JSON file"])
                continue
            rows.append([model, engine, *cells(r, s.ks)])
    return markdown_table(headers, rows)


def cells(r: dict[str, Any], ks: Sequence[int]) -> list[str]:
    """One engine's figures: tok/s, ms at each k (and its ratio to k=1), RSS, vs llama.cpp."""
    fwd, vs = r["forward"], r.get("vs_llama_cpp", {})
    k_ms = [f"{fwd['ms'][str(k)]['median_ms']:.1f} ({fwd['ratio_to_k1'][str(k)]:.2f}x)" for k in ks]
    speeds = [fmt_number(r[part]["tokens_per_second"]) for part in ("decode", "prefill")]
    ratios = [f"{vs[part]:.2f}x" if part in vs else "-" for part in ("decode", "prefill")]
    return [*speeds, *k_ms, fmt_number(r["peak_rss_mb"], 0), *ratios]


def notes(s: Settings, skip: str | None) -> list[str]:
    lines = [
        f"{s.threads} threads; medians of {s.repeats} timed runs after {s.warmup} warm-up ones"
        + (
            f"; {s.rounds} rounds of workers: each figure the median of its rounds, each goal"
            " judged on its median round"
            if s.rounds > 1
            else ""
        )
        + ".",
        f"decode: {s.decode_tokens} greedy one-token steps (specserve: after a short chat "
        f"prompt; llama.cpp: tg{s.decode_tokens}, from position 0).",
        f"prefill: one forward over {s.prompt_tokens} tokens at position 0 (pp{s.prompt_tokens}).",
        f"k-forwards: specserve after a {s.prompt_tokens}-token context, logits of all k "
        f"positions; llama.cpp llama-bench -p k at position {s.llama_depth} (depth), "
        "logits of the last position only.",
    ]
    return lines + ([skip] if skip else [])


def report(payload: dict[str, Any], s: Settings) -> str:
    """The markdown printed at the end: the table, how it was measured, goals, profile."""
    lines = [table(payload["results"], s), ""] + [f"- {n}" for n in payload["notes"]]
    lines += [f"- machine state {describe(state)}" for state in payload.get("machine_state", [])]
    met = {True: "met", False: "NOT met"}
    for g in payload["goals"]:
        values = ["-" if v is None else f"{v:.2f}" for v in g.get("rounds", [])]
        each = f"; rounds: {', '.join(values)}" if values else ""
        line = f"- goal, {g['model']}: {g['goal']}: {g['measured']:.2f} ({met[g['met']]}{each})"
        lines.append(line)
    return "\n".join(lines) + profile_text(payload["results"])


def profile_text(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for model, engines in results.items():
        prof = engines.get("specserve", {}).get("profile")
        if prof:
            rows = prof["top_ops [op, self CPU ms, calls]"]
            title = (
                f"specserve {model} decode step at position {prof['position']}: "
                f"{prof['step_ms']} ms under the profiler, {prof['outside_ops_ms']} ms outside "
                "any torch op (native kernels, Python, dispatch)"
            )
            parts.append(title + "\n\n" + markdown_table(["op", "self CPU ms", "calls"], rows))
    return "".join("\n\n" + part for part in parts)
