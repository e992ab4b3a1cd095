"""Command line: thin — parse flags, call the layers, print."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from specserve.deployments.cli import add_deployment_parser, run_deployment_command
from specserve.drafters.cli import add_drafter_parser, run_drafter_command
from specserve.model.catalog import CATALOG, DEFAULT_MODEL
from specserve.model.errors import ModelLoadError
from specserve.model.loader import DTYPE_CHOICES, set_compute_threads
from specserve.server.run import add_serve_parser, run_serve
from specserve.tune.cli import add_tune_parser, run_tune

if TYPE_CHECKING:  # the annotation only; commands import the engine when they run
    from specserve.engine.result import GenerationResult
    from specserve.model.loader import Model
    from specserve.speculative.config import SpeculationConfig
    from specserve.speculative.sampling import SamplingParams


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text once and print speed statistics")
    p.add_argument("model", help=f"catalog name ({', '.join(sorted(CATALOG))}) or a path")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="execution format; auto = native kernels on the GGUF blocks on CPU (else int4)",
    )
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all)")
    g = p.add_argument_group("speculation (default: the model's default drafter)")
    g.add_argument("--draft-model", help="draft model name or path (same vocabulary)")
    g.add_argument(
        "--draft-token-count",
        type=int,
        help="tokens proposed per step (the upper bound of the self-tuned length)",
    )
    g.add_argument(
        "--ngram-speculation-length", type=int, help="n-gram length for prompt-lookup speculation"
    )
    g.add_argument("--prediction-file", help="Predicted Outputs: a file with the expected text")
    g.add_argument("--no-speculation", action="store_true", help="plain decoding (baseline)")
    g.add_argument(
        "--fixed-length",
        action="store_true",
        help="always propose --draft-token-count tokens (no self-tuning)",
    )


def speculation_from_flags(args: argparse.Namespace, target: Model) -> SpeculationConfig:
    """The product's flag rules (`check_drafter_flags`) and the drafter they amount to: with
    no flags, the model's default drafter (or its family's fallback), as a deployment gets."""
    from specserve.deployments.rules import DrafterFlags, check_drafter_flags, effective_drafter
    from specserve.model.loader import load_model
    from specserve.speculative.config import speculation_for_drafter

    flags = DrafterFlags(
        args.draft_model, args.draft_token_count, args.ngram_speculation_length, args.no_speculation
    )
    check_drafter_flags(flags)
    drafter = effective_drafter(args.model, flags)
    return speculation_for_drafter(
        **drafter.fields(),
        target=target,
        load=lambda name: load_model(name, dtype=args.dtype),
        adaptive=not args.fixed_length,
    )


DESCRIPTION = (
    "A self-hosted LLM server with lossless speculative decoding (draft models, n-grams, "
    "Predicted Outputs) behind an OpenAI-compatible API. `specserve serve` serves the "
    "stored deployments; `specserve generate MODEL --prompt TEXT` tries a model once."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    add_serve_parser(sub)
    add_deployment_parser(sub)
    add_tune_parser(sub)
    add_drafter_parser(sub)
    sub.add_parser("models", help="list the model catalog")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from specserve.engine.generate import generate
    from specserve.model.loader import load_model

    if args.threads is not None:
        set_compute_threads(args.threads)
    params = _sampling_params(args)
    model = load_model(args.model, dtype=args.dtype)
    speculation = speculation_from_flags(args, model)
    prompt_ids, prediction = _prompt_and_prediction(args, model)
    result = generate(
        model,
        prompt_ids,
        params,
        speculation=speculation,
        prediction_ids=prediction,
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    print()
    _print_generation_stats(model, result)
    return 0


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from specserve.speculative.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )


def _prompt_and_prediction(
    args: argparse.Namespace, model: Model
) -> tuple[list[int], list[int] | None]:
    """The prompt's token ids (chat-templated unless --raw) and the --prediction-file's."""
    tok = model.tokenizer
    prediction = None
    if args.prediction_file:
        with open(args.prediction_file, encoding="utf-8") as handle:
            prediction = tok.encode(handle.read(), add_special_tokens=False)
    if args.raw:
        prompt_ids = tok.encode(args.prompt)
    else:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    return prompt_ids, prediction


def _format_label(model: Model) -> str:
    """The weights' format, and for gguf the kernel path that runs it (``gguf, avx2 kernels``)."""
    if model.fmt != "gguf":
        return model.fmt
    from specserve.model.qlinear import kernel_path

    return f"gguf, {kernel_path()} kernels"


def _print_generation_stats(model: Model, result: GenerationResult) -> None:
    """Speed and speculation statistics of one generation, on stderr."""
    print(
        f"[{model.name} {_format_label(model)}] prompt {result.prompt_tokens} tokens, "
        f"generated {len(result.token_ids)} ({result.finish_reason}), "
        f"time to first token {result.time_to_first_token * 1000:.0f} ms, "
        f"decode {result.decode_tokens_per_second:.1f} tok/s",
        file=sys.stderr,
    )
    stats = result.stats
    print(
        f"speculation: {stats.tokens_per_step:.2f} tokens per target step, "
        f"{stats.accepted}/{stats.proposed} drafts accepted",
        file=sys.stderr,
    )
    for method, m in stats.by_method.items():
        per_position = ", ".join(f"{a:.2f}" for a in m.as_dict()["acceptance_per_position"])
        print(
            f"  {method}: {m.steps} steps, mean accepted length "
            f"{m.mean_accepted_length:.2f}, acceptance per position [{per_position}]",
            file=sys.stderr,
        )
    if result.prediction is not None:
        print(
            f"  prediction tokens: {result.prediction.accepted_prediction_tokens} accepted, "
            f"{result.prediction.rejected_prediction_tokens} rejected",
            file=sys.stderr,
        )


def _models() -> int:
    for name in sorted(CATALOG):
        entry = CATALOG[name]
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{mark}\n    {entry.description}\n    package: {entry.package}")
        print(f"    weights: {entry.status()}")
    from specserve.model.qlinear import kernels_summary

    print(f"\nkernels: {kernels_summary()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specserve.speculative.sampling import InvalidRequestError

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "deployment":
            return run_deployment_command(args)
        if args.command == "tune":
            return run_tune(args)
        if args.command == "drafter":
            return run_drafter_command(args)
        return _models()
    except (ModelLoadError, InvalidRequestError, ValueError, OSError) as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 2
