"""The causal LM: Llama family (Llama 2/3, SmolLM2, Qwen2, Mistral) and Gemma 3.

One implementation, switched by ``ModelConfig``: Gemma 3 adds qk-norm, norms after the
attention and MLP blocks, embedding scaling, tanh-GELU and sliding-window layers with their
own RoPE base. The residual stream is float32; linear layers run in the execution format's
dtype (bfloat16 for int4/bf16, float32 for fp32). Attention is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from specserve.model.config import ModelConfig
from specserve.model.embedding import EmbeddingRows
from specserve.model.kv_cache import POSITION_BLOCK, KVCache, round_up_to_block
from specserve.model.linear import matmul_rows_exact
from specserve.model.qlinear import PackedLinear, native_module


@dataclass(frozen=True)
class ForwardBatch:
    """What one forward processes: ``T`` new tokens for each of ``B`` sequences.

    Row b's tokens sit at positions ``starts[b] .. starts[b] + T - 1`` of cache slot
    ``slots[b]``; rows with fewer real tokens are padded (their extra logits are ignored).
    With ``lengths`` (row b's real tokens are its first ``lengths[b]``) the forward is
    *packed*: it returns the real positions only, row after row (``[sum(lengths), ...]``),
    and the native runtime computes nothing for the padding.
    """

    tokens: torch.Tensor  # [B, T] int64
    slots: list[int]
    starts: list[int]
    lengths: list[int] | None = None


def rope_tables(base: float, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_len, head_dim]`` for rotate-half RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, heads, T, D]``, cos/sin ``[B, 1, T, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def probs_times_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs @ values`` summed block by block over POSITION_BLOCK keys.

    probs ``[B, KVH, M, L]``, values ``[B, KVH, L, D]`` with L a multiple of the block.
    One GEMM over all L would pick its summation blocking from L, so a verify forward (which
    reads a few more keys) would round differently from a single step; fixed 64-key blocks
    followed by an in-order sum over blocks give every row the same arithmetic whatever L
    and M are (trailing masked blocks add exact zeros).
    """
    B, H, M, L = probs.shape
    blocks = L // POSITION_BLOCK
    p = probs.view(B, H, M, blocks, POSITION_BLOCK).transpose(2, 3)  # [B, H, nb, M, blk]
    v = values.view(B, H, blocks, POSITION_BLOCK, values.shape[-1])  # [B, H, nb, blk, D]
    return matmul_rows_exact(p, v).sum(dim=2)  # [B, H, M, D]


class Block(torch.nn.Module):
    """One decoder layer. ``qkv`` and ``gate_up`` are fused projections."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        modules: dict[str, torch.nn.Module],
        norms: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.sliding = config.is_sliding(layer)
        self.qkv = modules["qkv"]
        self.attn_output = modules["attn_output"]
        self.gate_up = modules["gate_up"]
        self.ffn_down = modules["ffn_down"]
        for name, weight in norms.items():
            self.register_buffer(name, weight)
        self.gemma = config.architecture == "gemma3"
        self.act = (
            (lambda x: F.gelu(x, approximate="tanh"))
            if config.activation == "gelu_tanh"
            else F.silu
        )

    def native_plan(self) -> tuple | None:
        """The layer's arguments for ``_native.layer_forward`` (one call per layer), or None
        where a projection is not packed or a shape is not one the native layer takes."""
        cfg = self.config
        linears = (self.qkv, self.attn_output, self.gate_up, self.ffn_down)
        if cfg.activation not in ("silu", "gelu_tanh"):
            return None
        packed = [m for m in linears if isinstance(m, PackedLinear)]
        if len(packed) != 4 or any(m.out_features != m.padded for m in packed):
            return None  # not packed, or a part whose rows are not whole tiles
        if cfg.head_dim % 16 or cfg.hidden_size % 16 or any(m.bias is not None for m in packed[1:]):
            return None
        bias = packed[0].bias
        dims = (
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        )  # fmt: skip
        gemma_norms = ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")
        norms = tuple(getattr(self, name).data_ptr() for name in ("attn_norm", "ffn_norm"))
        extra = tuple(getattr(self, n).data_ptr() if self.gemma else 0 for n in gemma_norms)
        weights = (*norms, 0 if bias is None else bias.data_ptr(), *extra)
        window = (cfg.sliding_window or 0) if self.sliding else 0
        options = (window, int(cfg.activation == "gelu_tanh"))
        return dims, weights, tuple(m.spec for m in packed), options

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight: torch.Tensor = getattr(self, name)
        return F.rms_norm(x, weight.shape, weight, self.config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The residual stream ``x`` ``[B, T, C]`` float32 through attention, then the MLP."""
        x = x + self.attention(x, batch, cache, rope, mask, dtype)
        return x + self.mlp(x, dtype)

    def attention(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Self-attention over the cache (this forward's keys written first): what the layer
        adds to the residual stream, ``[B, T, C]`` float32."""
        cfg = self.config
        B, T, _ = x.shape
        q, k, v = self._project_qkv(x, rope, dtype)
        keys, values = cache.update(
            self.layer,
            batch.slots,
            batch.starts,
            k.to(cache.keys.dtype),
            v.to(cache.keys.dtype),
            read_len=mask.shape[-1],
        )
        group = cfg.num_heads // cfg.num_kv_heads
        # GQA without repeating K/V: fold the query heads of one KV head into rows.
        q = q.reshape(B, cfg.num_kv_heads, group * T, cfg.head_dim) * cfg.attention_scale
        scores = matmul_rows_exact(q, keys.float().transpose(-1, -2))  # [B, KVH, G*T, L]
        scores = scores.view(B, cfg.num_kv_heads, group, T, -1) + mask
        probs = scores.softmax(dim=-1).view(B, cfg.num_kv_heads, group * T, -1)
        attn = probs_times_values(probs, values).reshape(B, cfg.num_heads, T, cfg.head_dim)
        attn = attn.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        out = self.attn_output(attn.to(dtype)).float()
        if self.gemma:
            out = self.norm(out, "post_attention_norm")
        return out

    def _project_qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, H, T, D]`` and keys ``[B, KVH, T, D]`` (qk-normed for Gemma, RoPE
        applied), values ``[B, KVH, T, D]``; float32."""
        cfg = self.config
        B, T, _ = x.shape
        h = self.norm(x, "attn_norm").to(dtype)
        qkv = self.qkv(h).float()  # [B, T, (H + 2 KVH) * D]
        qk, v = qkv.split(
            [(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim],
            dim=-1,
        )
        qk = qk.view(B, T, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.gemma:
            q = self.norm(qk[:, : cfg.num_heads], "attn_q_norm")
            k = self.norm(qk[:, cfg.num_heads :], "attn_k_norm")
            qk = torch.cat([q, k], dim=1)
        qk = apply_rope(qk, *rope)  # [B, H + KVH, T, D]
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], v

    def mlp(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gated MLP: what it adds to the residual stream ``x``, ``[B, T, C]`` float32."""
        h = self.norm(x, "ffn_norm").to(dtype)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        out = self.ffn_down(self.act(gate) * up).float()
        if self.gemma:
            out = self.norm(out, "post_ffw_norm")
        return out


class CausalLM(torch.nn.Module):
    """Token ids at positions -> next-token logits, reading and writing a ``KVCache``."""

    # Buffers (declared for the type checker; registered in __init__).
    embedding: torch.Tensor  # [V, C]
    output_norm: torch.Tensor  # [C]
    cos: torch.Tensor  # [max_len, D]
    sin: torch.Tensor
    cos_local: torch.Tensor
    sin_local: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        embedding: torch.Tensor | EmbeddingRows,
        blocks: list[Block],
        output_norm: torch.Tensor,
        lm_head: torch.nn.Module,
        dtype: torch.dtype,
        max_len: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype  # compute dtype of the linear layers
        # A quantized table stays the file's rows (see embedding.py): the buffer is made only
        # if something asks for the whole table (``__getattr__``).
        self.embedding_rows = embedding if isinstance(embedding, EmbeddingRows) else None
        if not isinstance(embedding, EmbeddingRows):
            self.register_buffer("embedding", embedding)  # [V, C] in dtype
        self.blocks = torch.nn.ModuleList(blocks)
        self.register_buffer("output_norm", output_norm)
        self.lm_head = lm_head
        self.max_len = max_len
        self._plans: list[tuple] | None = None  # see native_plans
        self._plans_ready = False
        cos, sin = rope_tables(config.rope_base, config.head_dim, max_len)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        local = config.rope_local_base or config.rope_base
        cos_local, sin_local = rope_tables(local, config.head_dim, max_len)
        self.register_buffer("cos_local", cos_local)
        self.register_buffer("sin_local", sin_local)

    def __getattr__(self, name: str) -> torch.Tensor | torch.nn.Module:
        rows = self.__dict__.get("embedding_rows")
        if name == "embedding" and rows is not None and "embedding" not in self._buffers:
            self._buffers["embedding"] = rows.dense()  # first whole-table use: materialize
        return super().__getattr__(name)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> float32 embeddings ``[B, T, C]``."""
        if self.embedding_rows is not None:
            return self.embedding_rows.lookup(tokens)
        return self.embedding[tokens].float()

    def new_cache(self, num_slots: int = 1, max_len: int | None = None) -> KVCache:
        # float32 like the attention math: a bf16 cache would be cast back every layer and
        # step (a copy of the whole context); small models have small caches.
        cache_dtype = torch.float32
        return KVCache(
            self.config, num_slots, max_len or self.max_len, cache_dtype, self.output_norm.device
        )

    def _masks(self, positions: torch.Tensor, read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks ``[B, 1, 1, T, L]``: causal, and causal within the sliding window."""
        keys = torch.arange(read_len, device=positions.device)
        query = positions[:, None, None, :, None]
        allowed = keys <= query
        causal = torch.zeros(allowed.shape, device=positions.device).masked_fill(
            ~allowed, float("-inf")
        )
        window = self.config.sliding_window
        if window is None:
            return causal, causal
        in_window = allowed & (keys > query - window)
        sliding = torch.zeros(allowed.shape, device=positions.device).masked_fill(
            ~in_window, float("-inf")
        )
        return causal, sliding

    def forward(
        self,
        batch: ForwardBatch,
        cache: KVCache,
        last_logits: int | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` in float32 (``[B, n, V]``: the last ``last_logits`` = n
        positions only)."""
        return self.forward_with_features(batch, cache, last_logits)[0]

    def _native_layers(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, plans: list[tuple]
    ) -> torch.Tensor:
        """Every layer in native code (``Block.native_plan``): x ``[B, T, C]`` float32."""
        B, T, C = x.shape
        lengths = [T] * B if batch.lengths is None else batch.lengths
        if max(batch.slots) >= cache.num_slots or min(batch.slots) < 0:
            raise ValueError(f"cache slot out of range (cache has {cache.num_slots})")
        rows = x.reshape(-1, C).contiguous()  # B * T rows, or the packed rows
        counts = torch.tensor(lengths, dtype=torch.int64)
        slots = torch.tensor(batch.slots, dtype=torch.int64).repeat_interleave(counts)
        positions = torch.cat(
            [torch.arange(s, s + n) for s, n in zip(batch.starts, lengths, strict=True)]
        )
        self._run_native_layers(rows, slots, positions, cache, plans)
        return rows if batch.lengths is not None else rows.view(B, T, C)

    def _run_native_layers(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        plans: list[tuple],
    ) -> None:
        """``rows`` ``[M, C]`` through every layer, in place; row i at (slot, position) i."""
        cfg = self.config
        native = native_module()
        keys, values = cache.keys, cache.values
        tables = (self.cos.data_ptr(), self.sin.data_ptr())
        local = (self.cos_local.data_ptr(), self.sin_local.data_ptr())  # Gemma's window layers
        scalars = (cache.max_len, cfg.rms_norm_eps, cfg.attention_scale)
        layers = zip(self.blocks, plans, strict=True)
        for layer, (block, (dims, weights, parts, options)) in enumerate(layers):
            kv = (keys[layer].data_ptr(), values[layer].data_ptr())
            rope = local if block.sliding else tables  # as the PyTorch layers choose
            native.layer_forward(
                rows.data_ptr(), rows.shape[0], slots.data_ptr(), positions.data_ptr(),
                (*dims, *scalars, *weights, *rope, *kv, *options), parts,
            )  # fmt: skip

    @torch.inference_mode()
    def forward_with_features(
        self,
        batch: ForwardBatch,
        cache: KVCache,
        last_logits: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits as `forward` (or ``[B, n, V]`` of the last ``last_logits`` = n positions),
        and the features ``[B, T, C]`` of every position: the last hidden states before the
        final norm, float32 — what EAGLE-style drafters read."""
        tokens = batch.tokens
        assert tokens.ndim == 2, "tokens must be [B, T]"
        T = tokens.shape[1]
        end = max(batch.starts) + T
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache ({cache.max_len})")
        plans = self.native_plans() if cache.keys.dtype == torch.float32 else None
        if batch.lengths is not None:
            return self._forward_packed(batch, cache, plans)
        x = self._embed_scaled(tokens)
        if plans is not None:
            return self._finish(self._native_layers(x, batch, cache, plans), last_logits)
        offsets = torch.arange(T, device=tokens.device)
        positions = torch.tensor(batch.starts, device=tokens.device)[:, None] + offsets  # [B, T]
        read_len = round_up_to_block(end)  # see POSITION_BLOCK: exactness across T
        causal, sliding = self._masks(positions, read_len)
        rope = (self.cos[positions][:, None], self.sin[positions][:, None])
        rope_local = rope
        if self.config.sliding_window is not None:  # Gemma's local layers: own RoPE base
            rope_local = (self.cos_local[positions][:, None], self.sin_local[positions][:, None])
        for block in self.blocks:
            if block.sliding:
                x = block(x, batch, cache, rope_local, sliding, self.dtype)
            else:
                x = block(x, batch, cache, rope, causal, self.dtype)
        return self._finish(x, last_logits)

    def _forward_packed(
        self, batch: ForwardBatch, cache: KVCache, plans: list[tuple] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[M, V]`` and features ``[M, C]`` of the real positions only (``M`` =
        ``sum(batch.lengths)``), row after row; natively nothing else is computed."""
        index = self._packed_index(batch)
        if plans is None:  # the PyTorch layers: the padded forward, then its real rows
            logits, features = self.forward_with_features(replace(batch, lengths=None), cache)
            return logits.flatten(0, 1)[index], features.flatten(0, 1)[index]
        x = self._embed_scaled(batch.tokens.flatten()[index][None])  # [1, M, C]
        logits, features = self._finish(self._native_layers(x, batch, cache, plans)[None], None)
        return logits[0], features[0]

    def _embed_scaled(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.config.embedding_scale != 1.0:
            # Gemma scales in the weights' dtype, as the reference implementation does.
            x = x * torch.tensor(self.config.embedding_scale, dtype=self.dtype).float()
        return x

    @staticmethod
    def _packed_index(batch: ForwardBatch) -> torch.Tensor:
        """Indices of the real positions in the flattened ``[B * T]`` rows, row after row."""
        assert batch.lengths is not None and len(batch.lengths) == len(batch.slots)
        T = batch.tokens.shape[1]
        if not all(1 <= n <= T for n in batch.lengths):
            raise ValueError(f"row lengths must be in 1..{T}, got {batch.lengths}")
        return torch.cat([torch.arange(b * T, b * T + n) for b, n in enumerate(batch.lengths)])

    def packs_rows(self, cache: KVCache) -> bool:
        """Whether a packed forward (``ForwardBatch.lengths``) skips the padding's compute:
        the native runtime does; the PyTorch layers compute the padded batch and drop it."""
        return cache.keys.dtype == torch.float32 and self.native_plans() is not None

    def native_plans(self) -> list[tuple] | None:
        """Each layer's native arguments when every layer runs natively (computed once)."""
        if not self._plans_ready:
            plans = [block.native_plan() for block in self.blocks if isinstance(block, Block)]
            ok = len(plans) == len(self.blocks) and all(p is not None for p in plans)
            self._plans = [p for p in plans if p is not None] if ok else None
            self._plans_ready = True
        return self._plans

    def _finish(
        self, features: torch.Tensor, rows: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm and LM head over the last hidden states ``[B, T, C]`` (of the last
        ``rows`` positions only, when given)."""
        x = features if rows is None else features[:, -rows:]
        x = F.rms_norm(x, self.output_norm.shape, self.output_norm, self.config.rms_norm_eps)
        return self.lm_head(x.to(self.dtype)).float(), features
