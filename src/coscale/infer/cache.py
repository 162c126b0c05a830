"""The paged latent KV cache: fixed-size blocks of (c_kv, k_pe) per layer, and their allocator.

Shape legend: L cache layers (the model's layers, then one per MTP module), NB blocks, BS block_size
tokens per block, c kv_lora_rank, dr qk_rope_head_dim, nt = ceil(c / 128) FP8 scale tiles.

MLA caches per token and layer only the latent c_kv and the RoPE key k_pe (DeepSeek-V2 section 2.1.3),
576 numbers for DeepSeek-V3. The cache is cut into blocks of `block_size` tokens; a sequence owns a list
of blocks (its block table), so memory is taken and returned block by block as requests come and go
and no sequence needs a contiguous region (vLLM's PagedAttention). Token position p of a sequence lives
in block block_table[p // BS], row p % BS: its slot is block * BS + p % BS.

Formats (`kv_cache_dtype`):
- "bf16": latent [L, NB, BS, c] and rope [L, NB, BS, dr] in the model's compute dtype (BF16 on a GPU;
  CPU tests run float32/float64 models, whose caches then keep that precision);
- "fp8": FlashMLA's "FP8 with scale": the latent in float8_e4m3fn, one float32 scale per 1x128 tile
  (scale [L, NB, BS, nt]), the RoPE part unquantized. 656 bytes per token and layer at c = 512, dr = 64
  (512 + 4 x 4 + 64 x 2) against 1152 for BF16. The quantization is
  coscale.kernels.mla_decode.quantize_latent_fp8, which the decode kernel and its reference undo.
  The model writes a step's tokens with ``PagedLatentCache.write`` (in place, also under torch.compile)
  and reads a layer through ``layer(i)`` (gather_latent there reads its slots).

Block 0 is never handed out: padded rows of a batch (CUDA-graph padding) write into it and read from it.
"""

from __future__ import annotations

import math

import torch

from coscale.errors import ConfigError
from coscale.kernels.mla_decode import FP8_TILE, LatentCacheLayer, quantize_latent_fp8

KV_CACHE_DTYPES = ("bf16", "fp8")
NULL_BLOCK = 0


def bytes_per_token(num_layers: int, kv_lora_rank: int, rope_dim: int, kv_cache_dtype: str,
                    element_size: int = 2) -> int:
    """Cache bytes one token takes over all layers; element_size: bytes of the unquantized dtype."""
    if kv_cache_dtype == "fp8":
        per_layer = kv_lora_rank + 4 * math.ceil(kv_lora_rank / FP8_TILE) + rope_dim * element_size
    else:
        per_layer = (kv_lora_rank + rope_dim) * element_size
    return num_layers * per_layer


class BlockAllocator:
    """A free list of block ids 1..num_blocks (block 0 is the padding block)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV-cache blocks, {len(self._free)} free")  # scheduler bug
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class PagedLatentCache:
    """The cache tensors of every layer; `layer(i)` is what the model's attention reads and writes."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 kv_cache_dtype: str = "bf16", dtype: torch.dtype = torch.bfloat16, device=None):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {block_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_cache_dtype, self.dtype = kv_cache_dtype, dtype
        shape = (num_layers, num_blocks + 1, block_size)  # + the padding block 0
        fp8 = kv_cache_dtype == "fp8"
        self.latent = torch.zeros(*shape, kv_lora_rank, device=device,
                                  dtype=torch.float8_e4m3fn if fp8 else dtype)
        self.rope = torch.zeros(*shape, rope_dim, device=device, dtype=dtype)
        self.scale = (torch.ones(*shape, math.ceil(kv_lora_rank / FP8_TILE), device=device, dtype=torch.float32)
                      if fp8 else None)

    def layer(self, i: int) -> LatentCacheLayer:
        return LatentCacheLayer(self.latent[i], self.rope[i], None if self.scale is None else self.scale[i])

    def write(self, i: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store layer i's c_kv [N, c] and k_pe [N, dr] at slots [N] (block * BS + row), quantizing for
        FP8. One index_put_ into each whole-cache tensor, not into a view of layer i: torch.compile turns
        a write through a view of a graph input into copies of the whole input (the cache, gigabytes),
        a write into the input itself into an in-place scatter that Inductor fuses with the ops that
        produce c_kv and k_pe."""
        index = (torch.full_like(slots, i), slots // self.block_size, slots % self.block_size)
        if self.scale is None:
            self.latent.index_put_(index, c_kv.to(self.latent.dtype))
        else:
            q, scale = quantize_latent_fp8(c_kv)
            self.latent.index_put_(index, q)
            self.scale.index_put_(index, scale)
        self.rope.index_put_(index, k_pe.to(self.rope.dtype))

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def bytes_per_token(self) -> int:
        return bytes_per_token(self.num_layers, self.latent.shape[-1], self.rope.shape[-1], self.kv_cache_dtype,
                               self.rope.element_size())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latent, self.rope, self.scale) if t is not None)
