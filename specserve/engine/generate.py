"""The generation loop for one request: prefill, then speculative (or plain) decode steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specserve.engine.output import TextAssembler
from specserve.engine.sampling import InvalidRequestError, SamplingParams, sample, target_probs
from specserve.engine.speculation import PLAIN, ProposalSource, SpeculationConfig
from specserve.model.loader import Model
from specserve.model.transformer import ForwardBatch
from specserve.spec.proposers.base import Proposal, SequenceContext
from specserve.spec.proposers.prediction import PredictionStats
from specserve.spec.stats import SpecStats
from specserve.spec.tuning import StepCosts
from specserve.spec.verify import verify_greedy, verify_sampled


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    time_to_first_token: float  # seconds, prefill included
    decode_seconds: float  # from the first token to the last
    stats: SpecStats = field(default_factory=SpecStats)
    prediction: PredictionStats | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def check_prompt(model: Model, prompt_ids: Sequence[int]) -> None:
    """Refuse, before any compute, a prompt that is empty or does not fit the context."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt_ids) >= model.max_context:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context window is "
            f"{model.max_context} tokens (and at least one must be left to generate)"
        )
    vocab = model.lm.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")


def pick_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits ``[V]`` -> the next token, greedy or sampled."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(target_probs(logits[None], params), gen)[0])


def _verify(
    logits: torch.Tensor, proposal: Proposal, params: SamplingParams, gen: torch.Generator
) -> tuple[list[int], int]:
    """logits ``[k + 1, V]`` of one sequence -> (emitted tokens, number of accepted drafts)."""
    drafts = torch.tensor([proposal.token_ids])  # [1, k]
    num = torch.tensor([len(proposal.token_ids)])
    if params.greedy:
        result = verify_greedy(drafts, num, logits.argmax(-1)[None])
    else:
        draft_probs = None if proposal.draft_probs is None else proposal.draft_probs[None]
        result = verify_sampled(drafts, num, draft_probs, target_probs(logits, params)[None], [gen])
    return result.row(0), int(result.num_accepted[0])


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
    spec: SpeculationConfig = PLAIN,
    prediction_ids: Sequence[int] | None = None,
    costs: StepCosts | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt_ids``; speculative when ``spec`` or a prediction says so.

    Greedy output is identical to plain decoding token for token; sampled output has the
    target's distribution (the verifier is lossless). ``costs`` lets requests of one model
    share their measured step costs.
    """
    check_prompt(model, prompt_ids)
    budget = min(params.max_tokens, model.max_context - len(prompt_ids))
    max_len = len(prompt_ids) + budget
    cache = model.lm.new_cache(1, max_len)
    gen = params.generator()
    costs = costs or StepCosts()
    source = ProposalSource(model, spec, params, prediction_ids, max_len, costs)
    assembler = TextAssembler(model.tokenizer, prompt_ids, params.stop)
    eos = set() if params.ignore_eos else set(model.tokenizer.eos_ids)
    stats = SpecStats()

    start = time.perf_counter()
    logits = model.lm(
        ForwardBatch(torch.tensor([list(prompt_ids)]), [0], [0]), cache, all_logits=False
    )
    emitted = [pick_token(logits[0, -1], params, gen)]
    source.prefill(prompt_ids)
    first = time.perf_counter()
    out: list[int] = []
    all_ids = list(prompt_ids)
    finish = "length"
    while True:
        fresh = []
        for token in emitted:
            if token in eos:
                finish = "stop"
                break
            if len(out) < budget:
                out.append(token)
                all_ids.append(token)
                fresh.append(token)
        piece = assembler.add(fresh)
        if on_text and piece:
            on_text(piece)
        if finish == "stop" or assembler.finished:
            finish = "stop"
            break
        if len(out) >= budget:
            break
        # One step: the last token (not yet in the cache) plus up to `limit` drafts.
        limit = budget - len(out) - 1
        context = SequenceContext(prompt_ids, out, all_ids)
        proposal = source.propose(context, limit)
        feed = [all_ids[-1], *proposal.token_ids]
        began = time.perf_counter()
        logits = model.lm(ForwardBatch(torch.tensor([feed]), [0], [len(all_ids) - 1]), cache)
        if proposal.token_ids:
            emitted, accepted = _verify(logits[0], proposal, params, gen)
        else:
            emitted, accepted = [pick_token(logits[0, -1], params, gen)], 0
        costs.observe(len(feed), time.perf_counter() - began)
        proposed = len(proposal.token_ids)
        source.observe(proposed, accepted)
        stats.record_step(proposal.method if proposed else None, proposed, accepted, len(emitted))
    tail = assembler.finish()
    if on_text and tail:
        on_text(tail)
    end = time.perf_counter()
    return GenerationResult(
        text=assembler.text,
        token_ids=out,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        time_to_first_token=first - start,
        decode_seconds=end - first,
        stats=stats,
        prediction=source.prediction_stats,
    )
