"""The server under concurrent load: speculation vs plain decoding, 1 to 8 clients.

Starts the real server (`python -m specserve serve`, SmolLM2-135M-Instruct) with two
deployments of the same model — ``spec`` (its default drafter: n-gram, self-tuned) and
``plain`` (``--no-speculation``) — and drives it with N client threads using the official
`openai` client (streaming, greedy). For each concurrency the two deployments run in turns
on the same prompts, so machine noise hits both alike. Reported: throughput (generated
tokens / wall time), request latency and time to first token (p50 / p95), tokens per target
step, and whether every speculative output equalled the plain one.

    python bench/serving.py [--prompts 16] [--max-tokens 128] [--concurrency 1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import openai

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    fmt_number,
    machine_info,
    markdown_table,
    sample_prompts,
    write_json,
)

MODEL = "smollm2-135m-instruct"
DEPLOYMENTS = {"plain": ["--no-speculation"], "spec": []}


@dataclass
class RequestRecord:
    prompt: int
    text: str
    tokens: int
    latency: float  # seconds, request sent -> last chunk
    ttft: float  # seconds, request sent -> first content chunk
    tokens_per_step: float


def _cli(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "specserve", *args], check=True, env=env, cwd=REPO_ROOT)


def start_server(home: Path, port: int, threads: int, max_batch: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPECSERVE_HOME": str(home)}
    for name, flags in DEPLOYMENTS.items():
        _cli("deployment", "create", MODEL, "--id", name, *flags, env=env)
    command = [sys.executable, "-m", "specserve", "serve", "--port", str(port)]
    command += ["--threads", str(threads), "--max-batch", str(max_batch), "--log-level", "warning"]
    server = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start within 5 minutes")


def one_request(
    client: openai.OpenAI, deployment: str, index: int, text: str, max_tokens: int
) -> RequestRecord:
    began = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage: Any = None
    stream = client.chat.completions.create(
        model=deployment,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
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
    )


def run_phase(
    client: openai.OpenAI, deployment: str, prompts: list[str], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(
            pool.map(
                lambda item: one_request(client, deployment, item[0], item[1], max_tokens),
                enumerate(prompts),
            )
        )
    wall = time.perf_counter() - began
    tokens = sum(r.tokens for r in records)
    latencies = sorted(r.latency for r in records)
    ttfts = sorted(r.ttft for r in records)
    return {
        "deployment": deployment,
        "concurrency": concurrency,
        "requests": len(records),
        "generated_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "throughput_tokens_per_second": round(tokens / wall, 2),
        "latency_p50": round(_quantile(latencies, 0.5), 3),
        "latency_p95": round(_quantile(latencies, 0.95), 3),
        "ttft_p50": round(_quantile(ttfts, 0.5), 3),
        "ttft_p95": round(_quantile(ttfts, 0.95), 3),
        "tokens_per_step": round(statistics.mean(r.tokens_per_step for r in records), 3),
        "outputs": [r.text for r in sorted(records, key=lambda r: r.prompt)],
    }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = sample_prompts(args.prompts)
    texts = [p.text for p in prompts]
    with tempfile.TemporaryDirectory() as home:
        server = start_server(Path(home), args.port, args.threads, max(levels))
        try:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{args.port}/v1", api_key="-", max_retries=0
            )
            one_request(client, "plain", 0, "Hello", 8)  # warm-up
            phases = []
            for level in levels:
                for deployment in DEPLOYMENTS:
                    phase = run_phase(client, deployment, texts, level, args.max_tokens)
                    phases.append(phase)
                    print(
                        f"c={level} {deployment}: {phase['throughput_tokens_per_second']} tok/s, "
                        f"latency p50 {phase['latency_p50']} s, "
                        f"{phase['tokens_per_step']} tokens/step",
                        flush=True,
                    )
            metrics = httpx.get(f"http://127.0.0.1:{args.port}/metrics", timeout=10).text
        finally:
            server.terminate()
            server.wait(30)
    rows, summary = [], []
    plain_outputs = {p["concurrency"]: p["outputs"] for p in phases if p["deployment"] == "plain"}
    by_key = {(p["deployment"], p["concurrency"]): p for p in phases}
    for level in levels:
        plain, spec = by_key[("plain", level)], by_key[("spec", level)]
        ratio = spec["throughput_tokens_per_second"] / plain["throughput_tokens_per_second"]
        identical = spec["outputs"] == plain["outputs"] == plain_outputs[levels[0]]
        summary.append(
            {"concurrency": level, "throughput_ratio": round(ratio, 3), "identical": identical}
        )
        for p in (plain, spec):
            rows.append(
                [
                    level,
                    p["deployment"],
                    fmt_number(p["throughput_tokens_per_second"]),
                    fmt_number(p["latency_p50"], 2),
                    fmt_number(p["latency_p95"], 2),
                    fmt_number(p["ttft_p50"], 2),
                    fmt_number(p["tokens_per_step"], 2),
                    f"{ratio:.2f}x" if p is spec else "",
                    ("yes" if identical else "NO") if p is spec else "",
                ]
            )
    headers = [
        "clients",
        "deployment",
        "tok/s",
        "latency p50 s",
        "p95 s",
        "TTFT p50 s",
        "tokens/step",
        "spec/plain",
        "same output",
    ]
    table = markdown_table(headers, rows)
    print(table)
    write_json(
        args.out,
        {
            "benchmark": "serving",
            "model": MODEL,
            "settings": vars(args) | {"out": str(args.out)},
            "prompts": [{"question_id": p.question_id, "category": p.category} for p in prompts],
            "machine": machine_info(args.threads),
            "phases": phases,
            "summary": summary,
            "table": table,
            "metrics_excerpt": [
                line
                for line in metrics.splitlines()
                if line.startswith(("specserve_draft_tokens_total", "specserve_accepted_draft"))
            ],
        },
    )


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
