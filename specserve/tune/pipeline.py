"""One tuning run from start to end: measure, rank, recommend, throughput, report files.

`run_tuning` is what ``specserve tune`` runs once its flags name the prompts and the
candidates; it prints nothing but progress bars and returns a `TuneReport`.
`apply_recommendation` then deploys the recommended setting, if asked.

>>> prompts = load_prompts(Path("traffic.jsonl"))  # doctest: +SKIP
>>> plain = Candidate("plain", None)  # doctest: +SKIP
>>> ngram = Candidate("n=3", "ngram", 4, ngram_length=3)  # doctest: +SKIP
>>> options = TuneOptions(MODEL, prompts, [plain, ngram], Path("traffic.jsonl"))  # doctest: +SKIP
>>> report = run_tuning(options)  # doctest: +SKIP
>>> report.recommendation.flags  # if n-gram was reliably faster  # doctest: +SKIP
'--ngram-speculation-length 3 --draft-token-count 4'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specserve.deployments.store import Deployment
    from specserve.engine.prompt_file import PromptRecord
    from specserve.model.loader import Model
    from specserve.tune.measure import Candidate, Measurement, ThroughputPoint
    from specserve.tune.ranking import Ranked, Recommendation


@dataclass(frozen=True)
class TuneOptions:
    """What to measure, on which prompts, and where the report goes."""

    model: str  # catalog name or path of the target
    prompts: Sequence[PromptRecord]
    candidates: Sequence[Candidate]  # plain decoding among them: the baseline
    prompts_file: Path  # where the prompts came from (recorded in the report)
    concurrency: Sequence[int] = (1, 4)  # throughput at these batch sizes
    max_tokens: int = 128
    min_speedup: float = 1.02  # the smallest gain worth recommending
    seed: int = 0  # of the bootstrap intervals
    dtype: str = "auto"
    threads: int | None = None
    out: Path | None = None  # report directory; None: ./tune-<deployment or model>-<time>
    deployment_id: str | None = None  # the deployment tuned, if one was
    current_drafter: str = ""  # how the target drafts today, in words (for the report)


@dataclass(frozen=True)
class TuneReport:
    """The ranking, the recommendation, throughput, and the files written."""

    target: str  # the model's name
    ranked: list[Ranked]  # fastest first
    recommendation: Recommendation
    throughput: list[ThroughputPoint]  # plain, the default drafter and the recommendation
    files: dict[str, Path]  # report.json and the plots, by name


def run_tuning(
    options: TuneOptions, notify: Callable[[str], None] = lambda message: None
) -> TuneReport:
    """Measure every candidate on every prompt, rank them against plain decoding, recommend
    one, measure the throughput of the few that matter, and write the report files.

    ``notify`` hears what is about to be measured, once the target is loaded.
    """
    from specserve.model.loader import load_model, set_compute_threads
    from specserve.tune.ranking import rank, recommend
    from specserve.tune.runner import measure, measure_throughput

    if options.threads is not None:
        set_compute_threads(options.threads)
    model = load_model(options.model, dtype=options.dtype)
    load = _draft_loader(options.dtype)
    prompts, candidates = options.prompts, options.candidates
    notify(
        f"specserve tune: {model.name}, {len(prompts)} prompts x {len(candidates)} candidates, "
        f"up to {options.max_tokens} tokens each (greedy)"
    )
    measurements = measure(model, prompts, candidates, options.max_tokens, load)
    ranked = rank(candidates, measurements, seed=options.seed)
    recommendation = recommend(ranked, options.min_speedup)
    throughput = measure_throughput(
        model,
        prompts,
        _throughput_candidates(candidates, recommendation),
        options.concurrency,
        options.max_tokens,
        load,
    )
    files = _write_files(options, model, measurements, ranked, recommendation, throughput)
    return TuneReport(model.name, ranked, recommendation, throughput, files)


def _draft_loader(dtype: str) -> Callable[[str], Model]:
    """Loads draft models by name, each once."""
    from specserve.model.loader import load_model

    drafts: dict[str, Model] = {}

    def load(name: str) -> Model:
        if name not in drafts:
            drafts[name] = load_model(name, dtype=dtype)
        return drafts[name]

    return load


def _throughput_candidates(
    candidates: Sequence[Candidate], recommendation: Recommendation
) -> list[Candidate]:
    """Plain decoding, the default drafter and the recommended candidate (once each)."""
    picked = {c.name: c for c in candidates if c.is_plain or c.is_default}
    picked[recommendation.candidate.name] = recommendation.candidate
    return list(picked.values())


def _write_files(
    options: TuneOptions,
    model: Model,
    measurements: list[Measurement],
    ranked: list[Ranked],
    recommendation: Recommendation,
    throughput: list[ThroughputPoint],
) -> dict[str, Path]:
    """report.json and the plots, in ``options.out`` or a new directory named for the
    deployment (or model) and the time."""
    import torch

    from specserve.tune.report import write_report

    name = options.deployment_id or model.name
    out = options.out or Path(f"tune-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings: dict[str, Any] = {
        "prompts_file": str(options.prompts_file),
        "prompts": len(options.prompts),
        "max_tokens": options.max_tokens,
        "concurrency": list(options.concurrency),
        "dtype": model.fmt,
        "threads": torch.get_num_threads(),
        "deployment": options.deployment_id,
        "current_drafter": options.current_drafter,
    }
    return write_report(
        out,
        target=model.name,
        settings=settings,
        candidates=options.candidates,
        measurements=measurements,
        ranked=ranked,
        recommendation=recommendation,
        throughput=throughput,
    )


def apply_recommendation(
    db: Path | None, deployment_id: str, recommendation: Recommendation
) -> Deployment:
    """Update the stored deployment (``db``, default: the user's) to the recommended
    drafter flags; the deployment as it now is."""
    from specserve.deployments.service import update_deployment
    from specserve.deployments.store import DeploymentStore, default_store_path

    store = DeploymentStore(db or default_store_path())
    return update_deployment(store, deployment_id, recommendation.candidate.flags())
