"""Wire formats for expert-parallel token transfers.

A codec turns rows of activations into rows of bytes that travel through ``all_to_all_single`` and back.
Every row is encoded on its own, so the rows of an encoded tensor can be selected, duplicated and sent
without decoding them: the two-hop path forwards the received bytes inside a node unchanged.

Formats (row of hidden size H):

- ``fp32``: the 4*H bytes of float32 values (exact; used by tests and for router weights).
- ``bf16``: the 2*H bytes of bfloat16 values (DeepSeek-V3's combine format).
- ``fp8``: DeepSeek-V3's dispatch format. Per row and per 128-channel tile, scale = amax / 448 and the
  values are cast to float8 e4m3; the row is H bytes of e4m3 codes followed by ceil(H/128) float32
  scales (4 bytes each, little-endian as in memory), H + 4*ceil(H/128) bytes in all. For H = 7168 that
  is 7,392 bytes against 14,336 for BF16 (1.94x fewer).

A LogFMT codec (the paper section 3.2; :class:`LogFMTCodec`) only needs ``encode``/``decode``/``bytes_per_row``:
pass any object that satisfies :class:`Codec` wherever a codec name is accepted. Two optional methods let
coscale.parallel.transfer fuse the first and last steps of a transfer: ``encode_rows(x, index)`` (the
encoded rows x[index] in one pass) and ``decode_sum(payload, copies, hidden, dtype)`` (out[i] = sum_k
decode(payload[copies[i, k]])); LogFMT has both (its ``encode_rows`` encodes each source row once when the
selection repeats rows, as top-k copies do). FP8 has neither on purpose: the transfer's generic path, each
token quantized once and its bytes then selected as 8-byte words (``select_rows``), took 0.72x a plain
BF16 permutation on the H200 at V3's width and top-8 (BENCHMARKS.md, fourth session, run 15; CUDA-graph
timing), as fast as a one-pass gather + quantize of every copy (coscale.kernels.fused_quant.gather_quant_rows,
0.68x) without quantizing each token k times.

Shapes: ``encode(x [N, H] float) -> [N, B] uint8``; ``decode(p [N, B] uint8, hidden=H, dtype) -> [N, H]``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from coscale.errors import ConfigError

TILE = 128  # channels per FP8 scale (the 1x128 activation tile of the FP8 recipe)


@runtime_checkable
class Codec(Protocol):
    name: str

    def bytes_per_row(self, hidden: int) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor: ...


class RawCodec:
    """Values sent as they are in a fixed dtype (fp32 or bf16), viewed as bytes."""

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype = dtype
        self.name = name
        self._size = torch.empty((), dtype=dtype).element_size()

    def bytes_per_row(self, hidden: int) -> int:
        return hidden * self._size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1).to(self.dtype).contiguous()
        return rows.view(torch.uint8).reshape(rows.shape[0], rows.shape[1] * self._size)

    def decode(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        values = payload.contiguous().view(self.dtype).reshape(payload.shape[0], hidden)
        return values.to(dtype)

    def __repr__(self) -> str:
        return f"RawCodec({self.name})"


def _quantize_1x128_local(x: torch.Tensor, fp8: torch.dtype = torch.float8_e4m3fn
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (fp8 codes [N, H], fp32 scales [N, ceil(H/128)]); the last tile may be partial."""
    n, h = x.shape
    tiles = math.ceil(h / TILE)
    padded = torch.nn.functional.pad(x.float(), (0, tiles * TILE - h)).view(n, tiles, TILE)
    fp8_max = torch.finfo(fp8).max
    amax = padded.abs().amax(dim=-1).clamp(min=1e-12)  # an all-zero tile keeps a finite scale
    scale = amax / fp8_max
    codes = (padded / scale.unsqueeze(-1)).clamp(-fp8_max, fp8_max).to(fp8)
    return codes.view(n, tiles * TILE)[:, :h].contiguous(), scale.contiguous()


def _quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """coscale.kernels.quant.act_quant_1x128 (Triton on CUDA, its PyTorch reference elsewhere) when it
    is importable and H is a multiple of 128; the local reference above otherwise (same recipe)."""
    if x.shape[1] % TILE == 0:
        try:
            from coscale.kernels.quant import act_quant_1x128
        except ImportError:
            act_quant_1x128 = None
        if act_quant_1x128 is not None:
            codes, scale = act_quant_1x128(x)
            if codes.shape == x.shape and scale.shape == (x.shape[0], x.shape[1] // TILE):
                return codes.contiguous(), scale.float().contiguous()
    return _quantize_1x128_local(x)


class FP8Codec:
    """E4M3 codes with a float32 scale per 1x128 tile; the scales travel in the same row.
    ``fmt="e5m2"``: E5M2 codes (scale = amax / 57344; the PyTorch quantizer, for the codec study)."""

    def __init__(self, fmt: str = "e4m3"):
        if fmt not in ("e4m3", "e5m2"):
            raise ConfigError(f"FP8Codec fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
        self.fmt = fmt
        self.dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
        self.name = "fp8" if fmt == "e4m3" else "fp8_e5m2"

    def bytes_per_row(self, hidden: int) -> int:
        return hidden + 4 * math.ceil(hidden / TILE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        codes, scale = _quantize_1x128(x) if self.fmt == "e4m3" else _quantize_1x128_local(x, self.dtype)
        scale_bytes = scale.view(torch.uint8).reshape(x.shape[0], 4 * scale.shape[1])
        return torch.cat([codes.view(torch.uint8), scale_bytes], dim=1)

    def decode(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        n = payload.shape[0]
        tiles = math.ceil(hidden / TILE)
        scale = payload[:, hidden:].contiguous().view(torch.float32).reshape(n, tiles)
        # Half-precision outputs are computed in that precision: e4m3 codes are exact in bf16/fp16, and
        # rounding the scale (2^-9 relative) is far below the e4m3 step (2^-4); it saves an fp32 copy.
        work = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        codes = payload[:, :hidden].view(self.dtype).to(work)
        if hidden % TILE:
            codes = torch.nn.functional.pad(codes, (0, tiles * TILE - hidden))
        values = codes.view(n, tiles, TILE) * scale.to(work).unsqueeze(-1)
        return values.view(n, tiles * TILE)[:, :hidden].to(dtype)

    def __repr__(self) -> str:
        return f"FP8Codec({self.fmt}, 1x128)"


def select_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows.index_select(0, index), byte for byte. Encoded rows (uint8) are moved as 8-, 4- or 2-byte
    words where the row width and alignment allow: torch's index_select copies one element per GPU
    thread, so byte elements would move a byte per thread."""
    if rows.dtype == torch.uint8 and rows.dim() == 2 and rows.stride(1) == 1:
        for word in (torch.int64, torch.int32, torch.int16):
            size = word.itemsize
            if rows.shape[1] % size == 0 and rows.stride(0) % size == 0 and rows.storage_offset() % size == 0:
                return rows.view(word).index_select(0, index).view(torch.uint8)
    return rows.index_select(0, index)


def get_codec(codec: str | Codec | None, default: str = "bf16") -> Codec:
    """A codec by name ('fp32', 'bf16', 'fp8', 'fp8_e5m2', 'logfmt8', 'logfmt10', and 'logfmt8_fast',
    'logfmt10_fast': LogFMT with "fast" rounding), or any :class:`Codec`."""
    if codec is None:
        codec = default
    if isinstance(codec, str):
        if codec == "fp32":
            return RawCodec(torch.float32, "fp32")
        if codec == "bf16":
            return RawCodec(torch.bfloat16, "bf16")
        if codec == "fp8":
            return FP8Codec()
        if codec == "fp8_e5m2":
            return FP8Codec("e5m2")
        if codec in ("logfmt8", "logfmt10"):
            return LogFMTCodec(int(codec[6:]))
        if codec in ("logfmt8_fast", "logfmt10_fast"):
            return LogFMTCodec(int(codec[6:-5]), "fast")
        raise ConfigError(f"unknown EP codec {codec!r}; choose 'fp32', 'bf16', 'fp8', 'fp8_e5m2', 'logfmt8', "
                          "'logfmt10', 'logfmt8_fast', 'logfmt10_fast' or pass a Codec object")
    if not isinstance(codec, Codec):
        raise ConfigError(f"{codec!r} is not a codec: it needs name, bytes_per_row, encode and decode")
    return codec


class LogFMTCodec:
    """LogFMT-n (the paper section 3.2; coscale.kernels.logfmt): n-bit sign + log-magnitude codes with
    tile_min and tile_step (fp32) per 1x128 tile, rounded to nearest in the linear domain by default ("fast":
    nearest for |x| perturbed by at most ~3e-5 in log2 on float32 tile numbers, no float64 work; "stochastic").

    Row layout (coscale.kernels.logfmt.code_packing / code_planes / row_bytes): the H codes bit-packed
    little-endian (code i of a group of g = 8 / gcd(n, 8) codes at bit n*i of a g*n/8-byte group; n = 8: one
    byte per code; n = 4: two codes a byte), zero codes padding H up to a multiple of g; for n = 10, 12, 14
    two planes instead: the low byte of each of the H codes, then the n - 8 high bits packed the same way
    (n = 10: four 2-bit parts a byte); then ceil(H/128) fp32 tile_min and ceil(H/128) fp32 tile_step. For n
    whose group would exceed 56 bits (9, 11, 13, 15) or with ``packed=False`` the codes are int16 (2 bytes).
    H = 7168: LogFMT-8 7,616 bytes, LogFMT-10 (packed) 9,408, against 7,392 for FP8 and 14,336 for BF16.

    The kernels write and read these rows directly: ``encode_rows(x, index)`` selects, encodes and packs
    in one pass (the dispatch's first stage), ``decode_sum(rows, copies, ...)`` unpacks, decodes and sums
    each source row's copies in one pass (the combine's last stage).
    """

    def __init__(self, n_bits: int = 8, rounding: str = "nearest", packed: bool = True):
        from coscale.kernels.logfmt import ROUNDINGS, code_packing

        if not isinstance(n_bits, int) or not 3 <= n_bits <= 16:
            raise ConfigError(f"LogFMTCodec n_bits must be an integer in 3..16, got {n_bits!r}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"LogFMTCodec rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.n_bits = n_bits
        self.rounding = rounding
        self.name = f"logfmt{n_bits}" + ("_fast" if rounding == "fast" else "")
        self.packed = packed and code_packing(n_bits, True) != (1, 2)

    def bytes_per_row(self, hidden: int) -> int:
        from coscale.kernels.logfmt import row_bytes

        return row_bytes(hidden, self.n_bits, self.packed)[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_rows(x, None)

    def encode_rows(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The rows x[index] encoded: the same bytes as encode(x).index_select(0, index). Selecting fewer
        rows than x has: gathered and encoded in one pass; as many or more (the dispatch's top-k copies of
        each token): each row encoded once, its bytes then selected (1/k of the encoding work)."""
        from coscale.kernels.logfmt import logfmt_encode_to_rows

        x = x.flatten(1)
        if index is not None and index.numel() >= x.shape[0]:
            return select_rows(logfmt_encode_to_rows(x, None, 1, self.n_bits, self.rounding, packed=self.packed),
                               index)
        return logfmt_encode_to_rows(x, index, 1, self.n_bits, self.rounding, packed=self.packed)

    def decode(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        return self.decode_sum(payload, None, hidden, dtype)

    def decode_sum(self, payload: torch.Tensor, copies: torch.Tensor | None, hidden: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """out[i] = sum_k decode(payload[copies[i, k]]) [N, hidden] in float32, then dtype, in one pass."""
        from coscale.kernels.logfmt import logfmt_decode_rows

        return logfmt_decode_rows(payload, hidden, copies, None, self.n_bits, dtype, self.packed)

    def __repr__(self) -> str:
        layout = "packed" if self.packed else "int16"
        return f"LogFMTCodec(n_bits={self.n_bits}, {self.rounding}, {layout})"
