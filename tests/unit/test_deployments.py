"""Deployments: the flag rules, vocabulary checks, fallback drafters, the SQLite store, the CLI.

Models are tiny GGUF files with real tokenizers; the catalog gains one honest entry,
"tiny-drafter" (the session's tiny model), as the only family fallback drafter, so the
fallback logic runs on real fingerprints without the real SmolLM2 / Gemma files.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import platformdirs
import pytest

from specserve.deployments import cli
from specserve.deployments import store as store_module
from specserve.deployments.errors import (
    DeploymentError,
    DeploymentExistsError,
    DeploymentNotFoundError,
    StoreVersionError,
)
from specserve.deployments.rules import DrafterFlags, check_drafter_flags, effective_drafter
from specserve.deployments.service import (
    create_deployment,
    ensure_default_deployment,
    natural_id,
    update_deployment,
)
from specserve.deployments.store import SCHEMA_VERSION, DeploymentStore, default_store_path
from specserve.deployments.vocab import family_of_local_model
from specserve.model import catalog
from specserve.model.errors import UnknownModelError
from specserve.model.vocab import VocabularyMismatchError
from tests.paths import REPO_ROOT
from tests.tiny import TinySpec, write_tiny_gguf

ROOT = REPO_ROOT
NGRAM = DrafterFlags(ngram_speculation_length=2, draft_token_count=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> dict[str, Path]:
    """big: the drafter's vocabulary, more layers; other: 7 more tokens; copy: the drafter."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_gguf, root / "copy.gguf")
    return {
        "drafter": tiny_gguf,
        "big": write_tiny_gguf(root / "Big-Model.Q4.gguf", TinySpec(layers=3)),
        "other": write_tiny_gguf(root / "other.gguf", TinySpec(extra_tokens=7)),
        "copy": root / "copy.gguf",
    }


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gguf: Path) -> None:
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    entry = catalog.CatalogEntry("tiny-drafter", "tiny", "-", "tiny test model", lambda: tiny_gguf)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    monkeypatch.setattr(catalog, "FALLBACK_DRAFTERS", {"tiny": "tiny-drafter"})


@pytest.fixture
def store(tmp_path: Path) -> DeploymentStore:
    return DeploymentStore(tmp_path / "nested" / "deployments.db")


# -- the flag rules -------------------------------------------------------------------------

BROKEN = [
    (DrafterFlags("d", 4, 3), "--draft-model and --ngram-speculation-length cannot be used"),
    (DrafterFlags(draft_model="d"), "--draft-token-count is required with --draft-model or"),
    (DrafterFlags(ngram_speculation_length=3), "--draft-token-count is required with"),
    (DrafterFlags(draft_token_count=4), "--draft-token-count needs --draft-model or --ngram"),
    (DrafterFlags(None, 4, 3, True), "--no-speculation cannot be combined with any other"),
    (DrafterFlags(draft_token_count=4, no_speculation=True), "--no-speculation cannot be"),
    (DrafterFlags("d", None, None, True), "--no-speculation cannot be combined"),
    (DrafterFlags(None, 0, 3), "--draft-token-count must be in [1, 32], got 0"),
    (DrafterFlags(None, 33, 3), "--draft-token-count must be in [1, 32], got 33"),
    (DrafterFlags(None, 4, 0), "--ngram-speculation-length must be in [1, 16], got 0"),
    (DrafterFlags(None, 4, 17), "--ngram-speculation-length must be in [1, 16], got 17"),
]


@pytest.mark.parametrize(("flags", "rule"), BROKEN)
def test_each_broken_rule_is_named(flags: DrafterFlags, rule: str) -> None:
    with pytest.raises(DeploymentError) as caught:
        check_drafter_flags(flags)
    assert rule in str(caught.value)
    assert isinstance(caught.value, ValueError)  # the top-level CLI reports ValueErrors


VALID = [DrafterFlags(), DrafterFlags(no_speculation=True), DrafterFlags("d", 32), NGRAM]
VALID += [DrafterFlags(None, 1, 16), DrafterFlags(None, 1, 1)]  # the bounds are inclusive


@pytest.mark.parametrize("flags", VALID)
def test_valid_flags_pass(flags: DrafterFlags) -> None:
    check_drafter_flags(flags)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_catalog_models_get_their_default_drafter(name: str) -> None:
    default = catalog.CATALOG[name].default_drafter
    drafter = effective_drafter(name, DrafterFlags())
    assert drafter.source == "default"
    assert (drafter.method, drafter.draft_token_count) == (default.method, 4) == ("ngram", 4)
    assert drafter.ngram_length == 3
    assert drafter.describe() == "ngram n=3, up to 4 draft tokens (default)"
    assert drafter.short() == "ngram n=3 k<=4 (default)"


def test_the_coder_model_drafts_up_to_16_ngram_tokens_by_default() -> None:
    drafter = effective_drafter("qwen2.5-coder-1.5b-instruct", DrafterFlags())
    assert drafter.describe() == "ngram n=3, up to 16 draft tokens (default)"


def test_no_speculation_is_disabled_and_configured_flags_win() -> None:
    off = effective_drafter("smollm2-135m-instruct", DrafterFlags(no_speculation=True))
    assert (off.method, off.draft_token_count, off.source) == (None, 0, "disabled")
    ngram = effective_drafter("smollm2-135m-instruct", NGRAM)
    assert (ngram.method, ngram.ngram_length, ngram.draft_token_count) == ("ngram", 2, 3)
    assert ngram.source == "configured"
    draft = effective_drafter("x", DrafterFlags("tiny-drafter", 5)).as_dict()
    assert draft["method"] == "draft_model" and draft["source"] == "configured"


# -- vocabulary and fallback drafters -------------------------------------------------------


def test_local_model_of_a_known_family_gets_the_fallback_drafter(models: dict[str, Path]) -> None:
    assert family_of_local_model(models["big"]) == "tiny"
    drafter = effective_drafter(str(models["big"]), DrafterFlags())
    assert (drafter.method, drafter.draft_model) == ("draft_model", "tiny-drafter")
    assert (drafter.draft_token_count, drafter.source) == (4, "fallback")


def test_no_fallback_for_other_vocabularies_or_a_copy_of_the_drafter(
    models: dict[str, Path],
) -> None:
    assert family_of_local_model(models["other"]) is None
    assert family_of_local_model(models["copy"]) == "tiny"  # same tokenizer, but not bigger
    for name in ("other", "copy"):
        drafter = effective_drafter(str(models[name]), DrafterFlags())
        assert (drafter.method, drafter.ngram_length, drafter.source) == ("ngram", 3, "default")


def test_a_missing_local_model_still_lists(tmp_path: Path) -> None:
    drafter = effective_drafter(str(tmp_path / "gone.gguf"), DrafterFlags())
    assert drafter.source == "default"


# -- the service ----------------------------------------------------------------------------


def test_unknown_model_lists_the_catalog(store: DeploymentStore) -> None:
    with pytest.raises(UnknownModelError) as caught:
        create_deployment(store, "no-such-model")
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "no-such-model"):
        assert name in str(caught.value)


def test_rules_are_checked_before_the_model(store: DeploymentStore) -> None:
    with pytest.raises(DeploymentError, match="--draft-token-count needs"):
        create_deployment(store, "no-such-model", DrafterFlags(draft_token_count=4))


def test_mismatched_draft_model_is_refused_at_create(
    store: DeploymentStore, models: dict[str, Path]
) -> None:
    flags = DrafterFlags(str(models["other"]), 4)
    with pytest.raises(VocabularyMismatchError) as caught:
        create_deployment(store, str(models["big"]), flags)
    message = str(caught.value)
    assert "cannot draft for" in message and "vocabularies differ (271 vs 264 tokens)" in message
    assert "a draft model must share the target's tokenizer" in message
    assert store.list() == []


def test_same_vocabulary_drafts_are_accepted_and_paths_made_absolute(
    store: DeploymentStore, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models["big"].parent)
    made = create_deployment(store, models["big"].name, DrafterFlags("copy.gguf", 4))
    assert made.model == str(models["big"]) and made.flags.draft_model == str(models["copy"])
    assert made.id == "big-model.q4"
    by_name = create_deployment(store, models["big"].name, DrafterFlags("tiny-drafter", 2))
    assert by_name.flags.draft_model == "tiny-drafter" and by_name.id.startswith("big-model.q4-")
    assert store.get(made.id) == made and [d.id for d in store.list()] == [made.id, by_name.id]


def test_ids_default_unique_and_validated(store: DeploymentStore) -> None:
    first = create_deployment(store, "tiny-drafter")
    second = create_deployment(store, "tiny-drafter")
    assert first.id == "tiny-drafter" and second.id.startswith("tiny-drafter-")
    assert len(second.id) == len("tiny-drafter-") + 4
    with pytest.raises(DeploymentExistsError, match="already exists"):
        create_deployment(store, "tiny-drafter", id="tiny-drafter")
    for bad in ("Upper", "-dash", "a" * 65, "sp ace", ""):
        with pytest.raises(DeploymentError, match="invalid deployment id"):
            create_deployment(store, "tiny-drafter", id=bad)
    assert natural_id("/m/SmolLM2 360M+Instruct.Q8.gguf") == "smollm2-360m-instruct.q8"


def test_update_replaces_the_drafter_and_rechecks_the_vocabulary(
    store: DeploymentStore, models: dict[str, Path]
) -> None:
    made = create_deployment(store, str(models["big"]), DrafterFlags("tiny-drafter", 4), id="b")
    with pytest.raises(VocabularyMismatchError, match="vocabularies differ"):
        update_deployment(store, "b", DrafterFlags(str(models["other"]), 4))
    with pytest.raises(DeploymentError, match="replaces the whole drafter configuration"):
        update_deployment(store, "b", DrafterFlags(draft_token_count=8))
    assert store.get("b") == made
    changed = update_deployment(store, "b", NGRAM)
    assert changed.flags == NGRAM and changed.effective_drafter().method == "ngram"
    assert changed.created_at == made.created_at < changed.updated_at
    back = update_deployment(store, "b", DrafterFlags())
    assert back.effective_drafter().source == "fallback"
    with pytest.raises(DeploymentNotFoundError, match=r"no deployment 'nope' \(existing.*: b\)"):
        update_deployment(store, "nope", NGRAM)


def test_ensure_default_deployment(
    store: DeploymentStore, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path
) -> None:
    default = catalog.CATALOG[catalog.DEFAULT_MODEL]
    monkeypatch.setitem(catalog.CATALOG, default.name, replace(default, locate=lambda: tiny_gguf))
    made = ensure_default_deployment(store)
    assert (made.id, made.model) == (catalog.DEFAULT_MODEL, catalog.DEFAULT_MODEL)
    assert made.effective_drafter().source == "default"
    assert ensure_default_deployment(store) == made and len(store.list()) == 1


# -- the store ------------------------------------------------------------------------------


def test_store_is_wal_versioned_and_refuses_newer_schemas(store: DeploymentStore) -> None:
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreVersionError, match="schema version 3, newer than"):
        DeploymentStore(store.path)


def test_missing_ids_are_listed(store: DeploymentStore) -> None:
    with pytest.raises(DeploymentNotFoundError, match="existing deployments: none yet"):
        store.get("x")
    create_deployment(store, "tiny-drafter", id="one")
    with pytest.raises(DeploymentNotFoundError, match="existing deployments: one"):
        store.delete("x")
    store.delete("one")
    assert store.list() == []


def test_concurrent_writers(store: DeploymentStore) -> None:
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            DeploymentStore(store.path).create(store_module.Deployment(f"d{i}", "m", NGRAM))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(store.ids()) == [f"d{i}" for i in range(8)]


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_store_path() == tmp_path / "home" / "deployments.db"
    monkeypatch.delenv("SPECSERVE_HOME")
    assert default_store_path() == platformdirs.user_data_path("specserve") / "deployments.db"


# -- the CLI --------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["deployment", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_table_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = str(tmp_path / "cli.db")
    code, out, _ = run_cli(
        capsys, "create", "tiny-drafter", "--id", "t", "--db", db, "--output=json"
    )
    assert code == 0 and json.loads(out)["effective_drafter"]["source"] == "default"
    code, out, _ = run_cli(capsys, "--db", db, "list")  # --db before the subcommand
    assert (
        out.split()[:5] == ["ID", "MODEL", "DRAFTER", "REPLICAS", "CREATED"]
        and "k<=4 (default)" in out
    )
    code, out, _ = run_cli(capsys, "update", "t", "--no-speculation", "--db", db)
    assert "drafter source:   disabled" in out
    code, out, _ = run_cli(capsys, "get", "t", "--db", db, "--output", "json")
    assert json.loads(out)["effective_drafter"] == {
        "method": None,
        "draft_token_count": 0,
        "ngram_length": None,
        "draft_model": None,
        "source": "disabled",
        "description": "none, plain decoding (disabled)",
    }
    code, _, err = run_cli(capsys, "create", "m", "--draft-model", "d", "--db", db)
    assert code == 2 and err.startswith("specserve: error: --draft-token-count is required")
    code, _, err = run_cli(capsys, "update", "t", "--db", db)
    assert code == 2 and "nothing to update" in err
    code, _, err = run_cli(capsys, "update", "t", "--default-drafter", "--no-speculation")
    assert code == 2 and "--default-drafter cannot be combined" in err
    code, out, _ = run_cli(capsys, "update", "t", "--default-drafter", "--db", db)
    assert code == 0 and "configured flags: (none)" in out


def _cli_process(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPECSERVE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "specserve.deployments.cli", "deployment", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_records_persist_across_processes(tmp_path: Path, models: dict[str, Path]) -> None:
    home = tmp_path / "shared-home"
    flags = ["--ngram-speculation-length", "2", "--draft-token-count", "3"]
    made = _cli_process(home, "create", str(models["big"]), *flags, "--output", "json")
    assert made.returncode == 0, made.stderr
    listed = _cli_process(home, "list", "--output", "json")
    (record,) = json.loads(listed.stdout)
    assert record["id"] == "big-model.q4" and record["model"] == str(models["big"])
    assert record["effective_drafter"]["source"] == "configured"
    assert _cli_process(home, "delete", "big-model.q4").returncode == 0
    assert json.loads(_cli_process(home, "list", "--output", "json").stdout) == []
    assert DeploymentStore(home / "deployments.db").list() == []


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, specserve.deployments.cli; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
