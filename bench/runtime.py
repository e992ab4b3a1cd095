"""Runtime speed of plain decoding and of multi-token forwards, specserve vs its peers.

Speculative decoding pays off when a forward over k new tokens costs little more than a
forward over one. This script measures both sides of that bargain on SmolLM2-135M-Instruct
(GGUF Q4_1), with ``--threads`` torch/llama.cpp threads (2 by default):

1. plain greedy decode tokens/s on a fixed sample of Spec-Bench prompts (first turns, chat
   template applied; every engine gets the same prompt token ids and decodes exactly
   ``max_tokens`` tokens, EOS ignored, so all engines do the same work at the same positions);
2. the time of one forward over k = 1, 2, 4, 8, 16 new tokens after a ~500-token context, and
   its ratio to k = 1 (what a k-token speculative verify costs relative to one plain step);
3. a torch.profiler summary of one specserve decode step (top ops by self CPU time).

Engines: specserve in each execution format (int4 — the default —, bfloat16, float32), Hugging
Face transformers (float32, from the same GGUF), and llama.cpp through llama-cpp-python when
installed (``pip install '.[bench]'``). All engines are loaded first and then measured taking
turns (prompt by prompt, call by call), so a background load hits them alike.

Usage::

    python bench/runtime.py             # full run, ~6-7 min on 2 cores -> results/runtime.json
    python bench/runtime.py --quick     # smoke run -> results/runtime.quick.json
    python bench/runtime.py --peers hf  # peers: any of hf, llamacpp (or "none")
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `specserve` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import (
    RESULTS_DIR,
    Prompt,
    TimingStats,
    fmt_number,
    load_spec_bench,
    machine_info,
    markdown_table,
    package_version,
    sample_prompts,
    set_threads,
    time_in_turns,
    write_json,
)
from bench.engines import (
    KS,
    MODEL,
    DecodeSample,
    Engine,
    HFEngine,
    LlamaCppEngine,
    SpecserveEngine,
)
from specserve.model.tokenizer import Tokenizer

FORMATS = ("int4", "bfloat16", "float32")  # int4 is the default ("auto") format on CPU
PEERS = ("hf", "llamacpp")
WARMUP_TOKENS = 8  # one short untimed decode per engine before the timed ones
LLAMA_SKIP = "llama-cpp-python not installed (pip install '.[bench]')"


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``--quick`` shrinks everything for a smoke test."""

    prompts: int = 10
    max_tokens: int = 128
    context: int = 500
    ks: tuple[int, ...] = KS
    repeats: int = 20  # timed forwards per (engine, k), after `warmup` untimed ones
    warmup: int = 3
    profile_steps: int = 20
    threads: int = 2
    formats: tuple[str, ...] = FORMATS
    peers: tuple[str, ...] = PEERS

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "prompts": 3,
            "max_tokens": 32,
            "repeats": 5,
            "warmup": 2,
            "profile_steps": 5,
        }
        base["formats"] = ("int4", "bfloat16")
        return cls(**{**base, **overrides})


def load_peers(settings: Settings, n_ctx: int) -> tuple[list[Engine], list[dict[str, Any]]]:
    """The peer engines to measure, and rows for those skipped (with the reason)."""
    engines: list[Engine] = []
    skipped: list[dict[str, Any]] = []
    if "hf" in settings.peers:
        engines.append(HFEngine())
    if "llamacpp" in settings.peers:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            skipped.append({"engine": LlamaCppEngine.name, "format": "Q4_1", "skipped": LLAMA_SKIP})
        else:
            engines.append(LlamaCppEngine(settings.threads, n_ctx))
    return engines, skipped


# ----------------------------------------------------------------------------- measurements


@dataclass
class EngineResult:
    engine: Engine
    samples: list[DecodeSample] = field(default_factory=list)
    forward: dict[int, TimingStats] = field(default_factory=dict)


def encode(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Chat-template token ids of a prompt (the GGUF's own template)."""
    return tokenizer.encode_chat([{"role": "user", "content": prompt.text}])


def measure_decode(
    results: list[EngineResult], prompt_ids: list[list[int]], max_tokens: int
) -> None:
    """Each prompt on every engine in turn (after one short untimed decode per engine)."""
    for result in results:
        result.engine.decode(prompt_ids[0], WARMUP_TOKENS)
    for n, ids in enumerate(prompt_ids, 1):
        for result in results:
            result.samples.append(result.engine.decode(ids, max_tokens))
        speeds = ", ".join(
            f"{r.engine.name} {r.engine.fmt} "
            f"{(len(r.samples[-1].token_ids) - 1) / max(r.samples[-1].decode_s, 1e-9):.1f}"
            for r in results
        )
        print(
            f"  prompt {n}/{len(prompt_ids)} ({len(ids)} tokens): {speeds} tok/s", file=sys.stderr
        )


def measure_forwards(results: list[EngineResult], ids: list[int], settings: Settings) -> None:
    """Forward time over k new tokens at position ``settings.context``. Every (engine, k)
    pair takes its turn in each round, so a burst of background load is shared by all."""
    context, new = ids[: settings.context], ids[settings.context :]
    for result in results:
        result.engine.prefill(context)
    pairs = [(i, k) for i in range(len(results)) for k in settings.ks]
    calls = {f"{i}:{k}": partial(results[i].engine.forward, new[:k]) for i, k in pairs}
    after = {f"{i}:{k}": results[i].engine.rollback for i, k in pairs}
    stats = time_in_turns(calls, settings.repeats, settings.warmup, after)
    for i, k in pairs:
        results[i].forward[k] = stats[f"{i}:{k}"]


def context_ids(tokenizer: Tokenizer, prompts: Sequence[Prompt], length: int) -> list[int]:
    """The first Spec-Bench prompt (file order) long enough for ``length`` tokens plus the
    largest k, as chat-template ids: real text for both the context and the new tokens."""
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        if len(ids) >= length + max(KS):
            return ids[: length + max(KS)]
    raise ValueError(f"no Spec-Bench prompt has {length + max(KS)} tokens")


def profile_step(engine: SpecserveEngine, ids: list[int], steps: int, top: int = 10) -> dict:
    """Top ops by self CPU time of one decode step at the context position (torch.profiler,
    averaged over ``steps`` steps; the profiler's own overhead inflates tiny ops)."""
    from torch.profiler import ProfilerActivity, profile

    engine.prefill(ids)
    token = [ids[-1]]
    for _ in range(3):
        engine.forward(token)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            engine.forward(token)
        wall = (time.perf_counter() - begin) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [
        {
            "op": e.key,
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "percent": round(100 * e.self_cpu_time_total / total, 1),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in events[:top]
    ]
    return {
        "engine": engine.name,
        "format": engine.fmt,
        "position": len(ids),
        "steps": steps,
        "step_ms_under_profiler": round(wall * 1e3, 3),
        "self_cpu_ms_per_step_total": round(total / 1e3 / steps, 3),
        # Wall time outside any op: the Python of the forward, dispatch, the profiler itself.
        "outside_ops_ms_per_step": round(wall * 1e3 - total / 1e3 / steps, 3),
        "top_ops": ops,
    }


# ----------------------------------------------------------------------------- report


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def row(result: EngineResult, reference: EngineResult | None, settings: Settings) -> dict:
    """One engine's figures for the JSON file."""
    samples = result.samples
    steps = sum(len(s.token_ids) - 1 for s in samples)
    seconds = sum(s.decode_s for s in samples)
    per_prompt = sorted((len(s.token_ids) - 1) / s.decode_s for s in samples if s.decode_s > 0)
    ttfts = sorted(s.ttft_s for s in samples)
    base = result.forward[settings.ks[0]].median_s
    data: dict[str, Any] = {
        "engine": result.engine.name,
        "format": result.engine.fmt,
        "decode": {
            "prompts": len(samples),
            "decode_steps": steps,
            "tokens_per_second": round(steps / seconds, 2),
            "ms_per_step": round(1e3 * seconds / steps, 2),
            "tokens_per_second_median_prompt": round(per_prompt[len(per_prompt) // 2], 2),
            "ttft_ms_median": round(1e3 * ttfts[len(ttfts) // 2], 1),
        },
        "forward": {
            "context": settings.context,
            "ms": {str(k): s.as_ms() for k, s in result.forward.items()},
            "ratio_to_k1": {str(k): round(s.median_s / base, 3) for k, s in result.forward.items()},
        },
    }
    if reference is not None and reference is not result:
        agree = [
            common_prefix(a.token_ids, b.token_ids) / max(len(b.token_ids), 1)
            for a, b in zip(samples, reference.samples, strict=True)
        ]
        data["decode"]["greedy_prefix_agreement"] = {
            "reference": f"{reference.engine.name} {reference.engine.fmt}",
            "mean_fraction": round(sum(agree) / len(agree), 3),
        }
    return data


def tables(rows: list[dict], profile: dict | None, ks: Sequence[int]) -> str:
    """The markdown report printed at the end of a run."""
    measured = [r for r in rows if "skipped" not in r]
    speed = [
        [
            r["engine"],
            r["format"],
            fmt_number(r["decode"]["tokens_per_second_median_prompt"]),
            fmt_number(r["decode"]["tokens_per_second"]),
            fmt_number(r["decode"]["ms_per_step"]),
            fmt_number(r["decode"]["ttft_ms_median"], 0),
            *(fmt_number(r["forward"]["ms"][str(k)]["median_ms"]) for k in ks),
            *(fmt_number(r["forward"]["ratio_to_k1"][str(k)], 2) + "x" for k in ks[1:]),
        ]
        for r in measured
    ]
    speed += [
        [r["engine"], r["format"], f"skipped: {r['skipped']}"] for r in rows if "skipped" in r
    ]
    headers = ["engine", "format", "tok/s (median prompt)", "tok/s (all)", "ms/step (all)"]
    headers += ["TTFT ms (median)"]
    headers += [f"fwd k={k} ms" for k in ks] + [f"k={k}/k=1" for k in ks[1:]]
    parts = [markdown_table(headers, speed)]
    agreement = [
        [
            r["engine"],
            r["format"],
            r["decode"]["greedy_prefix_agreement"]["reference"],
            fmt_number(100 * r["decode"]["greedy_prefix_agreement"]["mean_fraction"], 0) + "%",
        ]
        for r in measured
        if "greedy_prefix_agreement" in r["decode"]
    ]
    if agreement:
        headers = ["engine", "format", "reference", "greedy tokens before first divergence (mean)"]
        parts.append(markdown_table(headers, agreement))
    if profile is not None:
        ops = [
            [
                o["op"],
                fmt_number(o["self_cpu_ms_per_step"], 3),
                fmt_number(o["percent"]),
                fmt_number(o["calls_per_step"]),
            ]
            for o in profile["top_ops"]
        ]
        title = (
            f"specserve {profile['format']} decode step at position {profile['position']}: "
            f"{profile['step_ms_under_profiler']} ms under the profiler, of which "
            f"{profile['outside_ops_ms_per_step']} ms outside any op (Python, dispatch)"
        )
        headers = ["op", "self CPU ms/step", "% of self CPU", "calls/step"]
        parts.append(title + "\n\n" + markdown_table(headers, ops))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer prompts/tokens")
    parser.add_argument("--peers", default=",".join(PEERS), help="hf,llamacpp or none")
    parser.add_argument("--formats", help=f"specserve formats (default {','.join(FORMATS)})")
    parser.add_argument("--prompts", type=int, help="number of Spec-Bench prompts")
    parser.add_argument("--max-tokens", type=int, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, help="timed forwards per engine and k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step")
    parser.add_argument("--out", type=Path, help="JSON file (default results/runtime[.quick].json)")
    args = parser.parse_args(argv)
    peers = tuple(p for p in args.peers.split(",") if p and p != "none")
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    overrides: dict[str, Any] = {"peers": peers, "threads": args.threads}
    if args.formats:
        overrides["formats"] = tuple(args.formats.split(","))
    for name in ("prompts", "max_tokens", "repeats"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    settings = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    if not settings.formats or not set(settings.formats) <= set(FORMATS):
        parser.error(f"--formats must be a comma-separated subset of {', '.join(FORMATS)}")
    out = args.out or RESULTS_DIR / ("runtime.quick.json" if args.quick else "runtime.json")
    return settings, out, not args.no_profile


def main(argv: Sequence[str] | None = None) -> int:
    settings, out, with_profile = parse_args(argv)
    set_threads(settings.threads)
    began = time.perf_counter()
    all_prompts = load_spec_bench()
    prompts = sample_prompts(settings.prompts, all_prompts)
    print(
        f"loading {MODEL}: specserve {', '.join(settings.formats)}; peers "
        f"{', '.join(settings.peers) or 'none'}",
        file=sys.stderr,
    )
    ours = [SpecserveEngine(fmt) for fmt in settings.formats]
    tokenizer = ours[0].model.tokenizer
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    n_ctx = max(1024, max(map(len, prompt_ids)) + settings.max_tokens + 16)
    peers, skipped = load_peers(settings, n_ctx)
    results = [EngineResult(e) for e in [*ours, *peers]]
    print(f"decoding {len(prompts)} prompts x {settings.max_tokens} tokens", file=sys.stderr)
    measuring, measuring_cpu = time.perf_counter(), time.process_time()
    measure_decode(results, prompt_ids, settings.max_tokens)
    print(f"forwards over k={list(settings.ks)} at {settings.context}", file=sys.stderr)
    ctx = context_ids(tokenizer, all_prompts, settings.context)
    measure_forwards(results, ctx, settings)
    cpu_share = (time.process_time() - measuring_cpu) / (time.perf_counter() - measuring)
    profile = None
    if with_profile:
        print(f"profiling a specserve {ours[0].fmt} decode step", file=sys.stderr)
        profile = profile_step(ours[0], ctx[: settings.context], settings.profile_steps)
    reference = next((r for r in results if r.engine.name == HFEngine.name), None)
    rows = [row(r, reference, settings) for r in results] + skipped
    payload = {
        "benchmark": "runtime",
        "model": MODEL,
        "machine": machine_info(settings.threads),
        "versions": {
            name: package_version(name)
            for name in ("transformers", "llama_cpp_python", "gguf", "numpy")
        },
        "settings": {
            **settings.__dict__,
            "questions": [{"question_id": p.question_id, "category": p.category} for p in prompts],
            "prompt_tokens": [len(ids) for ids in prompt_ids],
            "decode": "greedy, EOS ignored; tok/s = (tokens - 1) / (last token - first token)",
            "forward": "median time of one forward over k new tokens after `context` cached "
            "tokens, logits for all k; engines take turns call by call",
        },
        "rows": rows,
        "profile": profile,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    # CPU seconds this process got per wall second and thread while measuring: near 1 on an
    # idle machine (worker threads spin between ops); well below 1 means other work took the
    # cores, so treat the figures with suspicion.
    payload["machine"]["cpu_share_while_measuring"] = round(cpu_share / settings.threads, 2)
    write_json(out, payload)
    print(tables(rows, payload["profile"], settings.ks))
    print(f"\nwrote {out} ({payload['wall_seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
