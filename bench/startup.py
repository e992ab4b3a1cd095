"""Start-up: how long a model takes to load and a server to answer, and what memory it holds.

Each figure comes from a fresh process, as a user's command would start (Python, imports
and all), medians of ``--repeats``:

- ``load, no cache``: `load_model` with ``SPECSERVE_PACKED_CACHE=0``, which packs every
  quantized tensor (every start before the packed-weights cache existed);
- ``load, first``: the first load with the cache, which packs and then writes it;
- ``load, cached``: a later load, which reads the cache file instead of packing;
- ``serve``: `specserve serve` with one deployment of the model, without the cache and
  with it: seconds until ``/health`` answers, and the server's resident memory then and
  after one short request.

The data directory is a temporary one whose ``models`` is a link to the real one, so the
user's own cache is never read nor removed.

    python -m bench.startup --out bench/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO_ROOT, machine_info, markdown_table, write_json
from bench.serving_procs import port_is_free, stop_server, tail, wait_ready
from specserve.model.fetch import data_dir

MODELS = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
HEADERS = [
    "model",
    "load, no cache (s)",
    "load, first (s)",
    "load, cached (s)",
    "peak RSS no cache / cached (MB)",
    "serve ready, no cache / cached (s)",
    "server RSS at ready / after a request, cached (MB)",
]


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process from /proc: total, anonymous, file-backed; and peak."""
    wanted = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "VmHWM": "peak_mb"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[wanted[key]] = round(int(value.split()[0]) / 1024, 1)
    return found


def worker(model: str) -> None:
    """One load in this process; prints its figures as JSON."""
    began = time.perf_counter()
    from specserve.model.loader import load_model

    imported = time.perf_counter()
    load_model(model, progress=False)
    done = time.perf_counter()
    figures = {"import_s": round(imported - began, 2), "load_s": round(done - imported, 2)}
    print(json.dumps(figures | memory_mb()))


def one_load(model: str, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.startup", "--worker", model]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loading {model} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def loads(model: str, env: dict[str, str], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Loads without the cache, the first with it (a fresh cache directory each time), and
    later ones."""
    runs: dict[str, list[dict[str, Any]]] = {"no_cache": [], "first": [], "cached": []}
    cache = Path(env["SPECSERVE_HOME"]) / "packed"
    for _ in range(repeats):
        runs["no_cache"].append(one_load(model, env | {"SPECSERVE_PACKED_CACHE": "0"}))
        shutil.rmtree(cache, ignore_errors=True)
        runs["first"].append(one_load(model, env))
        runs["cached"].append(one_load(model, env))
    return runs


def serve(model: str, env: dict[str, str], port: int, work: Path) -> dict[str, Any]:
    """`specserve serve` of one deployment of ``model``: seconds to ready and memory."""
    if not port_is_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; choose another --port")
    cli = [sys.executable, "-m", "specserve"]
    subprocess.run([*cli, "deployment", "create", model, "--id", "startup"], env=env, check=True,
                   capture_output=True, cwd=REPO_ROOT)  # fmt: skip
    log = work / "serve.log"
    command = [*cli, "serve", "--deployment", "startup", "--host", "127.0.0.1", "--port", str(port)]
    began = time.perf_counter()
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=out, stderr=out,
                                  start_new_session=True)  # fmt: skip
    try:
        wait_ready(server, port, "startup", 0, poll_s=0.05)
        figures: dict[str, Any] = {"ready_s": round(time.perf_counter() - began, 2)}
        figures["at_ready"] = memory_mb(server.pid)
        messages = [{"role": "user", "content": "Hi"}]
        body = {"model": "startup", "max_tokens": 8, "messages": messages}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        httpx.post(url, json=body, timeout=120).raise_for_status()
        figures["after_request"] = memory_mb(server.pid)
        return figures
    except BaseException:
        print(f"--- the server's log, last lines ---\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        stop_server(server, work)
        subprocess.run([*cli, "deployment", "delete", "startup"], env=env, capture_output=True)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def summary_row(model: str, result: dict[str, Any]) -> list[object]:
    runs, served, uncached = result["loads"], result["serve"], result["serve_no_cache"]
    return [
        model,
        median(runs["no_cache"], "load_s"),
        median(runs["first"], "load_s"),
        median(runs["cached"], "load_s"),
        f"{median(runs['no_cache'], 'peak_mb'):.0f} / {median(runs['cached'], 'peak_mb'):.0f}",
        f"{uncached['ready_s']} / {served['ready_s']}",
        f"{served['at_ready']['rss_mb']:.0f} / {served['after_request']['rss_mb']:.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8781)
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="specserve-startup-") as temp:
        home = Path(temp)
        (data_dir() / "models").mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(data_dir() / "models")
        env = {k: v for k, v in os.environ.items() if k != "SPECSERVE_PACKED_CACHE"}
        env["SPECSERVE_HOME"] = str(home)
        for model in args.models.split(","):
            print(f"== {model}", flush=True)
            result = {"loads": loads(model, env, args.repeats)}
            no_cache = env | {"SPECSERVE_PACKED_CACHE": "0"}
            result["serve_no_cache"] = serve(model, no_cache, args.port, home)
            result["serve"] = serve(model, env, args.port, home)
            results[model] = result
            print(markdown_table(HEADERS, [summary_row(model, result)]), flush=True)
    table = markdown_table(HEADERS, [summary_row(m, r) for m, r in results.items()])
    print(table)
    payload = {"benchmark": "startup", "machine": machine_info(threads=os.cpu_count() or 1)}
    payload |= {"settings": {"repeats": args.repeats}, "table": table, "results": results}
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
