"""The client side of the serving benchmarks: `specserve` commands, one streamed request,
and a phase of N concurrent clients (shared by bench.serving and bench.serving_ray)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from bench.common import REPO_ROOT

MODEL = "smollm2-135m-instruct"
PROMPTS = 16  # requests per concurrency level (--prompts)
# --ray: requests per client at the most clients. With two, the router's split of the last
# requests over the replicas decides the figure: 16 prompts at 8 clients measured 0.72x at a
# 10/6 split and 1.11x at 8/8 in one run (docs/benchmarks.md).
RAY_PROMPTS_PER_CLIENT = 4
# specserve.server.ray_replica.REPLICA_HEADER; importing that module would import Ray.
REPLICA_HEADER = "x-specserve-replica"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class RequestRecord:
    prompt: int
    text: str
    tokens: int
    latency: float  # seconds, request sent -> last chunk
    ttft: float  # seconds, request sent -> first content chunk
    tokens_per_step: float
    replica: str | None = None  # the Ray replica that answered (None: single process)


def specserve_cli(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "specserve", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"specserve {' '.join(args)} failed:\n{done.stderr.strip()}")


def one_request(
    client: openai.OpenAI, deployment: str, index: int, text: str, max_tokens: int
) -> RequestRecord:
    began = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage: Any = None
    raw = client.chat.completions.with_raw_response.create(
        model=deployment,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    speculation = usage.model_extra["speculation"]
    return RequestRecord(
        prompt=index,
        text="".join(pieces),
        tokens=usage.completion_tokens,
        latency=end - began,
        ttft=(first or end) - began,
        tokens_per_step=speculation["mean_accepted_length"],
        replica=raw.headers.get(REPLICA_HEADER),
    )


def concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``fn`` over ``items`` on ``workers`` threads, in order. On an exception (a failed
    request, Ctrl-C, the time limit) it returns at once, not after the requests in flight:
    the server is then stopped, which ends them."""
    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_phase(
    client: openai.OpenAI, deployment: str, prompts: list[str], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    began = time.perf_counter()
    records = concurrently(
        lambda item: one_request(client, deployment, item[0], item[1], max_tokens),
        enumerate(prompts),
        concurrency,
    )
    wall = time.perf_counter() - began
    tokens = sum(r.tokens for r in records)
    latencies = sorted(r.latency for r in records)
    ttfts = sorted(r.ttft for r in records)
    ordered = sorted(records, key=lambda r: r.prompt)
    return {
        "deployment": deployment,
        "concurrency": concurrency,
        "requests": len(records),
        "generated_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "throughput_tokens_per_second": round(tokens / wall, 2),
        "latency_p50": round(quantile(latencies, 0.5), 3),
        "latency_p95": round(quantile(latencies, 0.95), 3),
        "ttft_p50": round(quantile(ttfts, 0.5), 3),
        "ttft_p95": round(quantile(ttfts, 0.95), 3),
        "tokens_per_step": round(statistics.mean(r.tokens_per_step for r in records), 3),
        "latencies": [round(r.latency, 4) for r in ordered],
        "requests_per_replica": dict(Counter(r.replica for r in records if r.replica)),
        "outputs": [r.text for r in ordered],
    }


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]
