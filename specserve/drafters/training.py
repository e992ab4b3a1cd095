"""Training an EAGLE head on self-distilled data: the target's own features and predictions.

Each ``TrainingSequence`` is one conversation as the target itself continued it. The head
reads ``(features[t], tokens[t+1])`` and learns to predict ``features[t+1]`` (regression, what
EAGLE feeds back when drafting several tokens) and ``target_next[t+1]`` (the token the target
writes next: its agreement with the draft's argmax is the acceptance proxy we report).

>>> vocab = choose_vocab(sequences, 8192, always=model.tokenizer.eos_ids)  # doctest: +SKIP
>>> config = EagleConfig.for_target(model.lm.config, len(vocab))          # doctest: +SKIP
>>> head = build_head(model, config, vocab)                               # doctest: +SKIP
>>> summary = train(head, sequences, epochs=2, batch_tokens=4096, checkpoint_dir=Path("ck"),
...                 resume=True, seed=0)                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from specserve.drafters import checkpoint
from specserve.drafters.checkpoint import trainable
from specserve.speculative.eagle_head import CONTEXT, NO_DRAFT_ROW, EagleHead

# Loss weights of EAGLE-1: the feature regression drives multi-token drafting (predicted
# features are fed back), the token loss keeps those features decodable.
FEATURE_WEIGHT = 1.0
TOKEN_WEIGHT = 0.1
STEP_DECAY = 0.8  # EAGLE-3's weight of later draft steps
CLIP_NORM = 0.5  # EAGLE's gradient clipping
BETAS = (0.9, 0.95)
WARMUP_FRACTION = 0.05  # linear warmup, then cosine decay to MIN_LR_FRACTION of lr
MIN_LR_FRACTION = 0.1
CHECKPOINT_EVERY = 500  # steps, besides the end of every epoch
Chunk = tuple[int, int, int]  # (sequence index, first position, end position)


@dataclass
class TrainingSequence:
    """One self-distilled conversation of T positions."""

    features: Tensor  # [T, C] float32 or bf16: target features at positions 0..T-1
    tokens: Tensor  # [T] int64 token ids at positions 0..T-1
    target_next: Tensor  # [T] int64: the target's argmax after position t
    loss_from: int = 0  # predictions of positions before this (most of the prompt) don't count


@dataclass
class Batch:
    """Padded training pairs ``[B, L]``: inputs at t, targets at t + 1 of one chunk each."""

    features: Tensor  # [B, L, C] float32 features[t]
    tokens: Tensor  # [B, L] tokens[t + 1]
    next_features: Tensor  # [B, L, C] features[t + 1]
    labels: Tensor  # [B, L] target_next[t + 1] (target ids)
    mask: Tensor  # [B, L] bool: real pairs that count in the loss


def choose_vocab(
    sequences: Sequence[TrainingSequence],
    size: int,
    always: Sequence[int],
    vocab_size: int | None = None,
) -> Tensor:
    """The reduced head's vocabulary: ``always`` (EOS ids: a draft must be able to stop) plus
    the most frequent ids among ``tokens`` and ``target_next``, ``size`` ids in all, sorted.
    Ties go to the smaller id.

    With ``vocab_size`` (the target's), ids the data never shows fill the rest, smallest
    first: BPE vocabularies number tokens in merge order, so small ids are the tokenizer's
    frequent tokens. The head predicts *features* and its rows are the target's own LM-head
    rows, so it can propose tokens it never saw in training: on Spec-Bench answers, a
    vocabulary of the training data's tokens alone missed 15-35% of the labels (measured).

    >>> tokens, target_next = torch.tensor([5, 5, 7, 9]), torch.tensor([5, 7, 7, 1])
    >>> data = [TrainingSequence(torch.zeros(4, 2), tokens, target_next)]
    >>> choose_vocab(data, 3, [2]).tolist()
    [2, 5, 7]
    >>> choose_vocab(data, 7, [2], vocab_size=12).tolist()
    [0, 1, 2, 3, 5, 7, 9]
    """
    ids = torch.cat([torch.cat([s.tokens, s.target_next]) for s in sequences]).to(torch.int64)
    counts = torch.bincount(ids)
    chosen = dict.fromkeys(int(i) for i in always)
    order = torch.sort(-counts, stable=True).indices  # most frequent first, then smaller id
    for token_id in order[counts[order] > 0].tolist():
        if len(chosen) >= size:
            break
        chosen.setdefault(token_id)
    for token_id in range(vocab_size or 0):
        if len(chosen) >= size:
            break
        chosen.setdefault(token_id)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


@dataclass(frozen=True)
class Recipe:
    """How the head is trained (recorded in the drafter's manifest).

    ``steps`` > 1 also trains on the head's own fed-back features ("training-time test",
    EAGLE-3): draft j + 1 from every anchor, weighted ``decay ** j``, as drafting j + 1 tokens
    reads j of its own guesses. Measured on SmolLM2 with 61k training positions, neither 2-3
    steps nor input noise changed held-out acceptance (README), so the default is the plain
    EAGLE-1 objective; both stay available (`drafter train --unroll-steps/--feature-noise`).
    """

    steps: int = 1
    feature_weight: float = FEATURE_WEIGHT
    token_weight: float = TOKEN_WEIGHT
    decay: float = STEP_DECAY
    # Matmuls in bfloat16 under autocast (weights, gradients and AdamW stay float32):
    # ~1.8x faster training on CPUs with AVX512-BF16 (measured on the SmolLM2 head).
    bf16_autocast: bool = False
    # EAGLE-1's augmentation: uniform noise on the input features, here relative to each
    # feature vector's RMS (a residual stream's scale varies by position); training only.
    feature_noise: float = 0.0


DEFAULT_RECIPE = Recipe()  # what `specserve drafter train` uses unless told otherwise


def eagle_loss(
    head: EagleHead,
    batch: Batch,
    recipe: Recipe = Recipe(),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """EAGLE loss per draft step: ``feature_weight`` * smooth L1 (features, robust to the few
    huge dimensions of a residual stream) + ``token_weight`` * cross entropy over the reduced
    vocabulary (labels outside it are ignored: the head cannot propose them anyway); steps
    weighted by ``decay ** j`` and normalised by the weights' sum.

    ``generator`` draws the feature noise (if the recipe has any).

    Metrics: ``accuracy`` is the first draft's top-1 agreement with the target over *all*
    counted positions (labels outside the reduced vocabulary count as misses), ``coverage``
    the share of labels that the reduced vocabulary holds.
    """
    features = batch.features
    if recipe.feature_noise and head.training:
        scale = features.pow(2).mean(-1, keepdim=True).sqrt() * recipe.feature_noise
        noise = torch.rand(features.shape, generator=generator) * 2 - 1
        features = features + noise * scale
    outputs = head.forward_unrolled(features, batch.tokens, recipe.steps)
    draft_labels = head.to_draft_ids(batch.labels)
    positions = torch.arange(batch.mask.shape[1])
    total = batch.mask.new_zeros((), dtype=torch.float32)
    weights = 0.0
    metrics: dict[str, float] = {}
    for step, (pred, logits) in enumerate(outputs):
        mask = batch.mask & (positions >= step)  # step j at s drafts from anchor s - j
        count = mask.sum().clamp(min=1)
        feature_loss = F.smooth_l1_loss(pred, batch.next_features, reduction="none").mean(-1)
        feature_loss = (feature_loss * mask).sum() / count
        covered = mask & (draft_labels != NO_DRAFT_ROW)
        token_loss = (
            F.cross_entropy(logits[covered], draft_labels[covered])
            if covered.any()
            else logits.sum() * 0.0
        )
        weight = recipe.decay**step
        total = total + weight * (
            recipe.feature_weight * feature_loss + recipe.token_weight * token_loss
        )
        weights += weight
        with torch.no_grad():
            hits = (head.to_target_ids(logits.argmax(-1)) == batch.labels) & mask
            n = float(count)
            if step == 0:
                metrics = {
                    "feature_loss": float(feature_loss),
                    "token_loss": float(token_loss),
                    "accuracy": float(hits.sum()) / n,
                    "coverage": float(covered.sum()) / n,
                    "tokens": float(batch.mask.sum()),
                }
            else:
                metrics[f"accuracy_{step + 1}"] = float(hits.sum()) / n
    loss = total / weights
    metrics["loss"] = float(loss.detach())
    return loss, metrics


@torch.no_grad()
def chain_acceptance(
    head: EagleHead, sequences: Sequence[TrainingSequence], steps: int = 4
) -> dict[str, Any]:
    """How a greedy chain of ``steps`` drafts would fare from every counted anchor of
    ``sequences`` (responses the target wrote greedily: a draft is accepted when it equals the
    target's argmax and every earlier draft was accepted).

    Returns ``accepted_length`` (mean accepted drafts per chain, the bonus token not counted),
    ``acceptance`` (per draft position, conditional on the earlier ones) and ``anchors``.
    """
    accepted = torch.zeros(steps, dtype=torch.float64)
    anchors = 0
    for chunks in _epoch_batches(_chunks(sequences), 4096, seed=0, epoch=0):
        batch = make_batch(sequences, chunks)
        L = batch.mask.shape[1]
        if steps > L:
            continue
        outputs = head.forward_unrolled(batch.features, batch.tokens, steps)
        width = L - steps + 1  # anchors whose whole chain fits in the chunk
        chain = torch.ones(batch.mask.shape[0], width, dtype=torch.bool)
        valid = batch.mask[:, :width] & batch.mask[:, steps - 1 :]
        for step, (_, logits) in enumerate(outputs):
            drafted = head.to_target_ids(logits.argmax(-1))
            hits = drafted == batch.labels
            chain &= hits[:, step : step + width]
            accepted[step] += float((chain & valid).sum())
        anchors += int(valid.sum())
    reached = torch.cat([torch.tensor([float(anchors)], dtype=torch.float64), accepted[:-1]])
    return {
        "accepted_length": float(accepted.sum()) / max(anchors, 1),
        "acceptance": (accepted / reached.clamp(min=1)).tolist(),
        "anchors": anchors,
    }


# -- batching ----------------------------------------------------------------------------------


def _chunks(sequences: Sequence[TrainingSequence]) -> list[Chunk]:
    """(sequence, begin, end): position ranges of at most CONTEXT + 1 positions (CONTEXT
    pairs), overlapping by one position so that no pair is lost at a boundary."""
    chunks = []
    for index, seq in enumerate(sequences):
        length = seq.tokens.shape[0]
        for begin in range(0, length - 1, CONTEXT):
            end = min(begin + CONTEXT + 1, length)
            if end > max(begin + 1, seq.loss_from):  # at least one counted pair
                chunks.append((index, begin, end))
    return chunks


def _epoch_batches(
    chunks: list[Chunk], batch_tokens: int, seed: int, epoch: int
) -> list[list[Chunk]]:
    """Chunks shuffled and grouped so each batch's padded size stays within batch_tokens.

    The order of epoch e is a pure function of (seed, e): resuming needs no RNG state.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches: list[list[Chunk]] = []
    current: list[Chunk] = []
    longest = 0
    for i in torch.randperm(len(chunks), generator=generator).tolist():
        pairs = chunks[i][2] - chunks[i][1] - 1
        if current and (len(current) + 1) * max(longest, pairs) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(chunks[i])
        longest = max(longest, pairs)
    if current:
        batches.append(current)
    return batches


def make_batch(sequences: Sequence[TrainingSequence], chunks: list[Chunk]) -> Batch:
    """Pad the chunks' pairs to a ``[B, L]`` batch (padding after the real pairs, so causal
    attention never lets a real position see it). All chunks use RoPE start 0: attention
    with RoPE depends on relative positions only."""
    L = max(end - begin - 1 for _, begin, end in chunks)
    C = sequences[chunks[0][0]].features.shape[-1]
    B = len(chunks)
    batch = Batch(
        features=torch.zeros(B, L, C),
        tokens=torch.zeros(B, L, dtype=torch.int64),
        next_features=torch.zeros(B, L, C),
        labels=torch.zeros(B, L, dtype=torch.int64),
        mask=torch.zeros(B, L, dtype=torch.bool),
    )
    for row, (index, begin, end) in enumerate(chunks):
        seq, n = sequences[index], end - begin - 1
        batch.features[row, :n] = seq.features[begin : end - 1]
        batch.next_features[row, :n] = seq.features[begin + 1 : end]
        batch.tokens[row, :n] = seq.tokens[begin + 1 : end]
        batch.labels[row, :n] = seq.target_next[begin + 1 : end]
        # pair t predicts position t + 1: it counts from t + 1 >= loss_from
        batch.mask[row, max(0, seq.loss_from - 1 - begin) : n] = True
    return batch


# -- the loop ----------------------------------------------------------------------------------


def _lr_at(step: int, total: int, lr: float) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def _step(
    head: EagleHead,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    recipe: Recipe,
    generator: torch.Generator,
) -> dict[str, float]:
    """One AdamW update on ``batch`` at learning rate ``lr``; the batch's metrics."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
        loss, metrics = eagle_loss(head, batch, recipe, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(head).values(), CLIP_NORM)
    optimizer.step()
    return metrics


def train(
    head: EagleHead,
    sequences: Sequence[TrainingSequence],
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_tokens: int,
    checkpoint_dir: Path | None,
    resume: bool,
    seed: int,
    progress: bool = True,
    recipe: Recipe = Recipe(),
) -> dict[str, Any]:
    """Train ``head`` in place with AdamW (warmup + cosine); returns a summary.

    Checkpoints go to ``checkpoint_dir`` after every epoch and every ``CHECKPOINT_EVERY``
    steps; ``resume=True`` continues from the last one and reaches the same weights as an
    uninterrupted run (batch order is a function of seed and epoch, the LR of the step).
    """
    if head.compute_dtype != torch.float32 or head.int8:
        raise ValueError(f"train a float32 head, not {head.compute_dtype} (set_compute_dtype)")
    chunks = _chunks(sequences)
    if not chunks:
        raise ValueError("no training pairs: every sequence is shorter than 2 positions")
    plan_batches = [_epoch_batches(chunks, batch_tokens, seed, e) for e in range(epochs)]
    total_steps = sum(len(b) for b in plan_batches)
    plan = _plan(seed, epochs, len(chunks), lr, total_steps, batch_tokens, recipe)
    optimizer = torch.optim.AdamW(trainable(head).values(), lr=lr, betas=BETAS)
    state: dict[str, Any] = dict(plan=plan, epoch=0, batch=0, step=0, seconds=0.0, tokens=0.0)
    state.update(epoch_loss=[], epoch_accuracy=[], sums={})
    if resume and checkpoint_dir is not None:
        state = checkpoint.load(checkpoint_dir, head, optimizer, plan) or state
    bar = _progress_bar(sequences, chunks, epochs, int(state["tokens"]), progress)
    head.train()
    started = time.perf_counter() - state["seconds"]
    running: dict[str, float] = {}
    for epoch in range(state["epoch"], epochs):
        for index in range(state["batch"], len(plan_batches[epoch])):
            batch = make_batch(sequences, plan_batches[epoch][index])
            lr_now = _lr_at(state["step"], total_steps, lr)
            # noise of step n is a function of (seed, n): a resumed run draws the same
            noise = torch.Generator().manual_seed(seed * 1_000_003 + state["step"])
            metrics = _step(head, optimizer, batch, lr_now, recipe, noise)
            _count_step(state, running, metrics, index, started)
            bar.update(int(metrics["tokens"]))
            bar.set_postfix(loss=f"{running['loss']:.3f}", acc=f"{running['accuracy']:.3f}")
            if checkpoint_dir is not None and state["step"] % CHECKPOINT_EVERY == 0:
                checkpoint.save(checkpoint_dir, head, optimizer, state)
        _close_epoch(state, epoch)
        if checkpoint_dir is not None:
            checkpoint.save(checkpoint_dir, head, optimizer, state)
    bar.close()
    head.eval()
    return _summary(state, len(sequences))


def _plan(
    seed: int,
    epochs: int,
    chunks: int,
    lr: float,
    steps: int,
    batch_tokens: int,
    recipe: Recipe,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (and the manifest records), in this order."""
    plan: dict[str, Any] = dict(seed=seed, epochs=epochs, chunks=chunks, lr=lr)
    plan["steps"] = steps
    plan["batch_tokens"] = batch_tokens
    plan["recipe"] = vars(recipe).copy()
    return plan


def _progress_bar(
    sequences: Sequence[TrainingSequence],
    chunks: list[Chunk],
    epochs: int,
    done: int,
    progress: bool,
) -> tqdm:
    """A bar counting the pairs that count in the loss, ``done`` of them already trained."""
    pairs_per_epoch = sum(end - max(begin + 1, sequences[i].loss_from) for i, begin, end in chunks)
    return tqdm(
        total=pairs_per_epoch * epochs,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc="training drafter",
        disable=not progress,
    )


def _count_step(
    state: dict[str, Any],
    running: dict[str, float],
    metrics: dict[str, float],
    index: int,
    started: float,
) -> None:
    """Add one step's metrics to the epoch's token-weighted sums and the running averages
    shown on the progress bar; advance the progress in ``state`` past batch ``index``."""
    sums: dict[str, float] = state["sums"]
    n = metrics["tokens"]
    for key in ("loss", "accuracy"):
        sums[key] = sums.get(key, 0.0) + metrics[key] * n
        running[key] = running.get(key, metrics[key]) * 0.9 + metrics[key] * 0.1
    sums["tokens"] = sums.get("tokens", 0.0) + n
    state.update(step=state["step"] + 1, batch=index + 1, tokens=state["tokens"] + n)
    state["seconds"] = time.perf_counter() - started


def _close_epoch(state: dict[str, Any], epoch: int) -> None:
    """Record epoch ``epoch``'s mean loss and accuracy; the next starts at its first batch."""
    sums: dict[str, float] = state["sums"]
    count = max(sums.get("tokens", 0.0), 1.0)
    state["epoch_loss"].append(sums.get("loss", 0.0) / count)
    state["epoch_accuracy"].append(sums.get("accuracy", 0.0) / count)
    state.update(epoch=epoch + 1, batch=0, sums={})


def _summary(state: dict[str, Any], num_sequences: int) -> dict[str, Any]:
    """What a drafter manifest records about its training."""
    seconds, losses, accuracy = state["seconds"], state["epoch_loss"], state["epoch_accuracy"]
    return {
        **state["plan"],  # seed, epochs, chunks, steps, lr, batch_tokens
        "sequences": num_sequences,
        "context": CONTEXT,
        "tokens": int(state["tokens"]),
        "epoch_loss": losses,
        "epoch_accuracy": accuracy,
        "final_loss": losses[-1] if losses else None,
        "final_accuracy": accuracy[-1] if accuracy else None,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(state["tokens"] / seconds, 1) if seconds > 0 else None,
    }


def iter_batches(
    sequences: Sequence[TrainingSequence], batch_tokens: int, seed: int = 0, epoch: int = 0
) -> Iterator[Batch]:
    """The batches of one epoch, in training order (for evaluation and tests)."""
    for chunks in _epoch_batches(_chunks(sequences), batch_tokens, seed, epoch):
        yield make_batch(sequences, chunks)
