"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; DeepSeek-V3 report section 2.1.1).

Shape legend: B batch, S query length, T key length, n heads, H hidden, c kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, r q_lora_rank.

    c_q   = RMSNorm(W_DQ x)                       (B, S, r)      [skipped when q_lora_rank is None]
    q     = W_UQ c_q -> [q_nope (dn) | q_pe (dr)] per head, q_pe rotated
    c_kv  = RMSNorm(W_DKV x)                      (B, S, c)      <- cached
    k_pe  = RoPE(W_KR x)                          (B, S, dr)     <- cached, one key shared by all heads
    [k_nope | v] = W_UKV c_kv                     (B, S, n, dn + dv)
    o     = softmax((q_nope.k_nope + q_pe.k_pe) * scale) v ;   out = W_O o

Two paths with the same outputs:
- naive: decompress K and V per head, then standard attention (training and prefill);
- absorbed (decoding): W_UK is folded into the query (q_nope W_UK lives in the c-dim latent space) and
  W_UV into the output, so attention runs directly over the cache of c_kv and k_pe: per token and
  layer only c + dr numbers are stored (576 for DeepSeek-V3, vs 2 * 128 * 128 for MHA).

Serving (`forward_paged`): a flat batch of N tokens from many sequences, each at its own position, with
the cache in fixed-size blocks (coscale.infer.cache). The decode tokens come first and take the absorbed
path through the MLA decode kernel; prefill chunks follow and take the naive path: their context is
read back from the cache, decompressed with W_UKV and attended with a fused kernel for q/k dim
dn + dr and v dim dv (coscale.kernels.attention), as vLLM and SGLang do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coscale.config import ModelConfig
from coscale.kernels.attention import flash_attention
from coscale.kernels.mla_decode import gather_latent, paged_mla_decode
from coscale.model.fused_weights import StackedWeights
from coscale.model.norm import RMSNorm, upcast
from coscale.model.rope import apply_rope


@dataclass
class PagedAttentionMetadata:
    """Where the tokens of a flat batch go in the paged latent cache and what each attends to; built by
    the serving engine (coscale.infer.batch). Tokens are laid out [decode tokens | prefill tokens]:

    - decode: `num_decode_tokens / decode_len` sequences of `decode_len` tokens each (1, or 1 + MTP
      drafts), attending over block_table [B, W] int32 and seq_lens [B] int32 (keys, the new tokens
      included); max_seq_len bounds seq_lens (a host int: it sizes the kernel's context split);
    - prefill: G chunks packed; cu_seqlens_q [G + 1] int32 offsets into the prefill tokens,
      cu_seqlens_k [G + 1] offsets into context_slots [sum k_len] int64, the cache slots of each chunk's
      whole context (cached tokens and the chunk itself), max_prefill_len the longest chunk.
    `cache.layer(i)` is layer i's coscale.kernels.mla_decode.LatentCacheLayer; slots [N] int64 is where
    each token's c_kv and k_pe are written; kernel_backend is passed to the kernels ("auto", "triton",
    "torch")."""

    cache: Any
    slots: torch.Tensor
    num_decode_tokens: int = 0
    decode_len: int = 1
    block_table: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    max_prefill_len: int = 0
    kernel_backend: str = "auto"


class LatentKVCache:
    """Per-layer cache of the compressed latent c_kv [B, T, c] and the shared RoPE key [B, T, dr]."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, n_layers: int | None = None,
                 device=None, dtype=torch.float32):
        n_layers = cfg.num_hidden_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.kv = [torch.zeros(batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(n_layers)]
        self.pe = [torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
                   for _ in range(n_layers)]

    def update(self, layer: int, start_pos: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Write positions [start_pos, start_pos + S) and return views of everything up to there."""
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.kv[layer][:, start_pos:end] = c_kv.to(self.kv[layer].dtype)
        self.pe[layer][:, start_pos:end] = k_pe.to(self.pe[layer].dtype)
        return self.kv[layer][:, :end], self.pe[layer][:, :end]

    def bytes_per_token(self) -> int:
        return sum(t.shape[-1] * t.element_size() for t in self.kv + self.pe)


class MLA(StackedWeights, nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.softmax_scale = cfg.softmax_scale
        h, n, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, n * (self.dn + self.dr), bias=False)
        else:
            self.q_proj = nn.Linear(h, n * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(n * self.dv, h, bias=bias)

    def stacked_layers(self) -> tuple[nn.Module, ...]:
        """The two projections of x, stacked by `stack_weights()` into one GEMM at inference."""
        return (self.q_a_proj if self.q_lora_rank else self.q_proj), self.kv_a_proj_with_mqa

    def _project(self, x, cos, sin):
        """Queries (B,S,n,dn), (B,S,n,dr) and the cacheable c_kv (B,S,c), k_pe (B,S,dr)."""
        B, S, _ = x.shape
        if self.stacked_weight is not None and not torch.is_grad_enabled():  # [q or q_a; kv_a] in one GEMM
            q, kv = F.linear(x, self.stacked_weight).split(
                [self.stacked_weight.shape[0] - self.kv_lora_rank - self.dr, self.kv_lora_rank + self.dr], dim=-1)
        else:
            q_in, kv_a = self.stacked_layers()
            q, kv = q_in(x), kv_a(x)
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, S, self.n_heads, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, q_pe, c_kv, k_pe

    def forward(self, x, cos, sin, start_pos: int = 0, cache: LatentKVCache | None = None):
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        if cache is None and start_pos == 0:
            o = self._attend_naive(q_nope, q_pe, c_kv, k_pe)
        else:
            if cache is not None:
                c_kv, k_pe = cache.update(self.layer_idx, start_pos, c_kv, k_pe)
            o = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, start_pos)
        return self.o_proj(o.flatten(2))

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe):
        """Decompress K/V per head and run causal attention; returns (B, S, n, dv)."""
        B, S, n, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, n, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, n, self.dr)], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=self.softmax_scale,
        )
        return o.transpose(1, 2)

    def absorbed_weights(self):
        """W_UK (n, dn, c) and W_UV (n, dv, c) as views of kv_b_proj's weight (of its dequantized copy
        when serving an FP8 checkpoint: coscale.infer.layers.FP8InferenceLinear)."""
        w = self.kv_b_proj.weight
        if hasattr(self.kv_b_proj, "dequantized_weight"):
            w = self.kv_b_proj.dequantized_weight()
        w = w.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        return w[:, : self.dn], w[:, self.dn :]

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, start_pos: int):
        """Attention over the latent cache: c_kv (B, T, c), k_pe (B, T, dr); returns (B, S, n, dv)."""
        w_uk, w_uv = self.absorbed_weights()
        S, T = q_nope.shape[1], c_kv.shape[1]
        q_lat = torch.einsum("bshd,hdc->bshc", upcast(q_nope), upcast(w_uk))  # W_UK absorbed
        scores = torch.einsum("bshc,btc->bsht", q_lat, upcast(c_kv))
        scores = scores + torch.einsum("bshr,btr->bsht", upcast(q_pe), upcast(k_pe))
        scores = scores * self.softmax_scale
        q_pos = torch.arange(start_pos, start_pos + S, device=scores.device)
        # Keys cover positions [start_pos + S - T, start_pos + S): the whole cache, or (no cache) this chunk.
        k_pos = torch.arange(T, device=scores.device) + (start_pos + S - T)
        mask = k_pos[None, :] > q_pos[:, None]  # (S, T): future keys
        scores = scores.masked_fill(mask[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        o_lat = torch.einsum("bsht,btc->bshc", probs, upcast(c_kv))
        o = torch.einsum("bshc,hdc->bshd", o_lat, upcast(w_uv))  # W_UV absorbed
        return o.to(q_nope.dtype)

    # ---- serving: a flat batch over the paged cache ----------------------------------------------
    def forward_paged(self, x, cos, sin, meta: PagedAttentionMetadata):
        """x (1, N, H) tokens of many sequences, cos/sin (N, dr/2) at each token's position; writes the
        tokens' c_kv and k_pe into cache layer `layer_idx`, then attends (module docstring)."""
        q_nope, q_pe, c_kv, k_pe = (t[0] for t in self._project(x, cos, sin))  # (N, n, dn), ..., (N, dr)
        meta.cache.write(self.layer_idx, meta.slots, c_kv, k_pe)
        layer = meta.cache.layer(self.layer_idx)
        D, N = meta.num_decode_tokens, x.shape[1]
        parts = []
        if D:
            parts.append(self._decode_paged(q_nope[:D], q_pe[:D], layer, meta))
        if N > D:
            parts.append(self._prefill_paged(q_nope[D:], q_pe[D:], layer, meta))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)  # (N, n, dv)
        return self.o_proj(o.flatten(1)).unsqueeze(0)

    def _decode_paged(self, q_nope, q_pe, layer, meta: PagedAttentionMetadata):
        """Absorbed attention of (B * decode_len, n, .) queries over the latent cache; (., n, dv)."""
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk.to(q_nope.dtype))  # W_UK absorbed
        B, S = q_nope.shape[0] // meta.decode_len, meta.decode_len
        o_lat, _ = paged_mla_decode(
            q_lat.view(B, S, self.n_heads, -1), q_pe.reshape(B, S, self.n_heads, -1), layer, meta.block_table,
            meta.seq_lens, self.softmax_scale, meta.max_seq_len, meta.kernel_backend,
        )
        return torch.einsum("thc,hdc->thd", o_lat.flatten(0, 1), w_uv.to(o_lat.dtype))  # W_UV absorbed

    def _prefill_paged(self, q_nope, q_pe, layer, meta: PagedAttentionMetadata):
        """Naive attention of packed prefill chunks over their cached contexts; (P, n, dv)."""
        c_kv, k_pe = gather_latent(layer, meta.context_slots, q_nope.dtype)  # (T, c), (T, dr)
        T, n = c_kv.shape[0], self.n_heads
        k_nope, v = self.kv_b_proj(c_kv).view(T, n, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(T, n, self.dr)], dim=-1)
        return flash_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_prefill_len,
                               self.softmax_scale, causal=True, backend=meta.kernel_backend)
