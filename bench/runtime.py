"""Runtime speed and memory of specserve vs llama.cpp on the same GGUF files.

Speculation pays when a forward over k new tokens costs about one step, and a fast step. For
each model (the Qwen2.5-Coder 1.5B / 0.5B pair and SmolLM2-135M by default) one run measures
specserve (``gguf`` format, the model's forward with a KV cache, as the engine calls it) and
llama.cpp (its own ``llama-bench``), taking turns model by model, on ``--threads`` threads:

1. decode tok/s: greedy, 128 new tokens one step at a time after a short prompt (llama-bench
   ``tg128``; specserve computes the logits of every fed position, as its decode step does);
2. prefill tok/s: one forward over a 512-token prompt at position 0 (``pp512``), with the
   logits of its last position only, as the engine's prefill and llama-bench's ``pp``
   compute (the logits of every position would add 512 rows of LM head: 2.5x the time on
   Gemma 3's 262,144-token vocabulary);
3. the cost of one forward over k = 1, 2, 4, 8, 16, 32 new tokens, in ms and as a ratio to
   k = 1. specserve: after a 512-token context, logits of all k positions (what a verify
   needs). llama.cpp: ``llama-bench -p 1,2,...,32 -n 0``, i.e. at position 0 (``-d``, the
   depth, is ``--llama-depth``) and, as llama-bench decodes, logits of the last position only;
4. peak RSS: each (engine, model) runs in its own process (``--worker``): specserve's own
   ``ru_maxrss``; llama-bench's, as RUSAGE_CHILDREN of a worker whose only child it is.

Then the issue's goals, met or not, and a torch.profiler summary of one specserve decode step
of ``--profile-model``. Before each round and after the last, the machine's arithmetic and
memory rates (``bench/machine_state.py``): a VM's arithmetic can slow far more than its
memory from one day to the next, and the k-to-1 ratios move with it.

llama.cpp is found in ``--llama-cpp-bin DIR`` or ``$LLAMA_CPP_BIN`` (else it is skipped). It
is built from the source that the llama-cpp-python sdist vendors, outside the repository and
never while timing (about 15 minutes on 2 cores)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF
    cmake --build build -j2 --target llama-server llama-bench      # -> build/bin/

Usage (from the repository root)::

    LLAMA_CPP_BIN=/opt/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \\
        python -m bench.runtime                          # -> bench/results/runtime.json
    python -m bench.runtime --quick --models smollm2-135m-instruct   # smoke run, .quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench import machine_state
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    TimingStats,
    load_spec_bench,
    machine_info,
    set_threads,
    time_call,
    time_in_turns,
    write_json,
)
from bench.rounds import judge_by_round, merge
from bench.runtime_report import QWEN_PAIR, goals, notes, report, vs_llama
from specserve.model.catalog import resolve
from specserve.model.loader import load_model
from specserve.model.transformer import ForwardBatch

MODELS = (*QWEN_PAIR, "smollm2-135m-instruct")
ENGINES = ("specserve", "llama.cpp")
KS = (1, 2, 4, 8, 16, 32)  # forward sizes: what a verify of k - 1 drafts (+ 1) costs
LLAMA_ENV = "LLAMA_CPP_BIN"
DECODE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
MB = 1024  # ru_maxrss is in KiB on Linux


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``--quick`` shrinks everything for a smoke test."""

    models: tuple[str, ...] = MODELS
    threads: int = 2
    decode_tokens: int = 128
    prompt_tokens: int = 512  # the prefill length, and the context before the k-forwards
    ks: tuple[int, ...] = KS
    repeats: int = 5  # timed decodes / prefills / forwards per k; llama-bench -r
    warmup: int = 2
    profile_model: str | None = MODELS[0]
    profile_steps: int = 10
    llama_bin: str | None = None
    llama_depth: int = 0
    rounds: int = 1  # every worker this many times, figures merged by the median (rounds.py)

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        base = {"decode_tokens": 32, "repeats": 2, "warmup": 1, "profile_steps": 3}
        return cls(**{**base, **overrides})

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data: dict[str, Any] = json.loads(text)
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / MB, 1)


# ----------------------------------------------------------------------------- specserve


def context_ids(tokenizer: Any, length: int) -> list[int]:
    """Real text for the prefill and k-forwards: the first Spec-Bench prompt (file order)
    with ``length`` tokens, as chat-template ids of the model's own tokenizer. Longer than
    any one prompt (``--prompt-tokens 2048``), one message of the prompts in file order,
    a blank line apart."""
    texts = [prompt.text for prompt in load_spec_bench()]
    for text in texts:
        ids = tokenizer.encode_chat([{"role": "user", "content": text}])
        if len(ids) >= length:
            return ids[:length]
    for count in range(2, len(texts) + 1):
        joined = "\n\n".join(texts[:count])
        ids = tokenizer.encode_chat([{"role": "user", "content": joined}])
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"the Spec-Bench prompts together have fewer than {length} tokens")


class Forwards:
    """The model's forward over one sequence in slot 0 of a KV cache, as the engine calls it."""

    def __init__(self, name: str) -> None:
        self.model = load_model(name, dtype="gguf", progress=False)
        self.lm = self.model.lm
        self.cache = self.lm.new_cache(1, 64)

    def reset(self, max_len: int) -> None:
        self.cache = self.lm.new_cache(1, max_len)

    def __call__(self, ids: list[int], start: int, last_logits: int | None = None) -> Any:
        tokens = torch.tensor([ids])  # (1, T)
        return self.lm(ForwardBatch(tokens, [0], [start]), self.cache, last_logits)  # (1, T|n, V)

    def decode(self, prompt: list[int], steps: int) -> float:
        """Seconds for ``steps`` greedy one-token steps after ``prompt`` (prefill untimed)."""
        self.reset(len(prompt) + steps + 1)
        token = int(self(prompt, 0, last_logits=1)[0, -1].argmax())
        begin = time.perf_counter()
        for position in range(len(prompt), len(prompt) + steps):
            token = int(self([token], position)[0, -1].argmax())
        return time.perf_counter() - begin


def specserve_decode(fwd: Forwards, s: Settings) -> dict[str, Any]:
    prompt = fwd.model.tokenizer.encode_chat([{"role": "user", "content": DECODE_PROMPT}])
    for _ in range(s.warmup):
        fwd.decode(prompt, min(8, s.decode_tokens))
    stats = TimingStats.of([fwd.decode(prompt, s.decode_tokens) for _ in range(s.repeats)])
    return {"tokens": s.decode_tokens, "after": len(prompt), **speed(stats, s.decode_tokens)}


def specserve_prefill(fwd: Forwards, ids: list[int], s: Settings) -> dict[str, Any]:
    fwd.reset(len(ids))  # the cache is position-indexed: each call rewrites the same cells
    stats = time_call(partial(fwd, ids, 0, 1), s.repeats, s.warmup)
    return {"tokens": len(ids), **speed(stats, len(ids))}


def specserve_forwards(fwd: Forwards, ids: list[int], s: Settings) -> dict[str, Any]:
    """One forward over k new tokens after ``len(ids)`` cached ones; the ks take turns."""
    context = s.prompt_tokens
    fwd.reset(context + max(s.ks))
    fwd(ids[:context], 0, last_logits=1)
    new = ids[context:]
    calls: dict[str, Callable[[], object]] = {str(k): partial(fwd, new[:k], context) for k in s.ks}
    stats = time_in_turns(calls, s.repeats, s.warmup)
    return {"position": context, "all_logits": True, **forward_costs(stats)}


def profile_step(fwd: Forwards, ids: list[int], steps: int, top: int = 8) -> dict[str, Any]:
    """Top ops by self CPU time of one decode step after ``ids`` (the profiler's own
    overhead inflates tiny ops). The native gguf kernels are no torch ops: their time is in
    the wall time outside any op, with Python and dispatch."""
    from torch.profiler import ProfilerActivity, profile

    fwd.reset(len(ids) + 1)
    fwd(ids, 0, last_logits=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            fwd(ids[-1:], len(ids))
        wall_ms = (time.perf_counter() - begin) * 1e3 / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    ops = [[e.key, round(e.self_cpu_time_total / 1e3 / steps, 3), e.count // steps] for e in events]
    outside = round(wall_ms - total_ms, 3)
    return {
        "position": len(ids),
        "step_ms": round(wall_ms, 3),
        "outside_ops_ms": outside,
        "top_ops [op, self CPU ms, calls]": ops[:top],
    }


def specserve_worker(name: str, s: Settings) -> dict[str, Any]:
    set_threads(s.threads)  # before loading: the gguf format hands them to the native kernels
    fwd = Forwards(name)
    ids = context_ids(fwd.model.tokenizer, s.prompt_tokens + max(s.ks))
    result: dict[str, Any] = {
        "decode": specserve_decode(fwd, s),
        "prefill": specserve_prefill(fwd, ids[: s.prompt_tokens], s),
        "forward": specserve_forwards(fwd, ids, s),
        "peak_rss_mb": peak_rss_mb(),  # read before the profiler adds its own memory
    }
    if name == s.profile_model and s.profile_steps > 0:
        result["profile"] = profile_step(fwd, ids[: s.prompt_tokens], s.profile_steps)
    return result


# ----------------------------------------------------------------------------- llama.cpp


def llama_commands(path: Path, s: Settings) -> list[list[str]]:
    """Two llama-bench calls: pp at the prompt length and tg (at position 0), then pp at every
    k (at depth ``llama_depth``; -d would also shift pp512 and tg, hence two calls)."""
    base = [str(Path(s.llama_bin or "") / "llama-bench"), "-m", str(path)]
    base += ["-t", str(s.threads), "-r", str(s.repeats), "-o", "json"]
    ks = ",".join(map(str, s.ks))
    return [
        [*base, "-p", str(s.prompt_tokens), "-n", str(s.decode_tokens)],
        [*base, "-p", ks, "-n", "0", "-d", str(s.llama_depth)],
    ]


def llama_bench(command: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def llama_worker(name: str, s: Settings) -> dict[str, Any]:
    commands = llama_commands(resolve(name)[0], s)
    main_tests, k_tests = (llama_bench(command) for command in commands)
    pp = next(sample_stats(t) for t in main_tests if t["n_gen"] == 0)
    tg = next(sample_stats(t) for t in main_tests if t["n_gen"] > 0)
    per_k = {str(t["n_prompt"]): sample_stats(t) for t in k_tests}
    return {
        "decode": {"tokens": s.decode_tokens, **speed(tg, s.decode_tokens)},
        "prefill": {"tokens": s.prompt_tokens, **speed(pp, s.prompt_tokens)},
        "forward": {"position": s.llama_depth, "all_logits": False, **forward_costs(per_k)},
        # Both llama-bench runs are this worker's only children: the larger one's peak.
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
        "model_type": main_tests[0]["model_type"],
        "build": {key: main_tests[0][key] for key in ("build_commit", "build_number")},
        "commands": [" ".join(command) for command in commands],
    }


def sample_stats(test: dict[str, Any]) -> TimingStats:
    return TimingStats.of([ns / 1e9 for ns in test["samples_ns"]])


def llama_skip_reason(s: Settings) -> str | None:
    if not s.llama_bin:
        return f"llama.cpp not measured: pass --llama-cpp-bin DIR or set ${LLAMA_ENV}"
    if not (Path(s.llama_bin) / "llama-bench").is_file():
        return f"llama.cpp not measured: no llama-bench in {s.llama_bin}"
    return None


# ----------------------------------------------------------------------------- figures


def speed(stats: TimingStats, tokens: int) -> dict[str, Any]:
    """Tokens/s of the median call, and the call times."""
    return {"tokens_per_second": round(tokens / stats.median_s, 2), **stats.as_ms()}


def forward_costs(stats: dict[str, TimingStats]) -> dict[str, Any]:
    base = stats[min(stats, key=int)].median_s
    ratios = {k: round(st.median_s / base, 3) for k, st in stats.items()}
    return {"ms": {k: st.as_ms() for k, st in stats.items()}, "ratio_to_k1": ratios}


def run_worker(engine: str, model: str, s: Settings) -> dict[str, Any]:
    """One (engine, model) measurement in a fresh process, so its peak RSS is its own."""
    command = [sys.executable, "-m", "bench.runtime", "--worker", engine, "--model", model]
    command += ["--settings", json.dumps(asdict(s))]
    print(f"{model}: {engine} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"  failed: {tail[0]}", file=sys.stderr)
        return {"error": done.stderr[-3000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    decode, prefill = (result[part]["tokens_per_second"] for part in ("decode", "prefill"))
    print(
        f"  decode {decode}, prefill {prefill} tok/s ({result['wall_seconds']} s)", file=sys.stderr
    )
    return result


def measure(
    s: Settings,
) -> tuple[list[dict[str, dict[str, Any]]], str | None, list[dict[str, Any]]]:
    """Every model on every engine, the engines taking turns model by model (in the other
    order every second round): one results dict per round, why llama.cpp was skipped (or
    None), and the machine's state before each round and after the last."""
    skip = llama_skip_reason(s)
    if skip:
        print(skip, file=sys.stderr)
    engines = [e for e in ENGINES if not (skip and e == "llama.cpp")]
    rounds, states = [], [state_now(s.threads)]
    for r in range(s.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        rounds.append({m: {e: run_worker(e, m, s) for e in order} for m in s.models})
        states.append(state_now(s.threads))
    return rounds, skip, states


def state_now(threads: int) -> dict[str, Any]:
    state = machine_state.probe(threads)
    print(f"machine state {machine_state.describe(state)}", file=sys.stderr)
    return state


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer, shorter runs")
    parser.add_argument("--models", help=f"comma-separated catalog names ({','.join(MODELS)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-bin", help=f"llama.cpp's build/bin (default ${LLAMA_ENV})")
    parser.add_argument("--llama-depth", type=int, help="llama-bench -d for the k-forwards")
    parser.add_argument("--decode-tokens", type=int, help="new tokens per decode (128)")
    parser.add_argument("--prompt-tokens", type=int, help="prefill length and context (512)")
    parser.add_argument("--repeats", type=int, help="timed runs of each measurement")
    parser.add_argument(
        "--ks",
        help="tokens per timed forward, comma-separated (1,2,4,8,16,32); fewer keep "
        "long contexts short: llama-bench prefills the whole depth before each run",
    )
    parser.add_argument("--rounds", type=int, help="workers per (model, engine), median kept")
    parser.add_argument("--profile-model", help=f"model to profile ({MODELS[0]}; 'none')")
    parser.add_argument("--out", type=Path, help="JSON file (default results/runtime[.quick].json)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"threads": args.threads}
    overrides["llama_bin"] = args.llama_cpp_bin or os.environ.get(LLAMA_ENV)
    if args.models:
        overrides["models"] = tuple(m for m in args.models.split(",") if m)
    if args.ks:
        overrides["ks"] = tuple(int(k) for k in args.ks.split(",") if k)
    if args.profile_model:
        overrides["profile_model"] = None if args.profile_model == "none" else args.profile_model
    for name in ("llama_depth", "decode_tokens", "prompt_tokens", "repeats", "rounds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def worker_main(args: argparse.Namespace) -> int:
    s = Settings.from_json(args.settings)
    work = specserve_worker if args.worker == "specserve" else llama_worker
    print(json.dumps(work(args.model, s)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    s = settings_of(args)
    began = time.perf_counter()
    rounds, skip, states = measure(s)
    results = merge(rounds)
    for round_results in [results, *rounds]:
        vs_llama(round_results)
    found = goals(results)
    if s.rounds > 1:
        judge_by_round(found, [goals(r) for r in rounds])
    peer: dict[str, Any] = next(
        (e["llama.cpp"] for e in results.values() if "build" in e.get("llama.cpp", {})), {}
    )
    payload = {
        "benchmark": "runtime",
        "machine": machine_info(s.threads),
        "llama_cpp": peer.get("build", skip),
        "settings": asdict(s),
        "notes": notes(s, skip),
        # before each round and after the last: a ratio goal moves with these (machine_state.py)
        "machine_state": states,
        "goals": found,
        "results": results,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # above --threads: contended
    }
    out = args.out or RESULTS_DIR / ("runtime.quick.json" if args.quick else "runtime.json")
    write_json(out, payload)
    print(report(payload, s))
    print(f"\nwrote {out} ({payload['wall_seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
