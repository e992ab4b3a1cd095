"""The server under concurrent load: speculation vs plain decoding, 1 to 8 clients.

Starts the real server (`python -m specserve serve`, SmolLM2-135M-Instruct, or ``--model``)
with two deployments of the same model — ``spec`` (its default drafter: n-gram, self-tuned) and
``plain`` (``--no-speculation``) — and drives it with N client threads using the official
`openai` client (streaming, greedy, prefix cache off). For each concurrency the two
deployments run in turns on the same prompts, so machine noise hits both alike. Reported:
throughput (generated tokens / wall time), request latency and time to first token (p50 /
p95), tokens per target step, and whether every speculative output equalled the plain one.

    python -m bench.serving [--prompts 16] [--max-tokens 128] [--concurrency 1,2,4,8]

With ``--ray`` it measures Ray Serve instead (issue 15): one deployment of the same model with
plain decoding (``--no-speculation``, so that only the serving path differs), served in turn by
the single-process server (``serve``, T threads), by ``serve --ray`` with 1 replica x T threads
and by ``serve --ray`` with T replicas x 1 thread (T = ``--threads``, default 2), each on
127.0.0.1 only and stopped, with every Ray process it started, before the next starts. Per
server: throughput and request latency p50/p95 at each concurrency, and the round trip of a
``max_tokens=1`` request (median of ``--probe-repeats``). Reported: the overhead Ray adds per
request (1-token round trip, and the whole streamed request at one client, Ray 1 x T minus the
single process) and the issue's goals (< 5 ms; T replicas >= 0.9x the single process's
throughput at the most clients), met or not. The run stops at ``--time-limit`` seconds.
With ``--rounds N`` the three servers run N times, in alternating order: this VM's speed
drifts from minute to minute, so each goal is judged on its median round (every round's
figure listed), and the table shown is the round with the median throughput ratio.

    python -m bench.serving --ray [--rounds 3] [--prompts 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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
from bench.serving_load import (
    MODEL,
    PROMPTS,
    RAY_PROMPTS_PER_CLIENT,
    one_request,
    run_phase,
    specserve_cli,
)

DEPLOYMENTS = {"plain": ["--no-speculation"], "spec": []}


def start_server(
    home: Path, port: int, threads: int, max_batch: int, model: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPECSERVE_HOME": str(home)}
    for name, flags in DEPLOYMENTS.items():
        specserve_cli("deployment", "create", model, "--id", name, *flags, env=env)
    command = [sys.executable, "-m", "specserve", "serve", "--port", str(port)]
    command += ["--threads", str(threads), "--max-batch", str(max_batch), "--log-level", "warning"]
    # The deployments take turns on the same prompts: with a prefix cache, the second to run
    # would find every prompt prefilled by the first (bench/prefix_cache.py measures that).
    command += ["--prefix-cache-mb", "0"]
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help=f"catalog name (default {MODEL})")
    parser.add_argument(
        "--prompts",
        type=int,
        help=f"requests per concurrency level (default {PROMPTS}; --ray: "
        f"{RAY_PROMPTS_PER_CLIENT} per client at the most clients)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads per server (--ray: per machine, T)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="--ray uses this and the next two ports"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="result file (default: bench/results/serving.json, --ray: serving-ray.json)",
    )
    ray = parser.add_argument_group("Ray Serve (issue 15)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="single process vs serve --ray (1 replica x T threads, T replicas x 1 thread)",
    )
    ray.add_argument(
        "--probe-repeats",
        type=int,
        default=40,
        help="timed max_tokens=1 round trips per server (the fixed overhead per request)",
    )
    ray.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the three servers this many times, alternating their order; each goal is "
        "judged on its median round (this VM's speed drifts minute to minute)",
    )
    ray.add_argument(
        "--stream-interval-ms",
        type=float,
        help="passed to serve --ray (default: its own, specserve.server.run)",
    )
    ray.add_argument(
        "--ray-proxy",
        choices=["haproxy", "ingress"],
        help="passed to serve --ray: what faces the clients (default: its own, HAProxy here)",
    )
    ray.add_argument(
        "--time-limit",
        type=int,
        default=1800,
        help="seconds the whole --ray run may take; then it stops every server and fails",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS_DIR / ("serving-ray.json" if args.ray else "serving.json")
    return args


def main() -> None:
    args = parse_args()
    if args.ray:
        from bench.serving_ray import main_ray  # imports nothing of Ray's until it runs

        main_ray(args)
    else:
        main_single(args)


SINGLE_HEADERS = [
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


def main_single(args: argparse.Namespace) -> None:
    """Plain vs speculative deployments of one `specserve serve`, at every concurrency."""
    levels = [int(c) for c in args.concurrency.split(",")]
    args.prompts = args.prompts or PROMPTS
    prompts = sample_prompts(args.prompts)
    phases, metrics = serve_phases(args, [p.text for p in prompts], levels)
    rows, summary = spec_vs_plain(phases, levels)
    table = markdown_table(SINGLE_HEADERS, rows)
    print(table)
    write_json(
        args.out,
        {
            "benchmark": "serving",
            "model": args.model,
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


def serve_phases(
    args: argparse.Namespace, texts: list[str], levels: list[int]
) -> tuple[list[dict[str, Any]], str]:
    """Every (level, deployment) phase against one server, plain and speculative in turn at
    each level; and the server's /metrics text at the end."""
    with tempfile.TemporaryDirectory() as home:
        server = start_server(Path(home), args.port, args.threads, max(levels), args.model)
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
    return phases, metrics


def spec_vs_plain(
    phases: list[dict[str, Any]], levels: list[int]
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Table rows (SINGLE_HEADERS) and, per level, speculative / plain throughput and
    whether the outputs were identical (to plain's at this level and at the first)."""
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
    return rows, summary


# ----------------------------------------------------------------------------- --ray (issue 15)

if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
