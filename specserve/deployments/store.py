"""Deployment records in SQLite: one file, safe for several processes at once.

Why SQLite: the CLI writes records while a server reads them, possibly in other processes.
WAL mode lets readers proceed during a write, ``timeout`` makes a writer wait for another's
lock instead of failing, and each operation runs in its own short transaction on its own
connection (so a store object may be shared between threads).

The schema is versioned with ``PRAGMA user_version``: `MIGRATIONS[i]` takes the database
from version i to i + 1. A database from a newer specserve is refused rather than guessed at.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from specserve.deployments.errors import (
    DeploymentError,
    DeploymentExistsError,
    DeploymentNotFoundError,
    StoreVersionError,
)
from specserve.deployments.rules import (
    DrafterFlags,
    EffectiveDrafter,
    ReplicaSettings,
    effective_drafter,
)
from specserve.model.fetch import data_dir

MIGRATIONS: list[str] = [
    """
    CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        draft_model TEXT,
        draft_token_count INTEGER,
        ngram_speculation_length INTEGER,
        no_speculation INTEGER NOT NULL,
        created_at REAL,
        updated_at REAL
    );
    """,
    # 2: replica counts for `serve --ray`; old records get one fixed replica.
    """
    ALTER TABLE deployments ADD COLUMN min_replicas INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE deployments ADD COLUMN max_replicas INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE deployments ADD COLUMN target_ongoing_requests REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 10.0  # how long one process waits for another's write lock
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_COLUMNS = (
    "id, model, draft_model, draft_token_count, ngram_speculation_length, no_speculation, "
    "min_replicas, max_replicas, target_ongoing_requests"
)
_TIMES = "created_at, updated_at"
_PLACEHOLDERS = ", ".join("?" * 11)  # one per column above


def default_store_path() -> Path:
    """``$SPECSERVE_HOME/deployments.db``, else the platform's user data dir (e.g.
    ``~/.local/share/specserve/deployments.db`` on Linux)."""
    return data_dir() / "deployments.db"


def check_id(deployment_id: str) -> None:
    """Ids appear in URLs and shell commands, so they are short, lower case and plain."""
    if not ID_PATTERN.fullmatch(deployment_id):
        raise DeploymentError(
            f"invalid deployment id {deployment_id!r}: use 1-64 characters of a-z, 0-9, '.', "
            "'_' and '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class Deployment:
    """A model plus the speculation flags its user gave (the effective drafter is derived)."""

    id: str
    model: str  # a catalog name or an absolute path
    flags: DrafterFlags = field(default_factory=DrafterFlags)
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)
    created_at: float = 0.0  # seconds since the epoch; set by the store
    updated_at: float = 0.0

    def effective_drafter(self) -> EffectiveDrafter:
        return effective_drafter(self.model, self.flags)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record: the flags as given, and the drafter they amount to."""
        flags = self.flags
        return {
            "id": self.id,
            "model": self.model,
            "draft_model": flags.draft_model,
            "draft_token_count": flags.draft_token_count,
            "ngram_speculation_length": flags.ngram_speculation_length,
            "no_speculation": flags.no_speculation,
            "effective_drafter": self.effective_drafter().as_dict(),
            "replicas": self.replicas.as_dict(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _row_to_deployment(row: sqlite3.Row) -> Deployment:
    flags = DrafterFlags(
        draft_model=row["draft_model"],
        draft_token_count=row["draft_token_count"],
        ngram_speculation_length=row["ngram_speculation_length"],
        no_speculation=bool(row["no_speculation"]),
    )
    replicas = ReplicaSettings(
        row["min_replicas"], row["max_replicas"], row["target_ongoing_requests"]
    )
    return Deployment(
        row["id"], row["model"], flags, replicas, row["created_at"], row["updated_at"]
    )


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (``executescript`` would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()!r}")


class DeploymentStore:
    """CRUD over the ``deployments`` table of the SQLite file at ``path`` (created if new)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            self._migrate(conn)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see `_transaction`).
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock up front, so a read-then-write
        (check the id, then insert) cannot interleave with another process's."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{self.path}: deployment database has schema version {version}, newer "
                    f"than this specserve knows ({SCHEMA_VERSION}); upgrade specserve, or "
                    "use another database with --db or SPECSERVE_HOME"
                )
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")  # pragmas take no parameters
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- reads -----------------------------------------------------------------------------

    def list(self) -> list[Deployment]:
        """Every deployment, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, {_TIMES} FROM deployments ORDER BY created_at, rowid"
            ).fetchall()
        return [_row_to_deployment(row) for row in rows]

    def ids(self) -> builtins.list[str]:
        return [d.id for d in self.list()]

    def get(self, deployment_id: str) -> Deployment:
        with self._connect() as conn:
            return self._get(conn, deployment_id)

    def _get(self, conn: sqlite3.Connection, deployment_id: str) -> Deployment:
        row = conn.execute(
            f"SELECT {_COLUMNS}, {_TIMES} FROM deployments WHERE id = ?", (deployment_id,)
        ).fetchone()
        if row is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM deployments ORDER BY created_at")]
            existing = ", ".join(ids) if ids else "none yet"
            raise DeploymentNotFoundError(
                f"no deployment {deployment_id!r} (existing deployments: {existing})"
            )
        return _row_to_deployment(row)

    # -- writes ----------------------------------------------------------------------------

    def create(self, deployment: Deployment) -> Deployment:
        """Insert ``deployment``; its timestamps are set now. The id must be new."""
        check_id(deployment.id)
        now = time.time()
        stored = replace(deployment, created_at=now, updated_at=now)
        flags, replicas = stored.flags, stored.replicas
        with self._transaction() as conn:
            try:
                conn.execute(
                    f"INSERT INTO deployments ({_COLUMNS}, {_TIMES}) VALUES ({_PLACEHOLDERS})",
                    (
                        stored.id,
                        stored.model,
                        flags.draft_model,
                        flags.draft_token_count,
                        flags.ngram_speculation_length,
                        int(flags.no_speculation),
                        replicas.min_replicas,
                        replicas.max_replicas,
                        replicas.target_ongoing_requests,
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise DeploymentExistsError(
                    f"a deployment with id {stored.id!r} already exists; choose another --id, "
                    "or change it with `specserve deployment update`"
                ) from None
        return stored

    def update(
        self,
        deployment_id: str,
        *,
        model: str | None = None,
        flags: DrafterFlags | None = None,
        replicas: ReplicaSettings | None = None,
    ) -> Deployment:
        """Replace the model, the whole drafter configuration and/or the replica settings of
        one deployment (None: keep)."""
        with self._transaction() as conn:
            current = self._get(conn, deployment_id)
            new = replace(
                current,
                model=current.model if model is None else model,
                flags=current.flags if flags is None else flags,
                replicas=current.replicas if replicas is None else replicas,
                updated_at=time.time(),
            )
            conn.execute(
                "UPDATE deployments SET model = ?, draft_model = ?, draft_token_count = ?, "
                "ngram_speculation_length = ?, no_speculation = ?, min_replicas = ?, "
                "max_replicas = ?, target_ongoing_requests = ?, updated_at = ? WHERE id = ?",
                (
                    new.model,
                    new.flags.draft_model,
                    new.flags.draft_token_count,
                    new.flags.ngram_speculation_length,
                    int(new.flags.no_speculation),
                    new.replicas.min_replicas,
                    new.replicas.max_replicas,
                    new.replicas.target_ongoing_requests,
                    new.updated_at,
                    deployment_id,
                ),
            )
        return new

    def delete(self, deployment_id: str) -> None:
        with self._transaction() as conn:
            self._get(conn, deployment_id)  # raises, listing the ids that exist
            conn.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))
