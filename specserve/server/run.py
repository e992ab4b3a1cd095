"""``specserve serve``: load the deployments and serve them with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from specserve.model.catalog import DEFAULT_MODEL
from specserve.model.loader import DTYPE_CHOICES, set_compute_threads

if TYPE_CHECKING:
    from specserve.deployments.store import Deployment
    from specserve.server.served import EngineOptions, ServedDeployments

log = logging.getLogger("specserve.serve")
API_KEY_ENV = "SPECSERVE_API_KEY"
# Each item a replica streams through Ray costs ~1 ms of CPU on this 2-core machine
# (bench/serving.py --ray); 20 ms between items is still 50 updates a second to the client.
DEFAULT_STREAM_INTERVAL_MS = 20.0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve every deployment over an OpenAI-compatible HTTP API",
        description="Serve deployments over HTTP (OpenAI API). With no deployment stored, "
        f"the default one ({DEFAULT_MODEL} with its default drafter) is created; "
        "`make run` creates and serves the coder model's instead.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_ENV})",
    )
    p.add_argument("--db", type=Path, help="deployment database (default: the user data dir)")
    p.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="ID",
        help="serve only these deployments (repeatable; default: all)",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="execution format")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per forward (KV slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot")
    p.add_argument(
        "--max-context", type=int, default=4096, help="tokens per sequence (prompt + output)"
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="memory per model for recent prompts' KV: a prompt that starts like a recent "
        "one prefills only the rest (0: off; default %(default)s)",
    )
    p.add_argument(
        "--record-traffic",
        type=Path,
        metavar="FILE",
        help="opt-in: append each request's prompt (not its output) to this JSONL file, "
        "the format `specserve tune --prompts` and drafter training read",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_ray_arguments(p)


def _add_ray_arguments(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group(
        "Ray Serve (optional extra: pip install 'specserve[ray]'; see docs/ray.md)"
    )
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run each deployment's replicas (--min/--max-replicas) on Ray Serve, behind one "
        "endpoint; --threads is then per replica (default 1)",
    )
    ray.add_argument(
        "--address",
        metavar="ADDRESS",
        help="with --ray: join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting one",
    )
    ray.add_argument(
        "--stream-interval-ms",
        type=float,
        metavar="MS",
        help="with --ray: a replica sends a stream's events at most every MS milliseconds "
        "per stream it has open (up to 100 ms), joining those produced in between (each item "
        "Ray carries costs CPU time); a response's first event goes out at once; 0 = every "
        f"event alone (default {DEFAULT_STREAM_INTERVAL_MS:g})",
    )
    ray.add_argument(
        "--ray-proxy",
        choices=["haproxy", "ingress"],
        help="with --ray: what faces the clients. haproxy: a relay of ours, then Ray Serve's "
        "HAProxy, straight to the replicas, which serve the API themselves (one deployment, "
        "on the Ray instance --ray starts); ingress: an OpenAI ingress that routes by model "
        "through Ray (any deployments, any cluster). With either, a replica lost mid-stream "
        "ends its streams with an error event. Default: haproxy where it can serve, else "
        "ingress",
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from specserve.deployments.service import ensure_default_deployment
    from specserve.deployments.store import DeploymentStore, default_store_path
    from specserve.server.app import ServerSettings, create_app
    from specserve.server.served import EngineOptions

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    limits = [("--port", args.port, 1), ("--max-batch", args.max_batch, 1)]
    limits += [("--max-queue", args.max_queue, 0), ("--max-context", args.max_context, 16)]
    limits += [("--prefix-cache-mb", args.prefix_cache_mb, 0)]
    limits += [("--max-body-bytes", args.max_body_bytes, 1024)]
    for name, value, least in limits:
        if value < least:
            kind = "a positive integer" if least == 1 else f"at least {least}"
            raise ValueError(f"{name} must be {kind}, got {value}")
    _check_ray_flags(args)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("serving on %s without an API key: anyone who reaches it can use it", args.host)
    store = DeploymentStore(args.db or default_store_path())
    if args.deployment:  # unknown ids raise, listing the known ones
        chosen = [store.get(i) for i in args.deployment]
    else:
        ensure_default_deployment(store)
        chosen = store.list()
    if args.ray:  # before the models: a missing Ray fails fast
        _prepare_ray(args, chosen)
    for d in chosen:
        log.info("deployment %s: %s, drafter %s", d.id, d.model, d.effective_drafter().describe())
    options = EngineOptions(
        args.max_batch, args.max_queue, args.max_context, prefix_cache_mb=args.prefix_cache_mb
    )
    settings = ServerSettings(args.api_key, args.max_body_bytes, args.record_traffic)
    if args.ray:
        from specserve.server.ray_run import run_serve_ray

        return run_serve_ray(args, chosen, options, settings, _is_loopback(args.host))
    served = _start_compute_thread(chosen, args.dtype, options, args.threads)
    app = create_app(served, settings)
    print(
        f"specserve: serving {', '.join(sorted(served.by_id))} on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _check_ray_flags(args: argparse.Namespace) -> None:
    for flag, value in [("--address", args.address), ("--ray-proxy", args.ray_proxy)]:
        if value and not args.ray:
            raise ValueError(f"{flag} needs --ray")
    interval = args.stream_interval_ms
    if interval is not None and not args.ray:
        raise ValueError("--stream-interval-ms needs --ray (without Ray each event goes out alone)")
    if interval is not None and interval < 0:
        raise ValueError(f"--stream-interval-ms must be >= 0, not {interval:g}")


def _prepare_ray(args: argparse.Namespace, chosen: list[Deployment]) -> None:
    """Choose what faces the clients (``args.ray_proxy``) and import Ray set up for it."""
    from specserve.server.ray_run import choose_proxy, prepare_ray

    args.ray_proxy = choose_proxy(args.ray_proxy, args.address, chosen)
    if args.ray_proxy == "haproxy" and args.stream_interval_ms is not None:
        raise ValueError(
            "--stream-interval-ms applies to --ray-proxy ingress: behind HAProxy each replica "
            "streams every event itself, as the single process does"
        )
    if args.stream_interval_ms is None:
        args.stream_interval_ms = DEFAULT_STREAM_INTERVAL_MS
    most = sum(d.replicas.max_replicas for d in chosen)
    prepare_ray(args.address, args.host, args.port, args.ray_proxy, most)


def _start_compute_thread(
    deployments: list[Deployment], dtype: str, options: EngineOptions, threads: int | None
) -> ServedDeployments:
    """Load the models and run their engines in one thread, the only one running torch.

    OpenMP keeps a thread team per calling thread; loading in one thread and computing in
    another left two teams competing for the cores (steps measured 2-3x slower).
    """

    from specserve.engine.scheduler import run_engines
    from specserve.model.loader import load_model
    from specserve.server.served import load_deployments

    ready = threading.Event()
    outcome: list[ServedDeployments | BaseException] = []

    def compute() -> None:
        try:  # a bad --threads included
            if threads is not None:
                set_compute_threads(threads)
            served = load_deployments(
                deployments, lambda name: load_model(name, dtype=dtype), options, start=False
            )
        except BaseException as exc:  # handed to the main thread, which reports it
            outcome.append(exc)
            ready.set()
            return
        outcome.append(served)
        ready.set()
        run_engines(list(served.engines().values()))

    threading.Thread(target=compute, name="specserve-compute", daemon=True).start()
    ready.wait()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
