"""EAGLE-1 draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking
Feature Uncertainty"): one decoder layer that extrapolates the target's features.

Drafting at the feature level is easier than at the token level: the head sees the target's
last hidden state ``feature_t`` (before the final RMSNorm) together with the embedding of the
token that was actually sampled after it, ``token_{t+1}``, and predicts ``feature_{t+1}``. The
target's own final norm and LM head turn that into draft logits, so the head only has to
learn one layer. Our LM head is *reduced* to the N most frequent tokens (FR-Spec / EAGLE-3):
the full 49k-262k row head would cost more than the rest of the head together.

Position convention: the input pair ``(feature_t, token_{t+1})`` sits at RoPE position t.

>>> head = EagleHead(config, embedding, output_norm, head_weight, vocab_ids)  # doctest: +SKIP
>>> cache = head.new_cache(max_len=2048)                                     # doctest: +SKIP
>>> pred, logits = head.step(cache, features[:5], tokens[1:6], start=0)     # doctest: +SKIP
>>> head.to_target_ids(logits[-1].argmax())  # draft of tokens[6]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from specserve.model.config import ModelConfig
from specserve.model.transformer import apply_rope, rope_tables

NO_DRAFT_ROW = -1  # draft_index of a target id that the reduced head cannot propose
# Positions the head attends to: a training chunk, and the drafting window (longer contexts
# are outside what it learned, and a long prompt would cost a head pass before the first draft).
CONTEXT = 256


@dataclass(frozen=True)
class EagleConfig:
    """Shape of one EAGLE head; the attention/norm/RoPE settings copy the target's."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_base: float
    draft_vocab_size: int  # rows of the reduced LM head
    embedding_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)

    @classmethod
    def for_target(
        cls, config: ModelConfig, draft_vocab_size: int, intermediate_size: int | None = None
    ) -> EagleConfig:
        """The head for ``config``'s target: same width, heads and RoPE; the MLP width defaults
        to the target's (a narrower one trades acceptance for speed)."""
        return cls(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            intermediate_size=intermediate_size or config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_base=config.rope_base,
            draft_vocab_size=draft_vocab_size,
            embedding_scale=config.embedding_scale,
        )


@dataclass
class EagleCache:
    """Keys/values of the head's one layer for one sequence, indexed by position.

    Rollback is free: ``step`` at a smaller ``start`` overwrites the slots from there on and
    reads only up to its own end, so stale entries past it are never seen.
    """

    keys: Tensor  # [KVH, max_len, D] float32
    values: Tensor  # [KVH, max_len, D]
    cos: Tensor  # [max_len, D] RoPE tables, computed once per sequence
    sin: Tensor
    first: int = 0  # slots before this were skipped (never written) and are never read

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]


def _trainable_input(tensor: Tensor) -> Tensor:
    tensor = tensor.detach().float()
    return tensor.clone() if tensor.is_inference() else tensor


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal GQA attention where the T queries are the *last* T of the L key positions.

    q ``[B, H, T, D]``, keys/values ``[B, KVH, L, D]`` -> ``[B, H, T, D]``. Training (L == T)
    and cached decoding (L = start + T) share this one function; only the mask differs.
    An explicit boolean ``mask`` ``[T, L]`` (True = may attend) replaces the causal one.
    """
    T, L = q.shape[-2], keys.shape[-2]
    if mask is None and 1 < T < L:  # query i sits at key position L - T + i
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    causal = mask is None and T == L and T > 1
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


def unrolled_mask(length: int, step: int, device: torch.device | None = None) -> Tensor:
    """Which keys draft step ``step`` (0 = reading true features) may attend to, ``[T, (step
    + 1) T]`` over the keys of steps 0..step laid side by side.

    The query of step j at position s drafts from anchor t = s - j (the last position with a
    true feature): it sees step 0's keys at positions <= t and, of every later step i <= j,
    the one key at t + i — exactly the cache a chain of j drafted tokens would hold.
    """
    blocks = [torch.ones(length, length, dtype=torch.bool, device=device).tril(-step)]
    for i in range(1, step + 1):
        blocks.append(torch.eye(length, dtype=torch.bool, device=device).roll(i - step, dims=1))
    mask = torch.cat(blocks, dim=1)
    # roll wraps around: drop the wrapped entries (key positions past the query's own)
    keys = torch.arange(length, device=device).repeat(step + 1)
    return mask & (keys[None, :] <= torch.arange(length, device=device)[:, None])


class EagleHead(torch.nn.Module):
    """EAGLE-1: x = fc(concat(feature_t, embed(token_{t+1}))) -> one Llama decoder layer
    (RMSNorm, attention with RoPE at absolute positions, GQA, SwiGLU MLP) -> predicted
    feature_{t+1}; draft logits = reduced_head(rms_norm(pred, output_norm)).

    ``embedding`` ``[V, C]``, ``output_norm`` ``[C]`` and ``head_weight`` ``[N, C]`` are frozen
    buffers from the target: never trained, never saved (the drafter file stays small and
    the target is their single source of truth). ``embedding`` may stay in the target's
    execution dtype (bf16 for int4) and is shared without a copy: only looked-up rows are cast
    to float32. ``vocab_ids`` ``[N]`` maps each reduced head row to its target token id.
    Trainable: ``fc`` (with bias, as in EAGLE), fused ``qkv`` and ``gate_up`` projections,
    ``o_proj``, ``down_proj`` and the two RMSNorm weights of the layer.
    """

    embedding: Tensor  # [V, C]
    output_norm: Tensor  # [C] float32
    head_weight: Tensor  # [N, C] float32
    vocab_ids: Tensor  # [N] int64
    draft_index: Tensor  # [V] int64: target id -> reduced row, NO_DRAFT_ROW if absent

    def __init__(
        self,
        config: EagleConfig,
        embedding: Tensor,
        output_norm: Tensor,
        head_weight: Tensor,
        vocab_ids: Tensor,
    ) -> None:
        super().__init__()
        C, H, KVH, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        N = config.draft_vocab_size
        assert embedding.ndim == 2 and embedding.shape[1] == C, "embedding must be [V, C]"
        assert head_weight.shape == (N, C), f"head_weight must be [{N}, {C}]"
        assert vocab_ids.shape == (N,), f"vocab_ids must be [{N}]"
        self.config = config
        self.fc = torch.nn.Linear(2 * C, C, bias=True)
        self.attn_norm = torch.nn.Parameter(torch.ones(C))
        self.qkv = torch.nn.Linear(C, (H + 2 * KVH) * D, bias=False)
        self.o_proj = torch.nn.Linear(H * D, C, bias=False)
        self.ffn_norm = torch.nn.Parameter(torch.ones(C))
        self.gate_up = torch.nn.Linear(C, 2 * config.intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(config.intermediate_size, C, bias=False)
        # persistent=False: state_dict() holds exactly the trainable weights that are saved.
        self.register_buffer("embedding", embedding, persistent=False)
        # Training saves these for backward, which inference tensors (a target loaded or a
        # head built under torch.inference_mode) cannot be: own a copy then.
        self.register_buffer("output_norm", _trainable_input(output_norm), persistent=False)
        self.register_buffer("head_weight", _trainable_input(head_weight), persistent=False)
        vocab_ids = vocab_ids.to(torch.int64)
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)
        draft_index = torch.full((embedding.shape[0],), NO_DRAFT_ROW, dtype=torch.int64)
        draft_index[vocab_ids] = torch.arange(N)
        self.register_buffer("draft_index", draft_index, persistent=False)
        # name -> (int8 weight [N, K], bf16 scale [N]) once quantize_int8() ran
        self._int8: dict[str, tuple[Tensor, Tensor]] = {}
        self._int8_names: dict[int, str] = {}

    # -- the math, shared by forward() and step() ---------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def int8(self) -> bool:
        """Whether the matmuls read int8 weights (``quantize_int8``)."""
        return bool(self._int8)

    def quantize_int8(self) -> EagleHead:
        """Inference only: every matmul (the projections and the reduced LM head) reads int8
        weights with one bfloat16 scale per output row, activations in bfloat16.

        A drafted token is a matrix-vector product per weight, so its time is the bytes read:
        int8 halves them. Measured side by side on SmolLM2's head (one core): 3.9 ms per
        drafted token in bf16, 1.6-1.9 ms in int8. Rounding moves logits by a few hundredths;
        drafts stay drafts (the verifier decides), so output is unchanged. CPU only
        (``torch._weight_int8pack_mm``).
        """
        if self.output_norm.device.type != "cpu":
            raise ValueError("int8 drafting runs on the CPU only")
        self._int8 = {}
        layers = {"fc": self.fc, "qkv": self.qkv, "o_proj": self.o_proj}
        layers |= {"gate_up": self.gate_up, "down_proj": self.down_proj}
        weights = {name: layer.weight for name, layer in layers.items()}
        weights["head"] = self.head_weight
        for name, weight in weights.items():
            w = weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._int8[name] = (q.contiguous(), scale.to(torch.bfloat16))
        self._int8_names = {id(layer): name for name, layer in layers.items()}
        return self

    def _int8_linear(self, name: str, x: Tensor, bias: Tensor | None = None) -> Tensor:
        q, scale = self._int8[name]
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch._weight_int8pack_mm(flat, q, scale).float()
        if bias is not None:
            out = out + bias.float()
        return out.reshape(*x.shape[:-1], q.shape[0])

    def set_compute_dtype(self, dtype: torch.dtype) -> EagleHead:
        """Run the matmuls (projections and reduced LM head) in ``dtype``; returns self.

        bfloat16 makes ``step`` ~2x faster on CPUs with AVX512-BF16 (SmolLM2 sizes, N=8192:
        1.3-1.9 vs 3.4 ms per drafted token on 2 cores; the matmuls are memory-bound) and
        loses nothing the file kept: drafters are saved in bf16. Norms, RoPE, attention and
        the residual stay float32. Training needs float32 (AdamW updates are lost in bf16).
        """
        for layer in (self.fc, self.qkv, self.o_proj, self.gate_up, self.down_proj):
            layer.to(dtype)
        self.head_weight = self.head_weight.to(dtype)
        return self

    def _linear(self, layer: torch.nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)`` in the compute dtype, back in float32 (the residual stream's)."""
        if self._int8:
            return self._int8_linear(self._int8_names[id(layer)], x, layer.bias)
        return layer(x.to(self.compute_dtype)).float()

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.rms_norm(x, weight.shape, weight, self.config.rms_norm_eps)

    def _input(self, features: Tensor, tokens: Tensor) -> Tensor:
        """fc(concat(feature_t, embed(token_{t+1}))): ``[B, T, C]``."""
        emb = self.embedding[tokens].float()  # [B, T, C]
        if self.config.embedding_scale != 1.0:
            emb = emb * self.config.embedding_scale
        return self._linear(self.fc, torch.cat([features.float(), emb], dim=-1))

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, H, T, D]``, k and v ``[B, KVH, T, D]``, RoPE applied to q and k together."""
        cfg = self.config
        B, T, _ = x.shape
        qkv = self._linear(self.qkv, self._norm(x, self.attn_norm))  # [B, T, (H + 2 KVH) * D]
        qkv = qkv.view(B, T, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, : cfg.num_heads + cfg.num_kv_heads], cos, sin)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], qkv[:, -cfg.num_kv_heads :]

    def _output(
        self, x: Tensor, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Attention, then the SwiGLU MLP, with residuals: the predicted feature ``[B, T, C]``."""
        B, _, T, _ = q.shape
        attn = attend(q, keys, values, mask).transpose(1, 2).reshape(B, T, -1)  # [B, T, H * D]
        x = x + self._linear(self.o_proj, attn)
        gate, up = self._linear(self.gate_up, self._norm(x, self.ffn_norm)).chunk(2, dim=-1)
        return x + self._linear(self.down_proj, F.silu(gate) * up)

    def logits(self, pred: Tensor) -> Tensor:
        """Draft logits over the reduced vocabulary: ``[..., N]``."""
        normed = self._norm(pred, self.output_norm)
        if self._int8:
            return self._int8_linear("head", normed)
        return F.linear(normed.to(self.head_weight.dtype), self.head_weight).float()

    # -- entry points -------------------------------------------------------------------------

    def forward(self, features: Tensor, tokens: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """Training / full-sequence form: causal attention over the T given positions only.

        features ``[B, T, C]``, tokens ``[B, T]`` (tokens[:, t] follows features[:, t]) at RoPE
        positions ``start .. start + T - 1`` -> (predicted features ``[B, T, C]``, draft
        logits ``[B, T, N]``).
        """
        assert features.ndim == 3 and tokens.ndim == 2, "features [B, T, C], tokens [B, T]"
        T = tokens.shape[1]
        cos, sin = rope_tables(self.config.rope_base, self.config.head_dim, start + T)
        x = self._input(features, tokens)  # [B, T, C]
        q, k, v = self._qkv(x, cos[start:].to(x.device), sin[start:].to(x.device))
        pred = self._output(x, q, k, v)
        return pred, self.logits(pred)

    def forward_unrolled(
        self, features: Tensor, tokens: Tensor, steps: int
    ) -> list[tuple[Tensor, Tensor]]:
        """Drafting ``steps`` tokens from every position at once ("training-time test", as in
        EAGLE-3): step 0 is ``forward``; step j's input at position s is the head's *own*
        step j - 1 guess of feature s with the true token s + 1, attending as ``unrolled_mask``
        says. Along an accepted chain the drafted tokens equal the true ones, so step j at s
        is exactly the (j + 1)-th draft made from anchor s - j. Positions s < j have no
        anchor: their outputs are meaningless and must not count.

        Returns ``[(pred, logits)]`` per step, shapes as ``forward``'s.
        """
        T = tokens.shape[1]
        cos, sin = rope_tables(self.config.rope_base, self.config.head_dim, T)
        cos, sin = cos.to(features.device), sin.to(features.device)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        outputs: list[tuple[Tensor, Tensor]] = []
        inputs = features.float()
        for step in range(steps):
            if step:  # the guess of feature s was made at s - 1
                inputs = F.pad(outputs[-1][0][:, :-1], (0, 0, 1, 0))
            x = self._input(inputs, tokens)
            q, k, v = self._qkv(x, cos, sin)
            keys.append(k)
            values.append(v)
            mask = unrolled_mask(T, step, x.device) if step else None
            pred = self._output(x, q, torch.cat(keys, 2), torch.cat(values, 2), mask)
            outputs.append((pred, self.logits(pred)))
        return outputs

    @torch.inference_mode()
    def new_cache(self, max_len: int) -> EagleCache:
        """An empty cache for one sequence of up to ``max_len`` positions."""
        cfg = self.config
        shape = (cfg.num_kv_heads, max_len, cfg.head_dim)
        device = self.output_norm.device
        cos, sin = rope_tables(cfg.rope_base, cfg.head_dim, max_len)
        return EagleCache(
            keys=torch.zeros(shape, device=device),
            values=torch.zeros(shape, device=device),
            cos=cos.to(device),
            sin=sin.to(device),
        )

    @torch.inference_mode()
    def step(
        self,
        cache: EagleCache,
        features: Tensor,
        tokens: Tensor,
        start: int,
        window: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Inference for one sequence: features ``[T, C]`` and tokens ``[T]`` at positions
        ``start .. start + T - 1``, attending to the cached positions before ``start`` from
        ``cache.first`` on — and, with a ``window``, only to the last ``window`` positions
        up to the chunk's end (a T = 1 step then sees exactly its ``window`` last keys).

        Returns (pred ``[T, C]``, logits ``[T, N]``), equal to ``forward`` over the prefix
        the step attends to. Typical use: T > 1 once to catch up with the accepted tokens
        (their real features), then T = 1 per drafted token, feeding back its own ``pred``.
        """
        assert features.ndim == 2 and tokens.ndim == 1, "features [T, C], tokens [T]"
        end = start + tokens.shape[0]
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} is past the drafter cache ({cache.max_len})")
        if start < cache.first:
            raise ValueError(f"position {start} was skipped (the cache starts at {cache.first})")
        # Every query keeps at least its own chunk's keys (a chunk longer than the window
        # attends causally over itself).
        lo = cache.first if window is None else max(cache.first, min(start, end - window))
        x = self._input(features[None], tokens[None])  # (1, T, C)
        q, k, v = self._qkv(x, cache.cos[start:end], cache.sin[start:end])
        cache.keys[:, start:end] = k[0]
        cache.values[:, start:end] = v[0]
        keys, values = cache.keys[None, :, lo:end], cache.values[None, :, lo:end]
        pred = self._output(x, q, keys, values)
        return pred[0], self.logits(pred[0])

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Reduced head rows -> target token ids (same shape)."""
        return self.vocab_ids[draft_ids]

    def to_draft_ids(self, target_ids: Tensor) -> Tensor:
        """Target token ids -> reduced head rows, ``NO_DRAFT_ROW`` where the head has none."""
        return self.draft_index[target_ids]
