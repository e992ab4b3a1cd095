"""`python -m bench.serving --ray` (issue 15): the single-process server against `serve --ray`
(1 replica x T threads, T replicas x 1 thread); see bench/serving.py for what is measured."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from bench.common import (
    REPO_ROOT,
    fmt_number,
    machine_info,
    markdown_table,
    package_version,
    sample_prompts,
    write_json,
)
from bench.rounds import judge_by_round
from bench.serving_load import (
    RAY_PROMPTS_PER_CLIENT,
    concurrently,
    one_request,
    quantile,
    run_phase,
    specserve_cli,
)
from bench.serving_procs import Interrupts, port_is_free, stop_server, tail, wait_ready

RAY_DEPLOYMENT = "bench"  # the one deployment every server of the --ray run serves
REQUEST_TIMEOUT_S = 300.0  # the longest a request waits for its next chunk
WARM_ROUNDS = (2, 6)  # warm-up rounds: at least, and at most while a replica is still unseen
PROBE_WARMUP = 3  # untimed 1-token round trips before the timed ones
OVERHEAD_GOAL_MS = 5.0  # issue 15: Ray adds under 5 ms per request
THROUGHPUT_GOAL = 0.9  # issue 15: T replicas >= 0.9x the single process at the most clients


@dataclass(frozen=True)
class Setup:
    """One server of the --ray comparison."""

    name: str
    label: str
    ray: bool
    replicas: int
    threads: int  # per replica (the single process: its threads)


def ray_setups(threads: int) -> list[Setup]:
    """The single process first (the baseline), then Ray 1 x T, then Ray T x 1."""
    t = threads
    return [
        Setup("single", f"single process, {t} threads", False, 1, t),
        Setup(f"ray-1x{t}", f"Ray, 1 replica x {t} threads", True, 1, t),
        Setup(f"ray-{t}x1", f"Ray, {t} replicas x 1 thread", True, t, 1),
    ]


@contextlib.contextmanager
def served(
    setup: Setup,
    port: int,
    max_batch: int,
    work: Path,
    interrupts: Interrupts,
    model: str,
    ray_flags: list[str],
) -> Iterator[dict[str, Any]]:
    """`specserve serve` (with --ray: `serve --ray`) for ``setup`` on 127.0.0.1:``port``, in
    its own process group and with its own Ray directory; stopped, with every process it
    started, whatever happens. Yields a dict of facts, completed with "stop" on the way out."""
    if not port_is_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; choose another --port")
    home = work / setup.name
    home.mkdir()
    log = work / f"{setup.name}.log"
    info: dict[str, Any] = {"port": port}
    server: subprocess.Popen[bytes] | None = None
    # Short (Ray's socket paths must fit in 107 bytes) and ours alone: no other Ray on this
    # machine is joined, and ours is found by it at the end.
    ray_dir = Path(tempfile.mkdtemp(prefix="ssb-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"SPECSERVE_HOME": str(home), "RAY_TMPDIR": str(ray_dir)}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"}  # loopback only: Ray must not phone home
    try:
        flags = ["--no-speculation", "--min-replicas", str(setup.replicas)]
        specserve_cli("deployment", "create", model, "--id", RAY_DEPLOYMENT, *flags, env=env)
        command = [sys.executable, "-m", "specserve", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--threads", str(setup.threads)]
        command += ["--max-batch", str(max_batch), "--log-level", "warning"]
        command += ["--ray", *ray_flags] if setup.ray else []
        began = time.perf_counter()
        with log.open("wb") as out:
            server = subprocess.Popen(
                command,
                env=env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, Ray's daemons included
            )
        wait_ready(server, port, RAY_DEPLOYMENT, setup.replicas if setup.ray else 0)
        info["start_seconds"] = round(time.perf_counter() - began, 1)
        yield info
    except BaseException:
        print(f"--- {setup.name}: the server's log, last lines ---\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        with interrupts.held():
            if server is not None:
                info["stop"] = stop_server(server, ray_dir)
                print(f"   stopped {setup.name}: {info['stop']}", flush=True)
            shutil.rmtree(ray_dir, ignore_errors=True)


def warm_up(client: openai.OpenAI, replicas: int) -> dict[str, int]:
    """Short requests, 2 per replica at a time, until every replica has answered (a first
    request per process pays one-time costs); requests per replica."""
    seen: Counter[str] = Counter()
    least, most = WARM_ROUNDS
    for round_ in range(most):
        records = concurrently(
            lambda i: one_request(client, RAY_DEPLOYMENT, i, "Hello", 8),
            range(2 * replicas),
            2 * replicas,
        )
        seen.update(r.replica or "single process" for r in records)
        if round_ + 1 >= least and len(seen) >= replicas:
            break
    return dict(seen)


def probe_round_trips(client: openai.OpenAI, repeats: int) -> dict[str, Any]:
    """One client, ``max_tokens=1`` requests one after another: the fixed cost of a request
    (HTTP, routing, prefill of a short prompt, one token, the stream's end)."""
    seconds = []
    for i in range(PROBE_WARMUP + repeats):
        record = one_request(client, RAY_DEPLOYMENT, i, "Hi", 1)
        if i >= PROBE_WARMUP:
            seconds.append(record.latency)
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "max_tokens": 1,
        "repeats": repeats,
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(quantile(ms, 0.95), 2),
        "min_ms": round(ms[0], 2),
        "round_trips_ms": [round(s * 1e3, 2) for s in seconds],
    }


def run_setup(
    setup: Setup,
    port: int,
    texts: list[str],
    levels: list[int],
    args: argparse.Namespace,
    work: Path,
    interrupts: Interrupts,
) -> dict[str, Any]:
    print(f"== {setup.label}: starting on 127.0.0.1:{port}", flush=True)
    phases = []
    interval = args.stream_interval_ms
    ray_flags = [] if interval is None else ["--stream-interval-ms", f"{interval:g}"]
    ray_flags += ["--ray-proxy", args.ray_proxy] if args.ray_proxy else []
    with served(setup, port, max(levels), work, interrupts, args.model, ray_flags) as info:
        print(f"   ready in {info['start_seconds']} s", flush=True)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="-",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )
        info["warm_up_requests"] = warm_up(client, setup.replicas)
        info["probe"] = probe_round_trips(client, args.probe_repeats)
        probe = info["probe"]
        print(
            f"   1-token round trip: median {probe['median_ms']} ms, p95 {probe['p95_ms']} ms "
            f"(warm-up answered by {info['warm_up_requests']})",
            flush=True,
        )
        for level in levels:
            phase = run_phase(client, RAY_DEPLOYMENT, texts, level, args.max_tokens)
            phases.append(phase)
            spread = phase["requests_per_replica"]
            print(
                f"   c={level}: {phase['throughput_tokens_per_second']} tok/s, latency p50 "
                f"{phase['latency_p50']} s, p95 {phase['latency_p95']} s"
                + (f", requests per replica {sorted(spread.values())}" if spread else ""),
                flush=True,
            )
        with contextlib.suppress(OSError):
            info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return {"setup": asdict(setup), **info, "phases": phases}


def _phase(result: dict[str, Any], level: int) -> dict[str, Any]:
    return next(p for p in result["phases"] if p["concurrency"] == level)


def ray_summary(
    results: list[dict[str, Any]], levels: list[int]
) -> tuple[list[list[str]], dict[str, Any], list[dict[str, Any]]]:
    """Table rows, the overhead Ray adds per request, and the issue's goals."""
    single, one, many = results  # ray_setups' order
    rows = [
        _ray_row(result, level, _phase(single, level)) for level in levels for result in results
    ]
    # Overhead: Ray 1 x T against the single process with the same T threads, so that only
    # the serving path differs. (a) the 1-token round trip; (b) whole streamed requests at the
    # fewest clients, paired by prompt (same prompt, same output: the same work).
    fixed = one["probe"]["median_ms"] - single["probe"]["median_ms"]
    low = levels[0]
    a, b = _phase(one, low), _phase(single, low)
    paired = [(x - y) * 1e3 for x, y in zip(a["latencies"], b["latencies"], strict=True)]
    whole = statistics.median(paired)
    tokens = a["generated_tokens"] / a["requests"]
    overhead = {
        "compared": f"{one['setup']['name']} minus {single['setup']['name']}",
        "round_trip_1_token_ms": round(fixed, 2),
        "round_trip_1_token_ms_ray_many_replicas": round(
            many["probe"]["median_ms"] - single["probe"]["median_ms"], 2
        ),
        "whole_request_clients": low,
        "whole_request_tokens_mean": round(tokens, 1),
        "whole_request_paired_median_ms": round(whole, 2),
        "whole_request_p50_difference_ms": round((a["latency_p50"] - b["latency_p50"]) * 1e3, 2),
        "per_streamed_token_ms": round((whole - fixed) / max(tokens - 1, 1), 3),
    }
    return rows, overhead, ray_goals(results, levels, fixed, whole, tokens)


def _ray_row(result: dict[str, Any], level: int, base: dict[str, Any]) -> list[str]:
    """One server at one level, against the single process's phase ``base``."""
    p = _phase(result, level)
    ratio = p["throughput_tokens_per_second"] / base["throughput_tokens_per_second"]
    spread = sorted(p["requests_per_replica"].values(), reverse=True)
    return [
        str(level),
        result["setup"]["label"],
        fmt_number(p["throughput_tokens_per_second"]),
        f"{ratio:.2f}x",
        fmt_number(p["latency_p50"], 3),
        fmt_number(p["latency_p95"], 3),
        fmt_number(p["ttft_p50"], 3),
        "/".join(map(str, spread)) if result["setup"]["ray"] else "-",
        "yes" if p["outputs"] == base["outputs"] else "NO",
    ]


def ray_goals(
    results: list[dict[str, Any]], levels: list[int], fixed: float, whole: float, tokens: float
) -> list[dict[str, Any]]:
    """Issue 15's goals, met or not: ``fixed`` and ``whole`` are the overheads in ms of a
    1-token round trip and of a whole request of ``tokens`` tokens at the fewest clients."""
    single, one, many = results  # ray_setups' order
    low, top = levels[0], levels[-1]
    ratio = (
        _phase(many, top)["throughput_tokens_per_second"]
        / _phase(single, top)["throughput_tokens_per_second"]
    )
    return [
        {
            "goal": f"Ray overhead per request < {OVERHEAD_GOAL_MS:g} ms (1-token round trip, "
            f"{one['setup']['name']} - single)",
            "measured": f"{fixed:.2f} ms",
            "value": round(fixed, 2),
            "met": fixed < OVERHEAD_GOAL_MS,
        },
        {
            "goal": f"Ray overhead per request < {OVERHEAD_GOAL_MS:g} ms (whole streamed "
            f"request of ~{tokens:.0f} tokens at {low} client(s), paired median)",
            "measured": f"{whole:.2f} ms",
            "value": round(whole, 2),
            "met": whole < OVERHEAD_GOAL_MS,
        },
        {
            "goal": f"{many['setup']['label']} >= {THROUGHPUT_GOAL:g}x single-process "
            f"throughput at {top} clients",
            "measured": f"{ratio:.2f}x",
            "value": round(ratio, 3),
            "met": ratio >= THROUGHPUT_GOAL,
        },
    ]


RAY_HEADERS = [
    "clients",
    "server",
    "tok/s",
    "vs single",
    "latency p50 s",
    "p95 s",
    "TTFT p50 s",
    "requests per replica",
    "same output as single",
]


def main_ray(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("ray") is None:
        sys.exit('--ray needs Ray Serve: pip install "specserve[ray]" (make setup installs it)')
    if args.threads < 2:
        sys.exit("--ray compares 1 replica x T threads with T replicas x 1 thread: --threads >= 2")
    levels = sorted(int(c) for c in args.concurrency.split(","))
    args.prompts = args.prompts or RAY_PROMPTS_PER_CLIENT * max(levels)
    prompts = sample_prompts(args.prompts)
    began = time.perf_counter()
    rounds = run_ray_setups(args, [p.text for p in prompts], levels)
    summaries = [ray_summary(results, levels) for results in rounds]
    goals = [dict(g) for g in summaries[0][2]]
    judge_by_round(goals, [each for _, _, each in summaries], value="value")
    shown = _median_round(summaries)
    rows, overhead, _ = summaries[shown]
    results = rounds[shown]
    table = markdown_table(RAY_HEADERS, rows)
    goal_table = markdown_table(
        ["goal (issue 15)", "measured (median round; every round)", "met"],
        [[g["goal"], _measured(g), "met" if g["met"] else "NOT met"] for g in goals],
    )
    print_ray_report(table, overhead, goal_table, results)
    write_json(
        args.out,
        {
            "benchmark": "serving-ray",
            "model": args.model,
            "decoding": "plain (deployment created with --no-speculation), greedy, streaming",
            "client": f"openai {openai.__version__}, one thread per concurrent client",
            "settings": vars(args) | {"out": str(args.out)},
            "prompts": [{"question_id": p.question_id, "category": p.category} for p in prompts],
            "machine": machine_info(args.threads),
            "ray": package_version("ray"),
            "seconds": round(time.perf_counter() - began, 1),
            "shown_round": shown,
            "servers": results,
            "overhead": overhead,
            "goals": goals,
            "table": table,
            "goal_table": goal_table,
            "rounds": [
                {"servers": r, "overhead": o, "goals": g, "table": markdown_table(RAY_HEADERS, t)}
                for r, (t, o, g) in zip(rounds, summaries, strict=True)
            ],
        },
    )


def _median_round(summaries: list[tuple[Any, Any, list[dict[str, Any]]]]) -> int:
    """The round whose throughput goal (the last) has the median value: its table is shown."""
    order = sorted(range(len(summaries)), key=lambda i: summaries[i][2][-1]["value"])
    return order[len(order) // 2]


def _measured(goal: dict[str, Any]) -> str:
    every = goal["rounds"]
    values = ", ".join("-" if v is None else f"{v:g}" for v in every)
    return goal["measured"] + (f" ({values})" if len(every) > 1 else "")


def run_ray_setups(
    args: argparse.Namespace, texts: list[str], levels: list[int]
) -> list[list[dict[str, Any]]]:
    """Each of ray_setups' servers in turn, on its own port, ``--rounds`` times (every other
    round in reverse order), under the --time-limit; each round's results in ray_setups'
    order."""
    interrupts = Interrupts()
    interrupts.install(args.time_limit)
    setups = list(enumerate(ray_setups(args.threads)))
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="specserve-bench-ray-") as work:
            for round_ in range(args.rounds):
                print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
                place = Path(work) / f"round{round_}"
                place.mkdir()
                found: dict[int, dict[str, Any]] = {}
                for i, setup in setups if round_ % 2 == 0 else setups[::-1]:
                    port = args.port + i
                    found[i] = run_setup(setup, port, texts, levels, args, place, interrupts)
                rounds.append([found[i] for i, _ in setups])
    finally:
        interrupts.uninstall()
    return rounds


def print_ray_report(
    table: str, overhead: dict[str, Any], goal_table: str, results: list[dict[str, Any]]
) -> None:
    print()
    print(table)
    print()
    print(
        f"Ray overhead ({overhead['compared']}): 1-token round trip "
        f"{overhead['round_trip_1_token_ms']} ms; whole request at "
        f"{overhead['whole_request_clients']} client(s) "
        f"{overhead['whole_request_paired_median_ms']} ms (paired median), "
        f"{overhead['per_streamed_token_ms']} ms per streamed token"
    )
    print()
    print(goal_table)
    left = sum(r["stop"]["processes_left"] for r in results)
    print(f"\nevery server and Ray process stopped: {'yes' if left == 0 else f'NO ({left} left)'}")
