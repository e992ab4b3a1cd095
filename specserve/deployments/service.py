"""The deployment operations the CLI and the server call, with all validation in one place.

Every write goes through here, so a record in the store always passes the flag rules, names
a model that resolved when it was written (a catalog name, or an absolute path) and, if it
has a draft model, one that shares the target's vocabulary.

>>> store = DeploymentStore(Path("/tmp/example.db"))                  # doctest: +SKIP
>>> create_deployment(store, "gemma-3-270m", DrafterFlags(ngram_speculation_length=3,
...     draft_token_count=4)).id                                      # doctest: +SKIP
'gemma-3-270m'
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from specserve.deployments.errors import DeploymentError, DeploymentExistsError
from specserve.deployments.rules import (
    DrafterFlags,
    ReplicaSettings,
    check_drafter_flags,
    check_replicas,
)
from specserve.deployments.store import Deployment, DeploymentStore, check_id
from specserve.deployments.vocab import (
    DRAFTER_MANIFEST,
    check_files_share_vocabulary,
    vocab_size_of,
)
from specserve.model.catalog import CATALOG, DEFAULT_MODEL, resolve

MAX_ID_LENGTH = 64
_SUFFIX_LENGTH = 5  # "-" and 4 hex digits, appended when the natural id is taken
UPDATE_REPLACES = (
    "update replaces the whole drafter configuration: give every drafter flag you want "
    "(e.g. --ngram-speculation-length 3 --draft-token-count 4), or --default-drafter"
)


def canonical_model(name_or_path: str) -> str:
    """A catalog name as is; a local path made absolute, after checking it is a model whose
    tokenizer we can read (unknown names raise `UnknownModelError`, listing the catalog)."""
    path, entry = resolve(name_or_path)
    if entry is not None:
        return entry.name
    if (path / DRAFTER_MANIFEST).is_file():  # a trained drafter: checked against its target
        return str(path.resolve())
    vocab_size_of(path)  # refuses files that are not GGUF / directories without a tokenizer
    return str(path.resolve())


def natural_id(model: str) -> str:
    """The id a deployment of ``model`` gets by default: the catalog name, or the local
    file's stem (directory's name), lower-cased with other characters turned into '-'."""
    if model in CATALOG:
        base = model
    else:
        path = Path(model)
        base = path.name if path.is_dir() else path.stem
    base = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).lstrip("._-")
    return base[: MAX_ID_LENGTH - _SUFFIX_LENGTH] or "model"


def suggest_id(store: DeploymentStore, model: str) -> str:
    """`natural_id`, or ``<it>-<4 hex>`` when a deployment already has it."""
    base = natural_id(model)
    taken = set(store.ids())
    candidate = base
    while candidate in taken:
        candidate = f"{base}-{secrets.token_hex(2)}"
    return candidate


def _canonical_flags(flags: DrafterFlags) -> DrafterFlags:
    if flags.draft_model is None:
        return flags
    return DrafterFlags(
        draft_model=canonical_model(flags.draft_model),
        draft_token_count=flags.draft_token_count,
    )


def create_deployment(
    store: DeploymentStore,
    model: str,
    flags: DrafterFlags | None = None,
    id: str | None = None,
    replicas: ReplicaSettings | None = None,
) -> Deployment:
    """Validate and store a new deployment of ``model`` (catalog name or path).

    Order: flag rules (drafter, then replicas), then the model, then the draft model and its
    vocabulary, then the id, so the first error is about what the user typed first.
    """
    flags = flags or DrafterFlags()
    check_drafter_flags(flags)
    replicas = replicas or ReplicaSettings()
    check_replicas(replicas)
    if id is not None:
        check_id(id)
    target = canonical_model(model)
    flags = _canonical_flags(flags)
    if flags.draft_model is not None:
        check_files_share_vocabulary(target, flags.draft_model)
    return store.create(Deployment(id or suggest_id(store, target), target, flags, replicas))


def update_deployment(
    store: DeploymentStore,
    id: str,
    flags: DrafterFlags | None,
    replicas: ReplicaSettings | None = None,
) -> Deployment:
    """Replace the drafter configuration of deployment ``id`` with ``flags`` and/or its
    replica settings with ``replicas`` (None: keep what is stored).

    Replacing, not merging, keeps every update checkable on its own: switching from a draft
    model to n-gram needs no "--no-draft-model", and ``DrafterFlags()`` returns to the
    model's default drafter. The vocabulary check reruns when the draft model changes.
    """
    current = store.get(id)
    if replicas is not None:
        check_replicas(replicas)
    if flags is None:
        return store.update(id, replicas=replicas)
    try:
        check_drafter_flags(flags)
    except DeploymentError as exc:
        raise DeploymentError(f"{exc}; {UPDATE_REPLACES}") from None
    flags = _canonical_flags(flags)
    if flags.draft_model is not None and flags.draft_model != current.flags.draft_model:
        check_files_share_vocabulary(current.model, flags.draft_model)
    return store.update(id, flags=flags, replicas=replicas)


def delete_deployment(store: DeploymentStore, id: str) -> None:
    store.delete(id)


def ensure_default_deployment(store: DeploymentStore) -> Deployment:
    """The first deployment, creating one of `DEFAULT_MODEL` with its default drafter if the
    store is empty (so `specserve serve` works out of the box)."""
    existing = store.list()
    if existing:
        return existing[0]
    try:
        return create_deployment(store, DEFAULT_MODEL, DrafterFlags(), id=DEFAULT_MODEL)
    except DeploymentExistsError:  # another process created it between our read and write
        return store.list()[0]
