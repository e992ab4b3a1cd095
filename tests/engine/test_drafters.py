"""EAGLE draft head: cached step == full forward, the drafter format, refusal of other
targets, and that training learns (on synthetic data, tiny sizes only)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from specserve.drafters import checkpoint, training
from specserve.drafters.training import (
    Recipe,
    TrainingSequence,
    choose_vocab,
    eagle_loss,
    iter_batches,
    train,
)
from specserve.model.loader import Model, load_model
from specserve.speculative.eagle_head import NO_DRAFT_ROW, EagleConfig, EagleHead
from specserve.speculative.head_artifact import (
    MANIFEST,
    WEIGHTS,
    DrafterError,
    build_head,
    is_drafter_dir,
    load_drafter,
    read_manifest,
    save_drafter,
    weights_fingerprint,
)
from tests.tiny import TinySpec, write_tiny_gguf

SMALL = EagleConfig(
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    rms_norm_eps=1e-6,
    rope_base=10_000.0,
    draft_vocab_size=48,
)
SMALL_VOCAB = 64
NO_CHECKPOINT = dict(checkpoint_dir=None, resume=False, seed=0, progress=False)


def small_head(seed: int = 0, config: EagleConfig = SMALL, vocab: int = SMALL_VOCAB) -> EagleHead:
    """A head on random frozen tensors; its trainable weights (norms too) are random."""
    gen = torch.Generator().manual_seed(seed)
    C, N = config.hidden_size, config.draft_vocab_size
    embedding = torch.randn(vocab, C, generator=gen)
    head_weight = torch.randn(N, C, generator=gen) * C**-0.5
    vocab_ids = torch.randperm(vocab, generator=gen)[:N].sort().values
    torch.manual_seed(seed)
    head = EagleHead(
        config, embedding, 1 + 0.1 * torch.randn(C, generator=gen), head_weight, vocab_ids
    )
    with torch.no_grad():
        head.attn_norm.add_(0.1 * torch.randn(C, generator=gen))
        head.ffn_norm.add_(0.1 * torch.randn(C, generator=gen))
    return head


# -- the head's math --------------------------------------------------------------------------


def test_step_in_chunks_equals_forward_and_rolls_back() -> None:
    head = small_head().eval()
    T = 23
    features = torch.randn(T, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (T,))
    with torch.no_grad():
        pred, logits = head(features[None], tokens[None])  # (1, T, C), (1, T, N)
    assert pred.shape == (1, T, SMALL.hidden_size) and logits.shape == (1, T, 48)
    cache = head.new_cache(max_len=32)
    bounds = [0, 7, 8, 9, 16, T]
    for start, end in itertools.pairwise(bounds):
        p, lg = head.step(cache, features[start:end], tokens[start:end], start)
        torch.testing.assert_close(p, pred[0, start:end], atol=1e-4, rtol=0)
        torch.testing.assert_close(lg, logits[0, start:end], atol=1e-4, rtol=0)
    # Rollback: drafts written at 16.. with other inputs, then the real ones from 16 again.
    head.step(cache, torch.randn(5, SMALL.hidden_size), tokens[:5], 16)
    p, lg = head.step(cache, features[16:], tokens[16:], 16)
    torch.testing.assert_close(lg, logits[0, 16:], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="past the drafter cache"):
        head.step(cache, features[:2], tokens[:2], 31)


def test_windowed_step_sees_only_the_last_positions() -> None:
    """With a window W, a one-token step at p equals ``forward`` over positions p - W + 1..p
    alone (RoPE is relative, so where that run starts does not matter); positions skipped
    before ``cache.first`` are never computed nor read."""
    head = small_head().eval()
    T, W = 30, 8
    features = torch.randn(T, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (T,))
    cache = head.new_cache(max_len=T)
    cache.first = 12  # what the proposer does when the window moves past unread positions
    with torch.inference_mode():
        cache.keys[:, :12] = float("nan")  # never read
    head.step(cache, features[12:20], tokens[12:20], 12, window=W)  # catch up: T = W
    for p in range(20, T):
        _, logits = head.step(cache, features[p : p + 1], tokens[p : p + 1], p, window=W)
        with torch.no_grad():
            _, alone = head(features[None, p - W + 1 : p + 1], tokens[None, p - W + 1 : p + 1])
        torch.testing.assert_close(logits[0], alone[0, -1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="was skipped"):
        head.step(cache, features[10:12], tokens[10:12], 10, window=W)


def test_unrolled_forward_equals_chained_drafting() -> None:
    """Step j at position s of the training-time unroll == the (j + 1)-th token drafted from
    anchor s - j by the cached inference loop, feeding back its own features."""
    head = small_head(seed=3).eval()
    T, steps = 19, 4
    features = torch.randn(T, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (T,))
    with torch.no_grad():
        unrolled = head.forward_unrolled(features[None], tokens[None], steps)
        plain_pred, _ = head(features[None], tokens[None])
    torch.testing.assert_close(unrolled[0][0], plain_pred)
    for anchor in (0, 5, T - steps):
        cache = head.new_cache(max_len=32)
        pred, logits = head.step(cache, features[: anchor + 1], tokens[: anchor + 1], 0)
        feature, row = pred[-1:], logits[-1]
        for j in range(steps):
            torch.testing.assert_close(row, unrolled[j][1][0, anchor + j], atol=1e-4, rtol=0)
            position = anchor + j + 1
            if position < T:
                feature, out = head.step(cache, feature, tokens[position : position + 1], position)
                row = out[-1]


def test_forward_batches_rows_independently() -> None:
    head = small_head().eval()
    features = torch.randn(3, 10, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (3, 10))
    with torch.no_grad():
        _, logits = head(features, tokens, start=4)
        _, row = head(features[1:2], tokens[1:2], start=4)
    torch.testing.assert_close(logits[1:2], row, atol=1e-5, rtol=0)


def test_bf16_compute_stays_close_to_float32() -> None:
    head = small_head().eval()
    features = torch.randn(12, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (12,))
    with torch.no_grad():
        _, exact = head(features[None], tokens[None])
    head.set_compute_dtype(torch.bfloat16)
    assert head.compute_dtype == torch.bfloat16
    cache = head.new_cache(16)
    _, first = head.step(cache, features[:5], tokens[:5], 0)
    _, rest = head.step(cache, features[5:], tokens[5:], 5)
    logits = torch.cat([first, rest])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact[0], atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="train a float32 head"):
        train(head, synthetic_sequences(2, 12), epochs=1, batch_tokens=64, **NO_CHECKPOINT)


def test_int8_weights_stay_close_and_step_equals_forward() -> None:
    head = small_head().eval()
    features = torch.randn(12, SMALL.hidden_size)
    tokens = torch.randint(0, SMALL_VOCAB, (12,))
    with torch.no_grad():
        _, exact = head(features[None], tokens[None])
        head.set_compute_dtype(torch.bfloat16).quantize_int8()
        assert head.int8
        _, whole = head(features[None], tokens[None])
    cache = head.new_cache(16)
    _, first = head.step(cache, features[:5], tokens[:5], 0)
    _, rest = head.step(cache, features[5:], tokens[5:], 5)
    torch.testing.assert_close(torch.cat([first, rest]), whole[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(whole[0], exact[0], atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="train a float32 head"):
        train(head, synthetic_sequences(2, 12), epochs=1, batch_tokens=64, **NO_CHECKPOINT)


def test_trains_on_frozen_tensors_made_in_inference_mode() -> None:
    """A target's tensors may be inference tensors; backward must still work."""
    with torch.inference_mode():
        frozen = [t.clone() for t in (small_head().embedding, torch.ones(32), torch.ones(48, 32))]
    head = EagleHead(SMALL, *frozen, torch.arange(48))
    batch = next(iter_batches(synthetic_sequences(2, 12), batch_tokens=64))
    loss, _ = eagle_loss(head, batch)
    loss.backward()
    assert head.fc.weight.grad is not None


def test_vocab_mapping() -> None:
    head = small_head()
    rows = torch.arange(SMALL.draft_vocab_size)
    ids = head.to_target_ids(rows)
    assert torch.equal(head.to_draft_ids(ids), rows)
    outside = sorted(set(range(SMALL_VOCAB)) - set(ids.tolist()))
    assert (head.to_draft_ids(torch.tensor(outside)) == NO_DRAFT_ROW).all()


def test_choose_vocab_keeps_always_and_most_frequent() -> None:
    seq = TrainingSequence(
        features=torch.zeros(6, 4),
        tokens=torch.tensor([3, 3, 3, 8, 8, 1]),
        target_next=torch.tensor([3, 8, 8, 8, 5, 5]),
    )
    assert choose_vocab([seq], 3, always=[60]).tolist() == [3, 8, 60]
    assert choose_vocab([seq], 2, always=[]).tolist() == [3, 8]  # 8 five times, 3 four times
    assert choose_vocab([seq], 100, always=[2]).tolist() == [1, 2, 3, 5, 8]
    # the target's vocabulary fills the rest with the smallest unseen ids, never past it
    assert choose_vocab([seq], 8, always=[2], vocab_size=10).tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert choose_vocab([seq], 100, always=[], vocab_size=10).tolist() == list(range(10))


# -- the drafter format -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_model: Model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EagleHead]:
    """A randomly initialised head for the tiny target, saved once."""
    eos = list(tiny_model.tokenizer.eos_ids)
    vocab_ids = torch.tensor(sorted({*range(0, 200, 3), *eos}))
    config = EagleConfig.for_target(tiny_model.lm.config, len(vocab_ids), intermediate_size=96)
    torch.manual_seed(0)
    head = build_head(tiny_model, config, vocab_ids)
    with torch.no_grad():
        head.attn_norm.add_(0.1 * torch.randn_like(head.attn_norm))
    out = save_drafter(tmp_path_factory.mktemp("drafter") / "d", head, tiny_model, {"epochs": 3})
    return out, head


@pytest.fixture(scope="module")
def other_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("others")
    specs = {"vocab": TinySpec(extra_tokens=3), "weights": TinySpec(seed=1)}
    return {
        kind: load_model(
            str(write_tiny_gguf(root / f"{kind}.gguf", speculation)), "float32", progress=False
        )
        for kind, speculation in specs.items()
    }


def test_round_trip(saved: tuple[Path, EagleHead], tiny_model: Model) -> None:
    path, head = saved
    assert is_drafter_dir(path) and not is_drafter_dir(path / WEIGHTS)
    manifest = read_manifest(path)
    assert manifest["method"] == "eagle" and manifest["format_version"] == 1
    assert manifest["training"] == {"epochs": 3}
    assert manifest["target"]["name"] == tiny_model.name
    assert manifest["target"]["vocab_size"] == tiny_model.lm.config.vocab_size
    assert manifest["config"] == dataclasses.asdict(head.config)
    loaded = load_drafter(path, tiny_model)
    assert loaded.compute_dtype == torch.float32  # the target's: a float32 model
    assert load_drafter(path, tiny_model, torch.bfloat16).compute_dtype == torch.bfloat16
    # Reference: the same head with its trainable weights rounded to bf16 as saved.
    rounded = {k: v.bfloat16().float() for k, v in head.state_dict().items()}
    head.load_state_dict(rounded)
    features = torch.randn(9, head.config.hidden_size)
    tokens = torch.randint(0, 200, (9,))
    expected = head.step(head.new_cache(16), features, tokens, 0)
    got = loaded.step(loaded.new_cache(16), features, tokens, 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    assert loaded.head_weight.dtype == torch.float32


def test_refuses_other_targets(
    saved: tuple[Path, EagleHead], other_models: dict[str, Model]
) -> None:
    path, _ = saved
    with pytest.raises(DrafterError, match="whose vocabulary differs"):
        load_drafter(path, other_models["vocab"])
    with pytest.raises(DrafterError, match=r"another version of .* weights.*retrain"):
        load_drafter(path, other_models["weights"])


def test_refuses_malformed_directories(
    saved: tuple[Path, EagleHead], tiny_model: Model, tmp_path: Path
) -> None:
    path, _ = saved
    with pytest.raises(DrafterError, match="not a drafter directory"):
        load_drafter(tmp_path / "nothing", tiny_model)
    with pytest.raises(DrafterError, match=f"no {MANIFEST}"):
        load_drafter(tmp_path, tiny_model)
    manifest = json.loads((path / MANIFEST).read_text())
    for change, message in [
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"method": "medusa"}, "unknown drafter method 'medusa'"),
    ]:
        broken = tmp_path / message[:6]
        broken.mkdir()
        (broken / MANIFEST).write_text(json.dumps({**manifest, **change}))
        with pytest.raises(DrafterError, match=message):
            load_drafter(broken, tiny_model)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))  # no weights file beside it
    with pytest.raises(DrafterError, match=f"{WEIGHTS} is missing"):
        load_drafter(tmp_path, tiny_model)


def test_weights_fingerprint(
    tiny_model: Model, tiny_gguf: Path, other_models: dict[str, Model]
) -> None:
    fingerprint = weights_fingerprint(tiny_model)
    assert fingerprint == weights_fingerprint(tiny_model)
    # One file in another execution format: the same weights.
    as_bf16 = load_model(str(tiny_gguf), dtype="bfloat16", progress=False)
    assert weights_fingerprint(as_bf16) == fingerprint
    assert weights_fingerprint(other_models["weights"]) != fingerprint


def test_smollm2_sized_drafter_fits_in_16_mb(tiny_model: Model, tmp_path: Path) -> None:
    """Real SmolLM2-135M sizes (C=576, 9/3 heads, ffn 1536, V=49152) with an 8192-row head;
    the target here only fills the manifest."""
    config = EagleConfig(
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        rms_norm_eps=1e-5,
        rope_base=100_000.0,
        draft_vocab_size=8192,
    )
    embedding = torch.zeros(49152, 576, dtype=torch.bfloat16)
    head = EagleHead(config, embedding, torch.ones(576), torch.zeros(8192, 576), torch.arange(8192))
    out = save_drafter(tmp_path / "smol", head, tiny_model, {})
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size <= 16 * 2**20, f"{size / 2**20:.1f} MB"


# -- training ---------------------------------------------------------------------------------


def synthetic_sequences(count: int, length: int, seed: int = 0) -> list[TrainingSequence]:
    """A learnable target: features[t] is a fixed projection of token t's embedding and the
    target's next token is a fixed permutation of the current one."""
    gen = torch.Generator().manual_seed(seed)
    embedding = small_head().embedding
    projection = torch.randn(SMALL.hidden_size, SMALL.hidden_size, generator=gen) * 0.3
    permutation = torch.randperm(SMALL_VOCAB, generator=gen)
    sequences = []
    for _ in range(count):
        tokens = torch.randint(0, SMALL_VOCAB, (length,), generator=gen)
        features = embedding[tokens] @ projection
        sequences.append(TrainingSequence(features, tokens, permutation[tokens], loss_from=3))
    return sequences


def test_eagle_loss_ignores_labels_outside_the_reduced_vocab() -> None:
    head = small_head()
    batch = next(iter_batches(synthetic_sequences(2, 12), batch_tokens=64))
    outside = torch.tensor(sorted(set(range(SMALL_VOCAB)) - set(head.vocab_ids.tolist())))
    batch.labels[:] = outside[0]
    loss, metrics = eagle_loss(head, batch)
    assert metrics["coverage"] == 0.0 and metrics["accuracy"] == 0.0
    assert metrics["token_loss"] == 0.0 and torch.isfinite(loss)
    assert metrics["tokens"] == 2 * (11 - 2)  # loss_from=3: pairs predicting 3..11


def test_training_learns() -> None:
    head, sequences = small_head(seed=1), synthetic_sequences(24, 41)
    summary = train(head, sequences, epochs=6, lr=1e-2, batch_tokens=160, **NO_CHECKPOINT)
    assert summary["steps"] >= 30
    losses, accuracy = summary["epoch_loss"], summary["epoch_accuracy"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
    assert summary["tokens"] == 6 * 24 * 38 and summary["tokens_per_second"] > 0


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("recipe", [Recipe(), Recipe(steps=2, feature_noise=0.1)])
def test_resume_continues_like_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: Recipe
) -> None:
    """Also with the unrolled loss and feature noise (its draws are a function of the step)."""
    sequences = synthetic_sequences(16, 33)
    kwargs = dict(epochs=2, lr=1e-2, batch_tokens=128, resume=True, seed=3, progress=False)
    kwargs["recipe"] = recipe
    whole = small_head(seed=1)
    expected = train(whole, sequences, checkpoint_dir=tmp_path / "whole", **kwargs)

    # Interrupt mid-epoch 2 (checkpoints every 5 steps), then resume with a fresh head.
    monkeypatch.setattr(training, "CHECKPOINT_EVERY", 5)
    save = checkpoint.save

    def save_then_stop(*args: object) -> None:
        save(*args)  # type: ignore[arg-type]
        if args[-1]["epoch"] == 1 and args[-1]["batch"] > 0:  # type: ignore[index]
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train(small_head(seed=1), sequences, checkpoint_dir=tmp_path / "cut", **kwargs)
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = small_head(seed=1)  # same frozen tensors (the target's), other trainable ones:
    with torch.no_grad():  # everything trained must come from the checkpoint
        for param in resumed.parameters():
            param.add_(torch.randn_like(param))
    summary = train(resumed, sequences, checkpoint_dir=tmp_path / "cut", **kwargs)
    assert summary["steps"] == expected["steps"] and summary["tokens"] == expected["tokens"]
    assert summary["epoch_loss"] == pytest.approx(expected["epoch_loss"], rel=1e-4)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    state = json.loads((tmp_path / "cut" / checkpoint.CHECKPOINT_JSON).read_text())
    assert state["epoch"] == 2 and state["step"] == expected["steps"]
    with pytest.raises(ValueError, match="another training run"):
        train(small_head(), sequences, checkpoint_dir=tmp_path / "cut", **{**kwargs, "seed": 4})
