"""``specserve serve --ray [--address ADDRESS]``: every stored deployment on Ray Serve.

Each stored deployment becomes a Serve application (``specserve-<id>``) of `EngineReplica`
replicas, between its ``min_replicas`` and ``max_replicas``, autoscaled on ongoing requests;
one more application (``specserve``) holds the OpenAI ingress, bound to ``--host:--port``,
and the metrics hub. Each replica asks Ray for ``--threads`` CPUs (default 1), which is
what Ray's scheduler packs onto nodes.

Without ``--address`` a one-machine Ray instance is started (on 127.0.0.1 when serving on
loopback) and stopped on exit; with it, the command joins that cluster and removes only its
own applications on exit. Nothing here is imported unless ``--ray`` is given.
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any

from specserve.deployments.store import Deployment
from specserve.server.app import ServerSettings
from specserve.server.served import EngineOptions

RAY_INSTALL = 'pip install "specserve[ray]"  (from a checkout: make setup)'
PROBE_TIMEOUT_S = 5.0  # how long an --address gets to accept a TCP connection
DEFAULT_RAY_PORT = 6379  # the GCS port `ray start --head` listens on


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


def connect(address: str | None, loopback: bool) -> bool:
    """Join the cluster at ``address``, or start a local one; True when we started it."""
    ray = import_ray()
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ...: nothing was started
            ray.shutdown()
            raise RaySetupError(f"cannot join the Ray cluster at {address}: {exc}") from None
        return False
    # Ray binds to the host's interface address unless told otherwise; loopback stays local.
    ray.init(_node_ip_address="127.0.0.1" if loopback else None, include_dashboard=False)
    return True


def replica_options(
    deployment: Deployment, options: EngineOptions, threads: int, scaling: Scaling
) -> dict[str, Any]:
    """The Serve deployment options of one stored deployment's replicas."""
    r = deployment.replicas
    # A replica takes what its engine can hold (running + queued); more waits at the router.
    most = max(options.max_batch + options.max_queue, math.ceil(r.target))
    found: dict[str, Any] = {
        "name": "EngineReplica",
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
    scaling: Scaling = Scaling(),
) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and run every application; returns when all
    replicas are up (raises if one cannot start, e.g. its model does not load)."""
    from ray import serve

    from specserve.server.ray_ingress import Ingress
    from specserve.server.ray_replica import INGRESS_APP, EngineReplica, MetricsHub, app_name

    check_capacity(deployments, threads)
    serve.start(http_options={"host": host, "port": port})
    relay_only: dict[str, Any] = {"num_cpus": 0}  # they relay; the engines compute
    hub = serve.deployment(name="MetricsHub", ray_actor_options=relay_only)(MetricsHub)
    ingress_class = serve.ingress()(Ingress)
    ingress = serve.deployment(name="Ingress", ray_actor_options=relay_only)(ingress_class)
    # The hub first: replicas report to it as soon as they are up.
    app = ingress.bind(deployments, settings.api_key, settings.max_body_bytes, hub.bind())
    serve.run(app, name=INGRESS_APP, route_prefix="/")
    for d in deployments:
        replica = serve.deployment(**replica_options(d, options, threads, scaling))(EngineReplica)
        serve.run(replica.bind(d, dtype, options, threads), name=app_name(d.id), route_prefix=None)


def undeploy(deployments: list[Deployment], started_cluster: bool) -> None:
    """Remove what `deploy` ran; stop the local cluster if we started it."""
    import ray
    from ray import serve

    from specserve.server.ray_replica import INGRESS_APP, app_name

    if not ray.is_initialized():
        return
    try:
        if started_cluster:
            serve.shutdown()
        else:  # another's cluster: take away only our applications
            for name in [INGRESS_APP, *(app_name(d.id) for d in deployments)]:
                serve.delete(name)
    finally:
        ray.shutdown()


def run_serve_ray(
    args: argparse.Namespace,
    deployments: list[Deployment],
    options: EngineOptions,
    settings: ServerSettings,
    loopback: bool,
) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM), then leave nothing running."""
    import_ray()  # before anything starts: a missing Ray is a message, not a traceback
    threads = args.threads or 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

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
        )
        ids = ", ".join(d.id for d in deployments)
        print(
            f"specserve: serving {ids} on Ray Serve at http://{args.host}:{args.port}/v1",
            file=sys.stderr,
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("specserve: stopping the Ray Serve applications", file=sys.stderr)
        return 0
    finally:
        undeploy(deployments, started)
        signal.signal(signal.SIGTERM, previous)
