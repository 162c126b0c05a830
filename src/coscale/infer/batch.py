"""One step's flat batch: the tokens of every scheduled request, their positions and cache slots.

Layout [decode tokens | prefill tokens] (coscale.model.mla.PagedAttentionMetadata): each decoding
request contributes its last token followed by its MTP drafts (decode_len = 1 + drafts tokens, the same
for all), each prefilling request a chunk of its prompt. The tensors are built on the host in one go and
copied to the device once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coscale.infer.cache import PagedLatentCache
from coscale.infer.scheduler import ScheduledRequest
from coscale.model.mla import PagedAttentionMetadata


@dataclass
class Batch:
    scheduled: list[ScheduledRequest]
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    meta: PagedAttentionMetadata
    rows: list[range]  # per scheduled request, its rows in the flat batch
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def _slots(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


def block_table(requests, width: int) -> torch.Tensor:
    """[B, width] int32 (block 0 pads: the padding block)."""
    return torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in requests], dtype=torch.int32)


def build_batch(scheduled: list[ScheduledRequest], cache: PagedLatentCache, device, table_width: int,
                kernel_backend: str = "auto") -> Batch:
    """The flat batch for `scheduled` (decodes first, as the scheduler orders them). Built in Python
    lists and turned into a handful of tensors: a decode step's host work stays small at batch 128."""
    bs = cache.block_size
    ids, positions, slots, rows = [], [], [], []
    decodes = [s for s in scheduled if s.is_decode]
    prefills = [s for s in scheduled if not s.is_decode]
    for s in decodes + prefills:
        r, start = s.request, s.start
        tokens = r.tokens(start, start + s.num_tokens) if not s.is_decode else [r.token(start)] + r.drafts
        rows.append(range(len(ids), len(ids) + len(tokens)))
        ids += tokens
        positions += range(start, start + len(tokens))
        slots += _slots(r.blocks, start, start + len(tokens), bs)
    decode_len = rows[0].stop - rows[0].start if decodes else 1
    to = dict(device=device, non_blocking=True)
    meta = PagedAttentionMetadata(
        cache=cache, slots=torch.tensor(slots, dtype=torch.long).to(**to), num_decode_tokens=len(decodes) * decode_len,
        decode_len=decode_len, kernel_backend=kernel_backend,
    )
    if decodes:
        seq_lens = [s.start + decode_len for s in decodes]
        meta.block_table = block_table([s.request for s in decodes], table_width).to(**to)
        meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32).to(**to)
        meta.max_seq_len = max(seq_lens)
    if prefills:
        q_lens = [s.num_tokens for s in prefills]
        k_lens = [s.start + s.num_tokens for s in prefills]
        meta.cu_seqlens_q = _offsets(q_lens).to(**to)
        meta.cu_seqlens_k = _offsets(k_lens).to(**to)
        meta.context_slots = torch.cat([_context_slots(s.request.blocks, k, bs) for s, k in zip(prefills, k_lens)])
        meta.context_slots = meta.context_slots.to(**to)
        meta.max_prefill_len = max(q_lens)
    return Batch(decodes + prefills, torch.tensor(ids, dtype=torch.long).to(**to),
                 torch.tensor(positions, dtype=torch.long).to(**to), meta, rows, len(decodes))


def _context_slots(blocks: list[int], length: int, block_size: int) -> torch.Tensor:
    """Slots of positions [0, length) (vectorized: contexts run to tens of thousands of tokens)."""
    pos = torch.arange(length)
    return torch.tensor(blocks, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out
