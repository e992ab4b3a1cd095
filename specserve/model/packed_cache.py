"""Packed GGUF weights kept on disk, so that a model's later starts skip the packing.

Packing (``packing.py``) re-arranges each quantized tensor of a GGUF file into the kernels'
tile layout: about 9 of the 12 s that loading the 1.5B coder model takes on 2 cores, at
every start. The first load of a GGUF file of at least `CACHE_MIN_BYTES` writes the packed
arrays to one safetensors file in ``data_dir()/packed/``; later loads read that file instead
of packing (through safetensors' memory map, each tensor copied into memory that numpy backs
with transparent huge pages: weights left as mapped file pages decoded ~10% slower, the
matmuls streaming all of them at every step).

The file's name carries a digest of the GGUF file's path, size and modification time and of
the source of the code that packs (``packing.py``, ``weights.py``): a changed model or
packing code gets a new file, never a stale layout. A cache file that cannot be used (cut
short, not safetensors, a tensor of the wrong shape) is deleted and the weights packed
again; one that cannot be written (disk full, read-only directory) is skipped with a
warning. Either way the model loads. ``SPECSERVE_PACKED_CACHE=0`` turns the cache off.

Each file records the GGUF file it was packed from. Writing one deletes the caches that can
no longer be used: the older ones of the same GGUF file, those whose GGUF file is gone (a
removed virtual environment or download) and those of an older cache format.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from specserve.model import packing
from specserve.model.fetch import data_dir
from specserve.model.packing import Packed, packed_shapes

logger = logging.getLogger(__name__)

CACHE_ENV = "SPECSERVE_PACKED_CACHE"  # "0" (or "off", "false", "no"): never read nor write
CACHE_MIN_BYTES = 64 << 20  # smaller GGUF files pack in about a second: not worth the disk
FORMAT = "specserve-packed-2"  # the cache file's own format, in its metadata (2: "source")


def enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    return data_dir() / "packed"


def _code_digest() -> str:
    """sha256 over the source of the code that decides the packed layout."""
    digest = hashlib.sha256()
    for path in (Path(packing.__file__), Path(__file__).with_name("weights.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_path(gguf: Path) -> Path | None:
    """Where the packed form of ``gguf`` lives, or None when it is not cached."""
    if not enabled():
        return None
    stat = gguf.stat()
    if stat.st_size < CACHE_MIN_BYTES:
        return None
    where = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:8]
    what = hashlib.sha256(
        f"{stat.st_size}:{stat.st_mtime_ns}:{_code_digest()}:{FORMAT}".encode()
    ).hexdigest()[:16]
    return cache_dir() / f"{gguf.stem}-{where}-{what}.safetensors"


class CacheFileError(Exception):
    """A cache file that cannot be used as it is."""


class PackedCache:
    """The packed tensors of one GGUF file: those found in its cache file (`get`), and
    those packed during this load (`put`), written by `save` when any were."""

    def __init__(self, path: Path, source: Path) -> None:
        self.path = path
        self.source = source.resolve()  # the GGUF file
        self._found: dict[str, Packed] | None = None  # read at the first `get`
        self._packed: dict[str, Packed] = {}

    def _load(self) -> dict[str, Packed]:
        if not self.path.exists():
            return {}
        try:
            return _read(self.path)
        except CacheFileError as exc:
            logger.warning("%s: %s; packing the weights again", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return {}

    @classmethod
    def for_gguf(cls, gguf: Path) -> PackedCache | None:
        path = cache_path(gguf)
        return cls(path, gguf) if path is not None else None

    def get(self, name: str) -> Packed | None:
        if self._found is None:
            self._found = self._load()
        return self._found.get(name)

    def put(self, name: str, packed: Packed) -> None:
        self._packed[name] = packed

    def save(self) -> None:
        """Write every packed tensor to the cache file if this load packed any: atomically
        (a file appears whole or not at all), replacing older caches of the same GGUF path."""
        if not self._packed:
            return
        everything = {**(self._found or {}), **self._packed}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write(self.path, everything, self.source)
        except OSError as exc:
            logger.warning("cannot write the packed-weights cache %s (%s)", self.path, exc)
            return
        size = self.path.stat().st_size / 2**20
        logger.info("packed weights cached in %s (%.0f MiB)", self.path, size)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Delete the other cache files that no load can use any more: those of this GGUF
        file, of a GGUF file that is gone, or of another format (none recorded)."""
        for other in self.path.parent.glob("*.safetensors"):
            if other == self.path:
                continue
            source = _recorded_source(other)
            if source is None or source == str(self.source) or not Path(source).exists():
                logger.info("removing the stale packed-weights cache %s", other)
                with contextlib.suppress(OSError):
                    other.unlink()


def _write(path: Path, tensors: dict[str, Packed], source: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, list[int]] = {}
    for name, p in tensors.items():
        layout[name] = [p.mode, p.qbits, p.rows, p.cols]
        arrays[f"{name}.q"] = np.ascontiguousarray(p.q)
        arrays[f"{name}.s"] = np.ascontiguousarray(p.s)
        if p.d.size:
            arrays[f"{name}.d"] = np.ascontiguousarray(p.d)
    metadata = {"format": FORMAT, "layout": json.dumps(layout), "source": str(source)}
    fd, temp = tempfile.mkstemp(prefix=".packing-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, temp, metadata=metadata)
        os.chmod(temp, 0o644)  # mkstemp's 0600 would hide it from other users' servers
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _recorded_source(path: Path) -> str | None:
    """The GGUF path a cache file of this format records, or None (another format, or not
    readable as a cache file at all)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # safetensors' errors have no common base
        return None
    return metadata.get("source") if metadata.get("format") == FORMAT else None


def _read(path: Path) -> dict[str, Packed]:
    """Every tensor of a cache file, read through a memory map."""
    try:
        handle = safe_open(str(path), framework="pt")
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CacheFileError(f"not a {FORMAT} file")
        layout = json.loads(metadata["layout"])
        return {name: _tensor(handle, name, *codes) for name, codes in layout.items()}
    except CacheFileError:
        raise
    except Exception as exc:  # safetensors' errors have no common base; a bad header, say
        raise CacheFileError(f"unreadable ({type(exc).__name__}: {exc})") from None


def _tensor(handle: object, name: str, mode: int, qbits: int, rows: int, cols: int) -> Packed:
    q_shape, s_shape, d_shape = packed_shapes(mode, qbits, rows, cols)

    def get(key: str) -> np.ndarray:
        # Copied out of the mapping: numpy backs large arrays with transparent huge pages,
        # which file pages do not get, and the matmuls stream every weight each step (mapped
        # weights decoded ~10% slower on the 1.5B). The mapped pages are then let go.
        mapped = handle.get_tensor(key)  # type: ignore[attr-defined]
        array = np.array(mapped.numpy())
        _forget_pages(mapped.data_ptr(), mapped.nbytes)
        return array

    q, s = get(f"{name}.q"), get(f"{name}.s")
    d = get(f"{name}.d") if d_shape != (0,) else np.zeros(0, np.float16)
    wanted = ((q, q_shape, np.uint8), (s, s_shape, np.uint8), (d, d_shape, np.float16))
    for array, shape, dtype in wanted:
        if array.shape != shape or array.dtype != dtype:
            raise CacheFileError(f"tensor {name} has shape {array.shape}, not {shape}")
    return Packed(mode, qbits, rows, cols, q, s, d)


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _forget_pages(address: int, size: int) -> None:
    """Drop the whole pages of ``[address, address + size)`` from this process's mapping (a
    private file mapping: they stay in the page cache). Only keeps a load's peak memory near
    the copied weights; nothing is lost where it fails."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + size) // _PAGE * _PAGE
    if end > start and _libc is not None:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not a POSIX C library: the pages go with the mapping instead
    _libc = None
