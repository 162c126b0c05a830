"""One step's flat batch: the tokens of every scheduled request, their positions and cache slots.

Layout [decode tokens | prefill tokens] (coscale.model.mla.PagedAttentionMetadata): each decoding
request contributes its last token followed by its MTP drafts (decode_len = 1 + drafts tokens, the same
for all), each prefilling request a chunk of its prompt. The integers are gathered in Python lists,
packed into one int64 tensor and copied to the device once per step through pinned memory (no host
sync: infer/transfer.py); the metadata tensors are views of that copy.

Two things the engine asks for:
- `pad_to`: a decode-only batch that will replay a CUDA graph of that many sequences comes padded to
  it (graphs.py: padding rows write and read only the padding block), so that loading the graph's
  static buffers is a few whole-tensor copies;
- `pending`: with the overlapped schedule (docs/serving.md) a request's last token may still be on
  the GPU, sampled by the step in flight; its placeholder (PLACEHOLDER in output_ids) is replaced on
  the device by that step's token (`pending` maps the request to its row in `pending_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coscale.infer.cache import PagedLatentCache
from coscale.infer.scheduler import PLACEHOLDER, ScheduledRequest
from coscale.infer.transfer import to_device
from coscale.model.mla import PagedAttentionMetadata


@dataclass
class Batch:
    scheduled: list[ScheduledRequest]
    input_ids: torch.Tensor  # [N'] int64 (N' = num_tokens, or more with graph padding)
    positions: torch.Tensor  # [N'] int64
    meta: PagedAttentionMetadata
    rows: list[range]  # per scheduled request, its rows in the flat batch
    num_decodes: int
    num_tokens: int = 0  # the real tokens (rows after them are graph padding)
    sample_rows: torch.Tensor | None = None  # [R] the last row of each request that samples (None: 0..R-1)

    @property
    def padded(self) -> bool:
        return self.input_ids.shape[0] > self.num_tokens


def _slots(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


def block_table(requests, width: int) -> torch.Tensor:
    """[B, width] int32 (block 0 pads: the padding block)."""
    return torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in requests], dtype=torch.int32)


def build_batch(scheduled: list[ScheduledRequest], cache: PagedLatentCache, device, table_width: int,
                kernel_backend: str = "auto", *, pad_to: int | None = None, pending: dict | None = None,
                pending_tokens: torch.Tensor | None = None) -> Batch:
    """The flat batch for `scheduled` (decodes first, as the scheduler orders them; module docstring).
    The block table is as wide as the longest sequence's block list (at most table_width): what the
    decode kernel reads of a row ends with the sequence's own blocks."""
    device = torch.device(device)
    bs = cache.block_size
    ids, positions, slots, rows = [], [], [], []
    fix_dst, fix_src = [], []
    decodes = [s for s in scheduled if s.is_decode]
    prefills = [s for s in scheduled if not s.is_decode]
    for s in decodes + prefills:
        r, start = s.request, s.start
        if s.is_decode:
            first = r.token(start)
            if first == PLACEHOLDER:  # sampled by the step in flight: filled in on the device below
                fix_dst.append(len(ids))
                fix_src.append(pending[r])
                first = 0
            tokens = [first] + r.drafts
        else:
            tokens = r.tokens(start, start + s.num_tokens)
        rows.append(range(len(ids), len(ids) + len(tokens)))
        ids += tokens
        positions += range(start, start + len(tokens))
        slots += _slots(r.blocks, start, start + len(tokens), bs)
    num_tokens = len(ids)
    decode_len = rows[0].stop - rows[0].start if decodes else 1
    B = len(decodes)
    seq_lens = [s.start + decode_len for s in decodes]
    if pad_to is not None and pad_to > B and not prefills:  # padding sequences: positions 0 .. S-1 of block 0
        pad = list(range(decode_len)) * (pad_to - B)
        ids += [0] * len(pad)
        positions += pad
        slots += pad
        seq_lens += [decode_len] * (pad_to - B)
        B = pad_to
    width = min(table_width, max(len(s.request.blocks) for s in decodes)) if decodes else 0
    table = []
    for s in decodes:
        table += s.request.blocks
        table += [0] * (width - len(s.request.blocks))
    table += [0] * (width * (B - len(decodes)))
    samplers = [i for i, s in enumerate(decodes + prefills) if s.samples]
    sample_rows = [rows[i].stop - 1 for i in samplers]
    if sample_rows == list(range(len(sample_rows))):
        sample_rows = []  # rows 0 .. R-1: a slice, no gather
    q_lens = [s.num_tokens for s in prefills]
    k_lens = [s.start + s.num_tokens for s in prefills]
    cu_q, cu_k = _offsets(q_lens), _offsets(k_lens)
    parts = [ids, positions, slots, table, seq_lens, sample_rows, cu_q, cu_k, fix_dst, fix_src]
    sizes = [len(p) for p in parts]
    flat = [x for p in parts for x in p]
    context = [_context_slots(s.request.blocks, k, bs) for s, k in zip(prefills, k_lens)]
    packed = to_device(torch.cat([torch.tensor(flat, dtype=torch.long)] + context), torch.long, device)
    views = list(packed.split(sizes + [packed.shape[0] - sum(sizes)]))
    v_ids, v_pos, v_slots, v_table, v_lens, v_rows, v_cu_q, v_cu_k, v_dst, v_src, v_context = views
    if fix_dst:
        v_ids.index_copy_(0, v_dst, pending_tokens.index_select(0, v_src))
    meta = PagedAttentionMetadata(cache=cache, slots=v_slots, num_decode_tokens=B * decode_len if decodes else 0,
                                  decode_len=decode_len, kernel_backend=kernel_backend)
    if decodes:
        meta.block_table = v_table.view(B, width).to(torch.int32)
        meta.seq_lens = v_lens.to(torch.int32)
        # the engine's bound (its CUDA graphs use the same): it sizes the MLA kernel's context split, which
        # keys the kernel's autotuning, so one fixed bound means no retuning in the middle of a run
        # (a bound that followed the lengths retuned, stalling a step, each time it grew)
        meta.max_seq_len = table_width * bs
    if prefills:
        meta.cu_seqlens_q = v_cu_q.to(torch.int32)
        meta.cu_seqlens_k = v_cu_k.to(torch.int32)
        meta.context_slots = v_context
        meta.max_prefill_len = max(q_lens)
    return Batch(decodes + prefills, v_ids, v_pos, meta, rows, len(decodes), num_tokens,
                 v_rows if sample_rows else None)


def _context_slots(blocks: list[int], length: int, block_size: int) -> torch.Tensor:
    """Slots of positions [0, length) (vectorized: contexts run to tens of thousands of tokens)."""
    pos = torch.arange(length)
    return torch.tensor(blocks, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def _offsets(lengths: list[int]) -> list[int]:
    out, total = [0], 0
    for n in lengths:
        total += n
        out.append(total)
    return out if lengths else []
