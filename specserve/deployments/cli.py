"""``specserve deployment create|list|get|update|delete``: thin — flags in, service call, print.

Wired into ``specserve.cli`` with `add_deployment_parser` / `run_deployment_command`; also
runnable alone with the same arguments (``python -m specserve.deployments.cli deployment
list``). Importing this module stays cheap: nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from specserve.deployments.rules import SOURCES, DrafterFlags, ReplicaSettings, replica_settings
from specserve.deployments.service import (
    UPDATE_REPLACES,
    create_deployment,
    delete_deployment,
    update_deployment,
)
from specserve.deployments.store import Deployment, DeploymentStore, default_store_path
from specserve.model.catalog import catalog_names
from specserve.model.errors import ModelLoadError

EXIT_USAGE = 2  # like argparse: the user's input was wrong
TABLE_COLUMNS = ("ID", "MODEL", "DRAFTER", "REPLICAS", "CREATED")


def _add_common(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS on the subcommand keeps its default
    # from overwriting a value given before it (`deployment --db X list`).
    parser.add_argument(
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS if on_subcommand else "table",
        help="table (default) for people, json for scripts",
    )
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS if on_subcommand else None,
        help="deployment database (default: $SPECSERVE_HOME/deployments.db, else the user "
        "data dir)",
    )


def _add_drafter_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "speculation (nothing given: the model's default drafter, e.g. n-gram n=3, k<=4)"
    )
    group.add_argument(
        "--draft-model",
        metavar="NAME|PATH",
        help="draft model: catalog name or path; must share the model's tokenizer",
    )
    group.add_argument(
        "--draft-token-count",
        type=int,
        metavar="K",
        help="tokens proposed per step, 1-32 (required with --draft-model or "
        "--ngram-speculation-length; typically 4)",
    )
    group.add_argument(
        "--ngram-speculation-length",
        type=int,
        metavar="N",
        help="prompt-lookup speculation with n-grams of length N, 1-16 (not with --draft-model)",
    )
    group.add_argument(
        "--no-speculation", action="store_true", help="plain decoding: no drafter at all"
    )


def _add_replica_flags(parser: argparse.ArgumentParser, *, on_update: bool) -> None:
    keep = " (default: unchanged)" if on_update else ""
    group = parser.add_argument_group(
        "replicas (used by `specserve serve --ray`; a plain `serve` runs one engine)"
    )
    group.add_argument(
        "--min-replicas",
        type=int,
        metavar="N",
        help=f"replicas always running, at least 1{keep or ' (default: 1)'}",
    )
    group.add_argument(
        "--max-replicas",
        type=int,
        metavar="N",
        help="replicas at most; above --min-replicas Ray Serve autoscales between them"
        + (keep or " (default: --min-replicas)"),
    )
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        metavar="R",
        help="requests per replica the autoscaler aims at"
        + (keep or " (default: 4, half a batch of 8)"),
    )


def add_deployment_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``deployment`` and its subcommands to a ``specserve`` subparsers object."""
    parser = subparsers.add_parser(
        "deployment",
        help="manage deployments (a model plus its speculation settings)",
        description="Deployments are kept in a SQLite file shared by the CLI and the server.",
    )
    _add_common(parser, on_subcommand=False)
    sub = parser.add_subparsers(dest="deployment_command", required=True, metavar="COMMAND")
    catalog = ", ".join(catalog_names())

    create = sub.add_parser("create", help="create a deployment of MODEL")
    create.add_argument("model", metavar="MODEL", help=f"catalog name ({catalog}) or a path")
    create.add_argument("--id", help="deployment id (default: the model name, made unique)")
    _add_drafter_flags(create)
    _add_replica_flags(create, on_update=False)
    sub.add_parser("list", help="list deployments and their effective drafters")
    get = sub.add_parser("get", help="show one deployment and where its drafter comes from")
    get.add_argument("id", metavar="ID")
    update = sub.add_parser(
        "update",
        help="replace a deployment's drafter configuration and/or change its replicas",
        description=f"Change a deployment's drafter. The {UPDATE_REPLACES}, which "
        "forgets the configured drafter and attaches the model's default one again.",
    )
    update.add_argument("id", metavar="ID")
    _add_drafter_flags(update)
    update.add_argument(
        "--default-drafter",
        action="store_true",
        help="forget the configured drafter flags: use the model's default drafter",
    )
    _add_replica_flags(update, on_update=True)
    delete = sub.add_parser("delete", help="delete a deployment")
    delete.add_argument("id", metavar="ID")
    for child in (create, sub.choices["list"], get, update, delete):
        _add_common(child, on_subcommand=True)
    return parser


# -- output -----------------------------------------------------------------------------------


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_table(deployments: Sequence[Deployment]) -> None:
    if not deployments:
        print("no deployments yet; create one with `specserve deployment create MODEL`")
        return
    rows = [
        (
            d.id,
            d.model,
            d.effective_drafter().short(),
            _replicas_short(d.replicas),
            _when(d.created_at),
        )
        for d in deployments
    ]
    widths = [max(len(row[i]) for row in [TABLE_COLUMNS, *rows]) for i in range(len(TABLE_COLUMNS))]
    for row in [TABLE_COLUMNS, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _replicas_short(replicas: ReplicaSettings) -> str:
    low, high = replicas.min_replicas, replicas.max_replicas
    return f"{low}-{high}" if replicas.autoscaling else str(low)


def _print_deployment(deployment: Deployment) -> None:
    drafter = deployment.effective_drafter()
    fields = [
        ("id", deployment.id),
        ("model", deployment.model),
        ("drafter", drafter.describe()),
        ("drafter source", f"{drafter.source}: {SOURCES[drafter.source]}"),
        ("configured flags", deployment.flags.as_cli() or "(none)"),
        ("replicas", deployment.replicas.describe()),
        ("created", _when(deployment.created_at)),
        ("updated", _when(deployment.updated_at)),
    ]
    width = max(len(name) for name, _ in fields) + 2
    for name, value in fields:
        print(f"{name + ':':<{width}}{value}")


def _emit(args: argparse.Namespace, payload: Any, show: Callable[[], None]) -> int:
    if args.output == "json":
        print(json.dumps(payload, indent=2))
    else:
        show()
    return 0


# -- commands ---------------------------------------------------------------------------------


def _flags(args: argparse.Namespace) -> DrafterFlags:
    return DrafterFlags(
        draft_model=args.draft_model,
        draft_token_count=args.draft_token_count,
        ngram_speculation_length=args.ngram_speculation_length,
        no_speculation=args.no_speculation,
    )


def _replica_flags_given(args: argparse.Namespace) -> bool:
    given = (args.min_replicas, args.max_replicas, args.target_ongoing_requests)
    return any(value is not None for value in given)


def _updated_replicas(current: ReplicaSettings, args: argparse.Namespace) -> ReplicaSettings:
    """The stored settings with each given flag replacing its field (checked by the service)."""
    changes = {
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
    }
    return replace(current, **{k: v for k, v in changes.items() if v is not None})


def _create(store: DeploymentStore, args: argparse.Namespace) -> int:
    replicas = replica_settings(args.min_replicas, args.max_replicas, args.target_ongoing_requests)
    made = create_deployment(store, args.model, _flags(args), id=args.id, replicas=replicas)
    return _emit(args, made.as_dict(), lambda: _print_deployment(made))


def _list(store: DeploymentStore, args: argparse.Namespace) -> int:
    found = store.list()
    return _emit(args, [d.as_dict() for d in found], lambda: _print_table(found))


def _get(store: DeploymentStore, args: argparse.Namespace) -> int:
    found = store.get(args.id)
    return _emit(args, found.as_dict(), lambda: _print_deployment(found))


def _update(store: DeploymentStore, args: argparse.Namespace) -> int:
    flags = _flags(args)
    if args.default_drafter and not flags.is_empty():
        raise ValueError("--default-drafter cannot be combined with other speculation flags")
    new_replicas = _replica_flags_given(args)
    if not args.default_drafter and flags.is_empty() and not new_replicas:
        raise ValueError(
            f"nothing to update: {UPDATE_REPLACES}; or give --min-replicas, --max-replicas "
            "or --target-ongoing-requests"
        )
    keep_drafter = flags.is_empty() and not args.default_drafter
    replicas = _updated_replicas(store.get(args.id).replicas, args) if new_replicas else None
    changed = update_deployment(store, args.id, None if keep_drafter else flags, replicas)
    return _emit(args, changed.as_dict(), lambda: _print_deployment(changed))


def _delete(store: DeploymentStore, args: argparse.Namespace) -> int:
    delete_deployment(store, args.id)
    return _emit(args, {"deleted": args.id}, lambda: print(f"deleted deployment {args.id}"))


_COMMANDS: dict[str, Callable[[DeploymentStore, argparse.Namespace], int]] = {
    "create": _create,
    "list": _list,
    "get": _get,
    "update": _update,
    "delete": _delete,
}


def run_deployment_command(args: argparse.Namespace) -> int:
    """Run a parsed ``specserve deployment ...`` command; 0 on success, 2 on a user error
    (printed as ``specserve: error: <message>``)."""
    try:
        store = DeploymentStore(args.db.expanduser() if args.db else default_store_path())
        return _COMMANDS[args.deployment_command](store, args)
    except (ModelLoadError, ValueError, OSError, sqlite3.Error) as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry with the real CLI's arguments: ``deployment list`` etc."""
    parser = argparse.ArgumentParser(prog="specserve")
    add_deployment_parser(parser.add_subparsers(dest="command", required=True))
    return run_deployment_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
