"""Replica counts on deployments: the rules, the schema migration, the CLI.

The migration test writes a database exactly as the previous specserve did (schema version 1,
its own CREATE TABLE) and opens it with this one: the old records must come back unchanged,
with one fixed replica, and the database must take new records.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from specserve.deployments import cli
from specserve.deployments.errors import DeploymentError
from specserve.deployments.rules import DrafterFlags, ReplicaSettings, replica_settings
from specserve.deployments.service import create_deployment, update_deployment
from specserve.deployments.store import MIGRATIONS, SCHEMA_VERSION, DeploymentStore
from specserve.model import catalog


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gguf: Path) -> None:
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    entry = catalog.CatalogEntry("tiny-drafter", "tiny", "-", "tiny test model", lambda: tiny_gguf)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)


BROKEN = [
    ((0, None, None), "--min-replicas must be at least 1, got 0: a deployment with zero"),
    ((1, 0, None), "--max-replicas must be at least 1, got 0"),
    ((3, 2, None), r"--min-replicas \(3\) cannot be greater than --max-replicas \(2\)"),
    ((1, 100_000, None), "--max-replicas must be at most 256"),
    ((1, 2, 0.0), "--target-ongoing-requests must be positive, got 0"),
    ((1, 2, float("nan")), "--target-ongoing-requests must be positive, got nan"),
]


@pytest.mark.parametrize(("given", "message"), BROKEN)
def test_bad_replica_settings_name_the_rule(given: tuple, message: str) -> None:
    with pytest.raises(DeploymentError, match=message):
        replica_settings(*given)


def test_replica_defaults() -> None:
    assert replica_settings(None, None, None) == ReplicaSettings(1, 1, None)
    assert replica_settings(2, None, None) == ReplicaSettings(2, 2, None)  # max follows min
    settings = replica_settings(None, 3, None)
    assert settings.autoscaling and settings.target == 4.0
    assert settings.describe() == "1-3, autoscaling at 4 ongoing requests per replica (default)"
    assert ReplicaSettings(2, 2).describe() == "2 (fixed)"


def _old_database(path: Path) -> None:
    """A deployment database as specserve wrote it before replica counts (schema 1)."""
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO deployments VALUES ('old', 'tiny-drafter', NULL, 3, 2, 0, 10.0, 20.0)"
        )
        conn.execute(
            "INSERT INTO deployments VALUES ('plain', 'tiny-drafter', NULL, NULL, NULL, 1, 11, 11)"
        )


def test_migration_keeps_old_records(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_database(path)
    store = DeploymentStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    old, plain = store.list()
    assert (old.id, old.model, old.created_at, old.updated_at) == ("old", "tiny-drafter", 10, 20)
    assert old.flags == DrafterFlags(draft_token_count=3, ngram_speculation_length=2)
    assert plain.flags == DrafterFlags(no_speculation=True)
    assert old.replicas == plain.replicas == ReplicaSettings(1, 1, None)
    # The migrated database takes new records and replica updates, and reopens cleanly.
    create_deployment(store, "tiny-drafter", id="new", replicas=ReplicaSettings(1, 3, 2.5))
    update_deployment(store, "old", None, ReplicaSettings(2, 2))
    again = {d.id: d for d in DeploymentStore(path).list()}
    assert again["new"].replicas == ReplicaSettings(1, 3, 2.5)
    assert again["old"].replicas == ReplicaSettings(2, 2) and again["old"].flags == old.flags


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["deployment", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_create_get_update_replicas(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = ["--db", str(tmp_path / "cli.db")]
    code, out, err = _cli(capsys, "create", "tiny-drafter", "--id", "t", "--max-replicas", "4", *db)
    assert code == 0, err
    assert "replicas:         1-4, autoscaling at 4 ongoing requests per replica (default)" in out
    code, out, _ = _cli(capsys, "get", "t", "--output", "json", *db)
    assert json.loads(out)["replicas"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": None,
        "autoscaling": True,
    }
    # Replica flags alone keep the drafter; each given flag replaces its field.
    _cli(capsys, "update", "t", "--ngram-speculation-length", "2", "--draft-token-count", "3", *db)
    code, out, _ = _cli(
        capsys, "update", "t", "--min-replicas", "2", "--target-ongoing-requests", "6", *db
    )
    assert code == 0 and "replicas:         2-4, autoscaling at 6 ongoing" in out
    assert "--ngram-speculation-length 2 --draft-token-count 3" in out
    code, out, _ = _cli(capsys, "list", *db)
    assert out.split()[:5] == ["ID", "MODEL", "DRAFTER", "REPLICAS", "CREATED"] and " 2-4 " in out
    # Bad input is refused before anything is stored.
    code, _, err = _cli(capsys, "update", "t", "--min-replicas", "5", *db)
    assert code == 2 and "--min-replicas (5) cannot be greater than --max-replicas (4)" in err
    code, _, err = _cli(capsys, "create", "tiny-drafter", "--id", "z", "--min-replicas", "0", *db)
    assert code == 2 and "zero replicas" in err
    code, _, err = _cli(
        capsys, "create", "tiny-drafter", "--min-replicas", "3", "--max-replicas", "2", *db
    )
    assert code == 2 and "cannot be greater than" in err
    code, out, _ = _cli(capsys, "list", "--output", "json", *db)
    assert [d["id"] for d in json.loads(out)] == ["t"]
