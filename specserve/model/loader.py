"""One call from a model name or path to a ready model: weights, tokenizer, execution format."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.model.builder import FORMATS, build_model
from specserve.model.catalog import CatalogEntry, resolve
from specserve.model.errors import ModelLoadError
from specserve.model.packing import PACKED_TYPES
from specserve.model.qlinear import (
    ISA_ENV,
    kernel_path,
    native_available,
    native_module,
    native_threads,
    set_threads,
)
from specserve.model.tokenizer import Tokenizer
from specserve.model.transformer import CausalLM
from specserve.model.weights import GGUFSource, WeightSource, open_weights

log = logging.getLogger(__name__)

# "auto" picks the format measured fastest here (bench/runtime.py): the native kernels on
# the GGUF blocks on CPU where they were built (else PyTorch's int4 kernel), bfloat16 on
# accelerators.
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *FORMATS)


_compute_threads: int | None = None  # --threads, once a command has set it


def set_compute_threads(threads: int) -> None:
    """``--threads``: how many threads compute a forward.

    PyTorch's pool gets them now; a model loaded in the ``gguf`` format hands them to the
    native kernels instead (``use_native_threads``).
    """
    global _compute_threads
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    _compute_threads = threads
    torch.set_num_threads(threads)


def use_native_threads() -> None:
    """Give the native kernels every compute thread and leave PyTorch's few remaining ops
    (attention, norms) on the calling thread: two pools of spinning threads would fight over
    the same cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    set_threads(_compute_threads or cores or 1)
    torch.set_num_threads(1)


@dataclass
class Model:
    """A loaded model: the network, its tokenizer, and where it came from."""

    name: str
    path: Path
    lm: CausalLM
    tokenizer: Tokenizer
    fmt: str
    entry: CatalogEntry | None

    @property
    def max_context(self) -> int:
        return self.lm.max_len


def resolve_format(fmt: str, device: torch.device) -> str:
    if fmt not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {fmt!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if fmt == AUTO:
        if device.type != "cpu":
            return "bfloat16"
        return "gguf" if native_available() else "int4"
    if fmt in ("int4", "gguf") and device.type != "cpu":
        raise ValueError(f"the {fmt} format runs on the CPU only; use bfloat16 on accelerators")
    if fmt == "gguf":
        native_module()  # a clear error when the extension was not built
    return fmt


def _check_kernels(source: WeightSource, fmt: str, explicit: bool) -> str:
    """The gguf format needs a native kernel for every quantized matrix: asked for by name,
    a type without one is an error naming the file and the type; chosen by auto, the model
    runs in the int4 format instead."""
    missing = source.types_without_kernel() if fmt == "gguf" else {}
    if not missing:
        return fmt
    if not explicit:
        return "int4"
    name, qtype = next(iter(missing.items()))
    raise ModelLoadError(
        f"{source.path}: tensor {name} is stored as {qtype}, which has no native kernel "
        f"(kernels: {', '.join(sorted(t.name for t in PACKED_TYPES))}); "
        "use --dtype int4 or bfloat16 for this file"
    )


def _release_freed_memory() -> None:
    """Hand the loader's freed temporaries back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _report_kernel_path(path: Path) -> None:
    """Which kernel path the gguf format runs on, and a warning when the CPU leaves only the
    portable one: several times slower than the vector paths (docs/runtime.md)."""
    isa = kernel_path()
    log.info("%s: native kernels, %s path, %d threads", path.name, isa, native_threads())
    if isa == "generic" and not os.environ.get(ISA_ENV):
        log.warning(
            "this CPU has neither AVX-512 VNNI nor AVX2 with FMA and F16C (x86), nor the "
            "dot-product instructions (64-bit Arm): the portable C++ kernels run, several "
            "times slower"
        )


def load_model(
    name_or_path: str,
    dtype: str = AUTO,
    max_len: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Model:
    """Load a catalog model (e.g. ``"smollm2-135m-instruct"``) or a GGUF / safetensors path.

    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model.tokenizer.encode("Hello")                       # doctest: +SKIP
    [19556]
    """
    path, entry = resolve(name_or_path)
    fmt = resolve_format(dtype, torch.device(device))
    source = open_weights(path)
    fmt = _check_kernels(source, fmt, explicit=dtype != AUTO)
    if isinstance(source, GGUFSource):
        tokenizer = Tokenizer.from_gguf_metadata(source.metadata, str(path))
    else:
        tokenizer = Tokenizer.from_pretrained_dir(path)
    lm = build_model(source, fmt, max_len=max_len, progress=progress).to(device)
    source.finished()
    if fmt == "gguf":
        use_native_threads()
        _report_kernel_path(path)
    _release_freed_memory()
    name = entry.name if entry else path.name
    return Model(name=name, path=path, lm=lm, tokenizer=tokenizer, fmt=fmt, entry=entry)
