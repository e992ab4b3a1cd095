"""Command line: thin — parse flags, call the layers, print."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from specserve.model.catalog import CATALOG, DEFAULT_MODEL
from specserve.model.errors import ModelLoadError
from specserve.model.loader import DTYPE_CHOICES


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
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="execution format; auto = int4 for 4-bit GGUF weights on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("models", help="list the model catalog")
    return parser


def _generate(args: argparse.Namespace) -> int:
    import torch

    from specserve.engine.generate import generate
    from specserve.engine.sampling import SamplingParams
    from specserve.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens,
                            stop=tuple(args.stop))
    model = load_model(args.model, dtype=args.dtype)
    tok = model.tokenizer
    if args.raw:
        prompt_ids = tok.encode(args.prompt)
    else:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    result = generate(model, prompt_ids, params,
                      on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(
        f"[{model.name} {model.fmt}] prompt {result.prompt_tokens} tokens, "
        f"generated {len(result.token_ids)} ({result.finish_reason}), "
        f"time to first token {result.time_to_first_token * 1000:.0f} ms, "
        f"decode {result.decode_tokens_per_second:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def _models() -> int:
    for name in sorted(CATALOG):
        entry = CATALOG[name]
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{mark}\n    {entry.description}\n    package: {entry.package}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specserve.engine.sampling import InvalidRequestError

    try:
        if args.command == "generate":
            return _generate(args)
        return _models()
    except (ModelLoadError, InvalidRequestError, ValueError) as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 2
