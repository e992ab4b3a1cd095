"""``specserve tune``: which speculation setting is fastest on *your* prompts?

Measures plain decoding, the default drafter, n-gram lengths x draft token counts and any
draft models on the prompts given (greedy, interleaved), ranks them with confidence
intervals, recommends one (or none), writes a report with plots, and with ``--apply``
updates the deployment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specserve.deployments.rules import DrafterFlags, EffectiveDrafter, effective_drafter
from specserve.model.loader import DTYPE_CHOICES
from specserve.tune.measure import Candidate

DEFAULT_NGRAM_LENGTHS = "1,2,3,4"
DEFAULT_COUNTS = "1,2,4,8"


def _int_list(text: str, name: str, least: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name}: comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"{name}: integers >= {least}, got {text!r}")
    return sorted(set(values))


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="measure speculation settings on your prompts and recommend one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="MODEL|DEPLOYMENT", help="a deployment id or a model")
    p.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help="JSONL: {'messages': [...]} or {'prompt': '...'}, optional 'prediction' "
        "(the server's --record-traffic log works as is)",
    )
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--candidates",
        help="instead of the grid: comma list of plain, default, ngram:N:K, draft:NAME:K",
    )
    p.add_argument("--ngram-lengths", default=DEFAULT_NGRAM_LENGTHS, help="grid of n-gram n")
    p.add_argument("--draft-token-counts", default=DEFAULT_COUNTS, help="grid of k bounds")
    p.add_argument(
        "--draft-model", action="append", default=[], help="also measure this draft model"
    )
    p.add_argument("--concurrency", default="1,4", help="throughput at these batch sizes")
    p.add_argument("--min-speedup", type=float, default=1.02, help="smallest gain to recommend")
    p.add_argument("--out", type=Path, help="report directory (default: ./tune-<target>-<time>)")
    p.add_argument("--apply", action="store_true", help="update the deployment as recommended")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--db", type=Path, help="deployment database (default: the user data dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")


def _ngram(n: int, k: int, default: bool = False) -> Candidate:
    return Candidate(f"ngram n={n} k<={k}", "ngram", k, ngram_length=n, is_default=default)


def _draft(name: str, k: int, default: bool = False) -> Candidate:
    from specserve.model.catalog import shipped_drafter

    path = shipped_drafter(name) or Path(name)
    kind = "eagle" if (path / "drafter.json").is_file() else "draft"  # a trained head
    label = path.name if path.exists() else name
    return Candidate(
        f"{kind} {label} k<={k}", "draft_model", k, draft_model=name, is_default=default
    )


def _from_drafter(drafter: EffectiveDrafter) -> Candidate | None:
    """The deployment's (or model's default) drafter as a candidate, marked default."""
    if drafter.method == "ngram":
        return _ngram(drafter.ngram_length or 3, drafter.draft_token_count, default=True)
    if drafter.method == "draft_model" and drafter.draft_model:
        return _draft(drafter.draft_model, drafter.draft_token_count, default=True)
    return None


def _listed(text: str, default: Candidate | None) -> list[Candidate]:
    found = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, *rest = item.split(":")
        try:
            if kind == "plain" and not rest:
                continue
            if kind == "default" and not rest:
                found.extend([default] if default else [])
            elif kind == "ngram" and len(rest) == 2:
                found.append(_ngram(int(rest[0]), int(rest[1])))
            elif kind == "draft" and len(rest) == 2:
                found.append(_draft(rest[0], int(rest[1])))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--candidates: cannot read {item!r}; use plain, default, ngram:N:K, draft:NAME:K"
            ) from None
    return found


def build_candidates(
    args: argparse.Namespace, drafter: EffectiveDrafter, model: str = ""
) -> list[Candidate]:
    """Plain, the default (or deployed) drafter, and the grid — or the ``--candidates`` list.
    The grid includes the drafters shipped for a catalog ``model``."""
    from specserve.model.catalog import shipped_drafters_for

    default = _from_drafter(drafter)
    found = [Candidate("plain", None)]
    if args.candidates:
        found += _listed(args.candidates, default)
    else:
        counts = _int_list(args.draft_token_counts, "--draft-token-counts")
        lengths = _int_list(args.ngram_lengths, "--ngram-lengths")
        found += [default] if default else []
        found += [_ngram(n, k) for n in lengths for k in counts]
        drafts = [*args.draft_model, *shipped_drafters_for(model)]
        found += [_draft(name, k) for name in dict.fromkeys(drafts) for k in counts]
    unique: dict[tuple[object, ...], Candidate] = {}
    for c in found:  # the default drafter may also be a grid point: keep one, marked default
        key = (c.method, c.draft_token_count, c.ngram_length, c.draft_model)
        if key not in unique or c.is_default:
            unique[key] = c
    return list(unique.values())


def _resolve_target(args: argparse.Namespace) -> tuple[str, str | None, EffectiveDrafter]:
    """(model, deployment id or None, the drafter it runs with today)."""
    from specserve.deployments.errors import DeploymentNotFoundError
    from specserve.deployments.store import DeploymentStore, default_store_path

    db = args.db or default_store_path()
    if db.exists():
        try:
            deployment = DeploymentStore(db).get(args.target)
            return deployment.model, deployment.id, deployment.effective_drafter()
        except DeploymentNotFoundError:
            pass
    if args.apply:
        raise ValueError(f"--apply needs a deployment id; {args.target!r} is not a deployment")
    return args.target, None, effective_drafter(args.target, DrafterFlags())


def run_tune(args: argparse.Namespace) -> int:
    from specserve.engine.prompt_file import load_prompts
    from specserve.tune.pipeline import TuneOptions, apply_recommendation, run_tuning
    from specserve.tune.report import format_table

    if args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--max-tokens and --limit must be positive integers")
    levels = _int_list(args.concurrency, "--concurrency")
    model_name, deployment_id, drafter = _resolve_target(args)
    options = TuneOptions(
        model=model_name,
        prompts=load_prompts(args.prompts, args.limit),
        candidates=build_candidates(args, drafter, model_name),
        prompts_file=args.prompts,
        concurrency=levels,
        max_tokens=args.max_tokens,
        min_speedup=args.min_speedup,
        seed=args.seed,
        dtype=args.dtype,
        threads=args.threads,
        out=args.out,
        deployment_id=deployment_id,
        current_drafter=drafter.describe(),
    )
    report = run_tuning(options, notify=lambda message: print(message, file=sys.stderr))
    recommendation = report.recommendation
    print(format_table(report.ranked, report.throughput))
    print(f"\nRecommendation: {recommendation.reason}")
    print(f"  flags: {recommendation.flags}")
    for name, path in report.files.items():
        print(f"  {name}: {path}")
    if args.apply and deployment_id is not None:
        updated = apply_recommendation(args.db, deployment_id, recommendation)
        print(f"applied: deployment {updated.id} now runs {updated.effective_drafter().describe()}")
    return 0
