"""The quantization operators: ``coscale::act_quant`` and ``coscale::weight_quant`` (recipe and layouts:
coscale.kernels.fp8_recipe; the public functions: coscale.kernels.quant).

``act_quant`` is a transparent operator (coscale.kernels.library): torch.compile sees its Triton
kernels, which write whole output tensors (no views: functionalization would copy a view's base).
``weight_quant`` is opaque: it writes several weights into slices of one stacked buffer and transposes
its bytes through a uint8 view, once per weight per step, where Inductor has nothing to gain. On CPU
tensors, and for ``backend="torch"``, both run the PyTorch references; ``"triton"`` on CPU runs the
kernels in Triton's interpreter (``TRITON_INTERPRET=1``).

Launch shapes, each tuned per call shape by Triton's autotuner among the candidates below
(``ROWS_CONFIGS`` etc.; the first call of a shape times them: warm up before capturing a CUDA graph;
``picked_config`` says which won). The kernels (coscale.kernels._quant_triton) spend about 6 instructions
per element (the H200 at 4.25 TB/s allows about 23 per bf16 element; the first kernels needed about 20,
which capped act_quant_1x128 at 71% of copy on the H200 against 83-89% on the H100).
- rows (1x128 along K): ``rows_kernel``, [BLOCK_M rows x TILES tiles x 128] per program.
- transposed (1x128 along M): ``cols_kernel``, GROUPS [128 x BLOCK_K] tiles per program, one after
  another, each stored through a transposed FP8 tile (contiguous along the tokens). With several tiles
  the loop is software-pipelined (the next tile's loads in flight during this one's shared-memory
  transpose); one tile a program reached 63% of copy on the H200. PACK4 candidates transpose 32-bit
  words of four tokens' bytes instead of bytes: 82% of copy with 32 columns and one warp (run 31).
- both layouts: two launches (rows, then transposed: x read twice, the second time partly from L2) or,
  with ``one_pass=True``, ``dual_quant_kernel`` (x read once): a [128 x 128] block held whole (CHUNK
  128, 8 or 16 warps; PACK4 candidates store the transposed layout as words) or walked in column chunks.
  benchmarks/bench_quant.py measures both: the two launches are faster (56% of copy against 35%, run 32).
- 128x128 weight blocks: ``weight_kernel``, GROUPS whole blocks along K per program (pipelined as
  above; 4, 8 or 16 warps), the transposed scales written by the same program; W^T's bytes by the same
  program too (WT, WEIGHT_PAIR_ONE_PASS: the block loaded as four quarters of rows 4i + j, four rows' bytes
  packed into a word and the words transposed, as the 128x1 kernel's PACK4; 88.5% of copy for bf16 weights
  on the H200, run 32). Otherwise (the switch off, or a buffer not in whole words) ``transpose_bytes_kernel``
  (one launch for every weight of a stacked buffer; ``transpose_words_kernel`` moves 32-bit words of 4 x 4
  byte blocks instead: TRANSPOSE_WORDS, exact on the H200 but no faster, run 32). An earlier one-pass kernel
  that transposed single bytes was slower (38% on the H100) and, for float32 weights, wrong there (triton
  3.6; tools/debug_fp8_nan.py).

Interpreter note: Triton's CPU interpreter mis-rounds FP32 -> E4M3 casts (lost exponent carry, ties away
from zero). When interpreting, the kernels first round onto the E4M3 grid in FP32 with the magic-number
trick r = (y + c) - c, c = 1.5 * 2^(E + 20) (E = the unbiased exponent of y, at least -6 = E4M3's
smallest normal exponent), so the cast that follows is exact, and its FMA (which rounds twice) is
replaced by float64 arithmetic. On a GPU the plain cast (round to nearest even, saturating) is used.
"""

from __future__ import annotations

import functools

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import autotuned, config_text, launch_config, power_of_two_bucket
from coscale.kernels.backend import interpreting
from coscale.kernels.fp8_recipe import (
    AMAX_FLOOR,
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    act_quant_1x128_ref,
    act_quant_128x1_ref,
    ceil_to,
    outer_major_empty,
    weight_quant_128x128_ref,
)
from coscale.kernels.library import launcher, operator, runs_triton
from coscale.kernels.swiglu import fast_sigmoid

__all__ = [
    "COLS_CONFIGS",
    "DUAL_CONFIGS",
    "DUAL_ONE_PASS",
    "PRODUCER_ROW_ORDER",
    "ROWS_CONFIGS",
    "TRANSPOSE_CONFIGS",
    "WEIGHT_CONFIGS",
    "act_quant_op",
    "act_quant_reference",
    "launch_cols",
    "launch_producer",
    "launch_rows",
    "launch_weight",
    "picked_config",
    "quant_outputs",
    "transpose_bytes",
    "weight_quant_op",
    "TRANSPOSE_TILE",
]

# The GPU candidates of each autotuned kernel, (constexprs, num_warps); the autotuner times them on the
# first call per key (the columns and a power-of-two bucket of the rows) and keeps the fastest. Every
# candidate writes the same bits (tests/test_quant.py runs each under the interpreter); the first is the
# interpreter's. Work per program: a few thousand elements (16-64 per thread), so that a program's loads
# are all in flight at once and 8192x7168 gives several waves of the 132 SMs.
ROWS_CONFIGS = (  # rows_kernel: BLOCK_M rows x TILES 1x128 tiles
    ({"BLOCK_M": 16, "TILES": 2}, 4), ({"BLOCK_M": 32, "TILES": 1}, 4), ({"BLOCK_M": 8, "TILES": 4}, 4),
    ({"BLOCK_M": 16, "TILES": 4}, 4), ({"BLOCK_M": 4, "TILES": 8}, 4), ({"BLOCK_M": 16, "TILES": 4}, 8),
    ({"BLOCK_M": 8, "TILES": 8}, 8), ({"BLOCK_M": 32, "TILES": 2}, 8), ({"BLOCK_M": 64, "TILES": 1}, 8),
)
COLS_CONFIGS = tuple(  # cols_kernel: GROUPS tiles of 128 tokens x BLOCK_K columns, one after another
    ({"BLOCK_K": k, "GROUPS": g, "PACK4": pack4}, w) for k, g, pack4, w in (
        (32, 1, False, 4), (16, 1, False, 4), (64, 1, False, 4), (64, 1, False, 8), (128, 1, False, 8),
        (128, 1, False, 16), (32, 4, False, 4), (64, 4, False, 4), (64, 4, False, 8), (128, 2, False, 8),
        # PACK4: four tokens' bytes packed into a word before the transpose (the kernel's comment); 64 x 4
        # warps reached 71% of copy on the H200 (run 31). Fewer warps a tile spend fewer instructions an
        # element on the column reductions and scales (sm_90 compiles: 19 at 64 x 4 warps, 13-14 at 32 x 1,
        # 64 x 2 and 128 x 4; 64 x 1 and 128 x 2 spill): 32 x 1 reached 82% (run 31). Before the words were
        # packed in inline asm, 32 x 1, 64 x 2 and 128 x 4 wrote wrong bytes on the H200 (the kernel's comment).
        (64, 1, True, 4), (32, 1, True, 4), (128, 1, True, 8), (32, 1, True, 1), (64, 1, True, 2), (128, 1, True, 4),
    )
)
WEIGHT_CONFIGS = (  # weight_kernel: GROUPS 128x128 blocks along K, one after another
    ({"GROUPS": 1}, 4), ({"GROUPS": 1}, 8), ({"GROUPS": 1}, 16), ({"GROUPS": 4}, 4), ({"GROUPS": 4}, 8),
    ({"GROUPS": 2}, 8),
)
TRANSPOSE_CONFIGS = (  # transpose_bytes_kernel: [BLOCK_R x BLOCK_C] bytes
    ({"BLOCK_R": 128, "BLOCK_C": 64}, 4), ({"BLOCK_R": 64, "BLOCK_C": 128}, 4),
    ({"BLOCK_R": 128, "BLOCK_C": 128}, 4), ({"BLOCK_R": 128, "BLOCK_C": 128}, 8),
    ({"BLOCK_R": 64, "BLOCK_C": 64}, 2),
)
DUAL_CONFIGS = tuple(  # dual_quant_kernel: a 128x128 block, whole (CHUNK 128) or in column chunks
    ({"CHUNK": c, "PACK4": pack4}, w) for c, pack4, w in (
        (32, False, 4), (128, False, 16), (128, False, 8), (32, False, 8), (64, False, 8), (16, False, 4),
        # PACK4: yt's bytes packed four rows a word and transposed as words (the kernel's comment)
        (128, True, 4), (128, True, 8), (128, True, 16),
        # PACK4 in column chunks: a quarter of the block's values a thread at 32 columns (the whole block took
        # 255 registers a thread, one or two programs an SM: 35% of copy, run 33C)
        (32, True, 4), (32, True, 8), (64, True, 8),
        # (several blocks a program along K, pipelined as weight_kernel's GROUPS: bit-exact but never picked
        # on the H200, 35.7% of copy at one block a program either way, run 33C; not kept)
    )
)
# rows_quant_kernel: BLOCK_M rows x TILES 1x128 tiles per program, loaded as one [BLOCK_M, TILES, 128] block
# (launches with a dot product walk whole rows whatever the configuration)
PRODUCER_ROWS_CONFIGS = (
    ({"BLOCK_M": 8, "TILES": 8}, 8), ({"BLOCK_M": 16, "TILES": 4}, 8), ({"BLOCK_M": 16, "TILES": 2}, 4),
    ({"BLOCK_M": 8, "TILES": 4}, 4), ({"BLOCK_M": 32, "TILES": 2}, 8), ({"BLOCK_M": 32, "TILES": 1}, 4),
    # SwiGLU's backward paired (two output tiles a gate tile) holds twice the values a thread: these keep 32 a
    # thread (64 registers in sm_90 compiles, against 126-157 for the others)
    ({"BLOCK_M": 16, "TILES": 1}, 4), ({"BLOCK_M": 32, "TILES": 1}, 8),
)
PRODUCER_COLS_CONFIGS = (  # cols_quant_kernel: GROUPS tiles of 128 rows x BLOCK_K columns
    ({"BLOCK_K": 32, "GROUPS": 1, "PACK4": False}, 4), ({"BLOCK_K": 16, "GROUPS": 1, "PACK4": False}, 4),
    ({"BLOCK_K": 64, "GROUPS": 1, "PACK4": False}, 8), ({"BLOCK_K": 32, "GROUPS": 4, "PACK4": False}, 4),
    ({"BLOCK_K": 64, "GROUPS": 4, "PACK4": False}, 8),
    # PACK4 (run 36): the transposed tile stored as words, as cols_kernel's PACK4 candidates. Unlike there, 128
    # values a thread (32 columns at one warp) take 244-255 registers with a gathered or SwiGLU source (a 64-bit
    # address a value), so the tiles spread over more warps: 72-125 registers (tools/compile_sm90.py --counts).
    ({"BLOCK_K": 32, "GROUPS": 1, "PACK4": True}, 4), ({"BLOCK_K": 64, "GROUPS": 1, "PACK4": True}, 8),
    ({"BLOCK_K": 64, "GROUPS": 1, "PACK4": True}, 4), ({"BLOCK_K": 32, "GROUPS": 1, "PACK4": True}, 2),
    # SwiGLU's backward paired: 32 values a thread (94-96 registers, against 167-169 at 64)
    ({"BLOCK_K": 16, "GROUPS": 1, "PACK4": True}, 4), ({"BLOCK_K": 32, "GROUPS": 1, "PACK4": True}, 8),
)
TRANSPOSE_WORDS_CONFIGS = (  # transpose_words_kernel: [BLOCK_R x BLOCK_C] bytes as 32-bit words
    ({"BLOCK_R": 128, "BLOCK_C": 128}, 4), ({"BLOCK_R": 64, "BLOCK_C": 128}, 4), ({"BLOCK_R": 128, "BLOCK_C": 64}, 4),
    ({"BLOCK_R": 128, "BLOCK_C": 256}, 8), ({"BLOCK_R": 256, "BLOCK_C": 128}, 8), ({"BLOCK_R": 64, "BLOCK_C": 64}, 2),
)
# transpose_bytes through 32-bit words (transpose_words_kernel) where the shapes allow it: exact on the H200
# (tools/quant_bits_on_gpu.py) but no faster than the byte kernel in the bf16 weight pair (73.3% of copy
# either way, run 32), so off (bench_quant.py --transpose-words times it).
TRANSPOSE_WORDS = False
TRANSPOSE_TILE = (TRANSPOSE_CONFIGS[0][0]["BLOCK_R"], TRANSPOSE_CONFIGS[0][0]["BLOCK_C"])  # the interpreter's
# Both layouts of an activation (FP8Linear's X and dY, the FP8 experts' fused quantizations) from one launch
# (dual_quant_kernel: x read once) or from two (rows, then the transposed layout; x read twice, the second
# time partly from L2). The bytes are the same; benchmarks/bench_quant.py times act_dual against
# act_dual_one_pass. Set from its result.
DUAL_ONE_PASS = False
# The producer kernels' launch order for sources that are not gathered: row block by row block (True) or
# column block by column block, as the grid lies (coscale.kernels._quant_triton._row_block_and_column_block).
# benchmarks/bench_quant.py --producer-order both times the two.
PRODUCER_ROW_ORDER = True
# SwiGLU's backward producer with the gate width a multiple of 128: each program writes the dg tile and the du tile
# of the same columns from one set of loads and one sigmoid (the kernels' PAIRED) instead of every element loading
# g, u and da and computing both gradients to keep one. The bytes are the same; benchmarks/bench_quant.py
# --paired both times the two.
SWIGLU_BACKWARD_PAIRED = True
# W and W^T of a weight from one launch (weight_kernel's WT: W read once, W^T's bytes written as words from the
# quantizing program's registers) or from two (weight_kernel, then transpose_bytes reading and writing the FP8
# bytes again). On the H200 (run 32, 7168 x 18432) one launch reached 88.5% of copy bandwidth for bf16 weights
# (two: 73.3%) and 96.5% for fp32 (81.5%), every byte equal to the reference (tools/quant_bits_on_gpu.py).
WEIGHT_PAIR_ONE_PASS = True


# ----------------------------------------------------------------------------------------------------
# Autotuned forms of the kernels (built on first use: triton.jit decides between compiler and interpreter
# when it decorates, in coscale.kernels._quant_triton)
# ----------------------------------------------------------------------------------------------------


@functools.cache
def tuned_kernels(interpret: bool) -> dict:
    """{"rows", "cols", "weight", "transpose"}: the standalone kernels under autotuners (keyed by the
    columns and a power-of-two bucket of the rows; the byte transpose by its shape)."""
    from coscale.kernels import _quant_triton as kq

    key = ["K", "M_BUCKET"]
    return {
        "rows": autotuned(kq.rows_kernel, ROWS_CONFIGS, key),
        "cols": autotuned(kq.cols_kernel, COLS_CONFIGS, key),
        "weight": autotuned(kq.weight_kernel, WEIGHT_CONFIGS, key + ["WT"]),
        "transpose": autotuned(kq.transpose_bytes_kernel, TRANSPOSE_CONFIGS, ["R", "C"]),
        "transpose_words": autotuned(kq.transpose_words_kernel, TRANSPOSE_WORDS_CONFIGS, ["R", "C"]),
    }


@functools.cache
def tuned_producers(interpret: bool) -> dict:
    """{"rows", "cols", "dual"}: the producer-fused kernels of coscale.kernels._quant_triton under
    autotuners keyed by the columns, a bucket of the rows and the producer (SOURCE)."""
    from coscale.kernels import _quant_triton as kq

    key = ["K", "M_BUCKET", "SOURCE", "HAS_WEIGHT"]
    return {  # rows: DOT launches walk whole rows, so they tune apart from the plain ones
        "rows": autotuned(kq.rows_quant_kernel, PRODUCER_ROWS_CONFIGS, key + ["DOT", "PAIRED", "TILE_DOT"]),
        "cols": autotuned(kq.cols_quant_kernel, PRODUCER_COLS_CONFIGS, key + ["PAIRED"]),
        "dual": autotuned(kq.dual_quant_kernel, DUAL_CONFIGS, key),
    }


def picked_config(kind: str) -> str:
    """The configuration the autotuner of ``kind`` ("rows", "cols", "weight", "transpose", or
    "producer_rows", "producer_cols", "producer_dual") used last, as "NAME=v ... wN" ("" before any)."""
    import triton  # noqa: F401  (the autotuners exist only once Triton is imported)

    table = tuned_producers(interpreting()) if kind.startswith("producer_") else tuned_kernels(interpreting())
    return config_text(table[kind.removeprefix("producer_")])


def launch_producer(form, outs, x, round_scale, *, m, k, source=0, b=None, idx=None, w=None, dot=None,
                    dot_out=None, tile_dot_out=None, topk=1, up_offset=0, config=None):  # fmt: skip
    """Quantize the [m, k] matrix that ``source`` (the SOURCE table of coscale.kernels._quant_triton)
    produces from x (and b, idx, w) into ``outs`` = (y, s, yt, st) (coscale.kernels.quant_ops
    .quant_outputs): ``form`` "rows" (y, s; with ``dot`` also dot_out; SwiGLU's backward paired with
    ``tile_dot_out`` [m, up_offset / 128] also the router weight's gradient a gate tile at a time), "cols" (yt, st)
    or "dual" (all four in one launch). ``config``: see coscale.kernels.autotune.launch_config."""
    y, s, yt, st = outs
    kernel, cfg = launch_config(tuned_producers(interpreting())[form], config)
    has_weight = w is not None
    b = x if b is None else b
    idx = x if idx is None else idx
    w = x if w is None else w
    common = dict(SOURCE=source, TOPK=topk, HAS_WEIGHT=has_weight, ROUND_SCALE=round_scale,
                  GRID_ROUND=interpreting(), FAST_SIGMOID=source in (1, 2) and fast_sigmoid(), **cfg)  # fmt: skip
    paired = form != "dual" and source == 2 and up_offset % BLOCK == 0 and SWIGLU_BACKWARD_PAIRED
    order = {} if form == "dual" else {"ROW_ORDER": PRODUCER_ROW_ORDER, "PAIRED": paired}
    bucket = rows_bucket(m)
    if form == "rows":
        if tile_dot_out is not None and not paired:
            raise CoscaleError("tile_dot_out is SwiGLU's backward's, paired (gate width a multiple of 128)")
        d, d_out = (dot, dot_out) if dot is not None else (x, x)
        # (the tile dots' row stride goes where the gather's dot rows' would: a launch has one or the other)
        d_stride = d.stride(0)
        if tile_dot_out is not None:
            d_out, d_stride = tile_dot_out, tile_dot_out.stride(0)
        tiles = (up_offset if paired else y.shape[1]) // BLOCK  # paired: the gate half's tiles
        launcher(kernel)[lambda meta: (-(-m // meta["BLOCK_M"]), 1 if dot is not None else -(-tiles // meta["TILES"]))](
            x, b, idx, w, d, d_out, y, s, m, k, y.shape[1], bucket, x.stride(0), b.stride(0), up_offset,
            d_stride, y.stride(0), s.stride(0), s.stride(1), AMAX_FLOOR, FP8_MAX, DOT=dot is not None,
            TILE_DOT=tile_dot_out is not None, **common, **order,
        )  # fmt: skip
    elif form == "cols":
        columns = up_offset if paired else yt.shape[0]  # paired: the gate half's columns
        launcher(kernel)[lambda meta: (-(-m // (BLOCK * meta["GROUPS"])), -(-columns // meta["BLOCK_K"]))](
            x, b, idx, w, yt, st, m, k, yt.shape[0], bucket, x.stride(0), b.stride(0), up_offset,
            yt.stride(0), st.stride(0), st.stride(1), AMAX_FLOOR, FP8_MAX, **common, **order,
        )  # fmt: skip
    else:
        launcher(kernel)[(-(-m // BLOCK), y.shape[1] // BLOCK)](
            x, b, idx, w, y, s, yt, st, m, k, yt.shape[0], bucket, x.stride(0), b.stride(0), up_offset,
            y.stride(0), s.stride(0), s.stride(1), yt.stride(0), st.stride(0), st.stride(1),
            AMAX_FLOOR, FP8_MAX, **common,
        )  # fmt: skip


def rows_bucket(m) -> int:
    """The autotuning key for m rows: a power-of-two bucket (0 for a symbolic row count, which only
    torch.compile's dynamic shapes give; Inductor tunes user kernels itself)."""
    return power_of_two_bucket(m) if isinstance(m, int) else 0


def _batched_strides(t: torch.Tensor) -> tuple:
    """(batch, row, column) strides of a 2-D [rows, cols] or 3-D [B, rows, cols] tensor (batch stride 0
    for 2-D: the tensors reach the kernel as they are, not as views)."""
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def launch_rows(x, y, s, round_scale, config=None):
    """y [M, Kp], s [M, Kp/128] (outer-major) from x [M, K] (any strides): rows_kernel."""
    kernel, cfg = launch_config(tuned_kernels(interpreting())["rows"], config)
    m, k = x.shape
    nt = y.shape[1] // BLOCK
    launcher(kernel)[lambda meta: (-(-m // meta["BLOCK_M"]), -(-nt // meta["TILES"]))](
        x, y, s, m, k, nt, rows_bucket(m), x.stride(0), x.stride(1), y.stride(0), s.stride(0), s.stride(1),
        AMAX_FLOOR, FP8_MAX, ROUND_SCALE=round_scale, GRID_ROUND=interpreting(), **cfg,
    )  # fmt: skip


def launch_cols(x, yt, st, round_scale, config=None):
    """yt [K or Kp, Mp], st (outer-major) from x [M, K] (any strides): cols_kernel."""
    kernel, cfg = launch_config(tuned_kernels(interpreting())["cols"], config)
    m, k = x.shape
    rows = yt.shape[0]
    launcher(kernel)[lambda meta: (-(-m // (BLOCK * meta["GROUPS"])), -(-rows // meta["BLOCK_K"]))](
        x, yt, st, m, k, rows, rows_bucket(m), x.stride(0), x.stride(1), yt.stride(0), st.stride(0), st.stride(1),
        AMAX_FLOOR, FP8_MAX, ROUND_SCALE=round_scale, GRID_ROUND=interpreting(), **cfg,
    )  # fmt: skip


def launch_weight(w, y, s, st, round_scale, config=None, yt=None):
    """y [.., Np, Kp], s [.., Np/128, Kp/128] and, unless ``st`` is None, st = s^T from w [.., N, K]
    (2-D or a batch [E, N, K]): weight_kernel; with ``yt`` [.., Kp, Np] (rows, strides and address in whole
    32-bit words) W^T's bytes from the same program."""
    kernel, cfg = launch_config(tuned_kernels(interpreting())["weight"], config)
    n, k = w.shape[-2:]
    batch = w.shape[0] if w.dim() == 3 else 1
    # Without transposed scales the kernel never touches st_ (nor yt_ without W^T): pass the input, not an
    # output again (an output passed twice keeps Inductor, under wrap_triton's functionalization, from
    # writing it in place)
    st_ = w if st is None else st
    yt_ = w if yt is None else yt
    launcher(kernel)[lambda meta: (-(-n // BLOCK), -(-k // (BLOCK * meta["GROUPS"])), batch)](
        w, y, s, st_, yt_, n, k, y.shape[-2], rows_bucket(n), *_batched_strides(w), *_batched_strides(y)[:2],
        *_batched_strides(s), *_batched_strides(st_), *_batched_strides(yt_)[:2], AMAX_FLOOR, FP8_MAX,
        TRANSPOSED_SCALES=st is not None, WT=yt is not None, ROUND_SCALE=round_scale, GRID_ROUND=interpreting(),
        **cfg,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# coscale::act_quant
# ----------------------------------------------------------------------------------------------------


def quant_outputs(m: int, k: int, device, rows: bool, cols: bool, pad_t: bool):
    """The four outputs of quantizing an [m, k] matrix: (y [m, Kp], s [m, Kp/128] outer-major) when
    ``rows`` and (yt [k or Kp, Mp], st [.., Mp/128] outer-major) when ``cols``, zero rows otherwise."""
    kp, mp = ceil_to(k), ceil_to(m)
    kt = kp if pad_t else k
    dev = device
    return (
        torch.empty(m if rows else 0, kp, dtype=FP8_DTYPE, device=dev),
        outer_major_empty(m if rows else 0, kp // BLOCK, dev),
        torch.empty(kt if cols else 0, mp, dtype=FP8_DTYPE, device=dev),
        outer_major_empty(kt if cols else 0, mp // BLOCK, dev),
    )


def act_quant_reference(x, round_scale, rows, cols, pad_t):
    """The PyTorch reference of ``act_quant_op`` (the same four outputs)."""
    y, s, yt, st = quant_outputs(*x.shape, x.device, rows, cols, pad_t)
    if rows:
        y, s = act_quant_1x128_ref(x, round_scale)
    if cols:
        k = x.shape[1]
        xt_src = torch.nn.functional.pad(x, (0, ceil_to(k) - k)) if pad_t and k % BLOCK else x
        yt, st = act_quant_128x1_ref(xt_src, round_scale)
    return y, s, yt, st


def _act_quant_triton(x, round_scale, rows, cols, pad_t, one_pass):
    y, s, yt, st = outs = quant_outputs(*x.shape, x.device, rows, cols, pad_t)
    m, k = x.shape
    if m == 0 or k == 0:
        return outs
    if rows and cols and one_pass and x.stride(1) == 1:  # (the one-pass kernel reads contiguous rows)
        launch_producer("dual", outs, x, round_scale, m=m, k=k)
        return outs
    if rows:
        launch_rows(x, y, s, round_scale)
    if cols:
        launch_cols(x, yt, st, round_scale)
    return outs


@operator("act_quant")
def act_quant_op(
    x: torch.Tensor, round_scale: bool, rows: bool, cols: bool, pad_t: bool, one_pass: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y [M, Kp], s [M, Kp/128], yt [K or Kp, Mp], st [K or Kp, Mp/128]): the 1x128 layout
    when ``rows``, the transposed (128x1) layout when ``cols`` (padded to Kp rows with ``pad_t``);
    a layout not asked for comes back with zero rows."""
    if runs_triton(backend, x, "act_quant"):
        return _act_quant_triton(x, round_scale, rows, cols, pad_t, one_pass)
    return act_quant_reference(x, round_scale, rows, cols, pad_t)


# ----------------------------------------------------------------------------------------------------
# coscale::weight_quant (one or several weights stacked into one buffer)
# ----------------------------------------------------------------------------------------------------


def transpose_bytes(y: torch.Tensor, out: torch.Tensor, config=None, words: bool | None = None) -> torch.Tensor:
    """out[.., c, r] = y[.., r, c] for 1-byte tensors with contiguous rows (the Triton kernel); through 32-bit
    words (``words``, default TRANSPOSE_WORDS) where rows, columns, strides and addresses are multiples of 4."""
    x3, o3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (y.view(torch.uint8), out.view(torch.uint8)))
    r, c = x3.shape[-2:]
    if (TRANSPOSE_WORDS if words is None else words) and _word_aligned(x3, o3):
        kernel, cfg = launch_config(tuned_kernels(interpreting())["transpose_words"], config)
        x4, o4 = x3.view(torch.int32), o3.view(torch.int32)
        launcher(kernel)[lambda meta: (-(-r // meta["BLOCK_R"]), -(-c // meta["BLOCK_C"]), x3.shape[0])](
            x4, o4, r, c, x4.stride(0), x4.stride(1), o4.stride(0), o4.stride(1), ASM=not interpreting(), **cfg
        )
        return out
    kernel, cfg = launch_config(tuned_kernels(interpreting())["transpose"], config)
    launcher(kernel)[lambda meta: (-(-r // meta["BLOCK_R"]), -(-c // meta["BLOCK_C"]), x3.shape[0])](
        x3, o3, r, c, x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1), **cfg
    )
    return out


def _word_aligned(*ts: torch.Tensor) -> bool:
    """Every [B, rows, cols] byte tensor viewable as 32-bit words: both sizes, every stride and the address
    multiples of 4, the columns contiguous."""
    return all(t.shape[-1] % 4 == 0 and t.shape[-2] % 4 == 0 and t.stride(-1) == 1 and t.stride(-2) % 4 == 0
               and t.stride(0) % 4 == 0 and t.data_ptr() % 4 == 0 for t in ts)


def _weight_outputs(ws, transpose: bool):
    """Stacked buffers for weights [.., N_i, K]: each part padded to 128 rows, W^T's when ``transpose``."""
    *lead, _, k = ws[0].shape
    kp = ceil_to(k)
    total = sum(ceil_to(w.shape[-2]) for w in ws)
    tt = total if transpose else 0
    dev = ws[0].device
    return (
        torch.empty(*lead, total, kp, dtype=FP8_DTYPE, device=dev),
        torch.empty(*lead, total // BLOCK, kp // BLOCK, dtype=torch.float32, device=dev),
        torch.empty(*lead, kp, tt, dtype=FP8_DTYPE, device=dev),
        torch.empty(*lead, kp // BLOCK, tt // BLOCK, dtype=torch.float32, device=dev),
    )


def _parts(ws, outs, transpose):
    """(w, y part, s part, st part) per weight: views of the stacked buffers (st part None without W^T)."""
    y, s, _, st = outs
    row = 0
    for w in ws:
        np_ = ceil_to(w.shape[-2])
        rb = slice(row // BLOCK, (row + np_) // BLOCK)
        yield w, y[..., row : row + np_, :], s[..., rb, :], (st[..., :, rb] if transpose else None)
        row += np_


def _weight_quant_torch(ws, round_scale, transpose):
    outs = _weight_outputs(ws, transpose)
    for w, y, s, _ in _parts(ws, outs, transpose):
        w3, y3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, y, s))
        for e in range(w3.shape[0]):
            ry, rs = weight_quant_128x128_ref(w3[e], round_scale)
            y3[e].copy_(ry)
            s3[e].copy_(rs)
    if transpose:  # W^T's blocks are W's transposed, with the same scales
        outs[2].copy_(outs[0].transpose(-2, -1))
        outs[3].copy_(outs[1].transpose(-2, -1))
    return outs


def _weight_quant_triton(ws, round_scale, transpose):
    outs = _weight_outputs(ws, transpose)
    if outs[0].numel() == 0:
        return outs
    # W^T's bytes from the quantizing programs where every part's yt slice is word-aligned (always, for the
    # buffers made here; checked as the kernel's word stores assume it); else one byte transpose for all
    parts, yts, row = list(_parts(ws, outs, transpose)), [], 0
    for _, y, _, _ in parts:
        yts.append(outs[2][..., :, row : row + y.shape[-2]] if transpose else None)  # this weight's columns
        row += y.shape[-2]
    one_pass = transpose and WEIGHT_PAIR_ONE_PASS and all(
        _word_aligned(*(t if t.dim() == 3 else t.unsqueeze(0) for t in (y, yt)))
        for (w, y, _, _), yt in zip(parts, yts))
    for (w, y, s, st), yt in zip(parts, yts):
        if w.numel():
            launch_weight(w, y, s, st if transpose else None, round_scale, yt=yt if one_pass else None)
    if transpose and not one_pass:  # W^T's 128x128 blocks are W's blocks transposed: one launch for all
        transpose_bytes(outs[0], outs[2])
    return outs


def _check_weights(ws) -> None:
    if not ws:
        raise CoscaleError("weight_quant needs at least one weight")
    dims = {w.dim() for w in ws}
    if dims - {2, 3} or len(dims) != 1:
        raise CoscaleError(f"weights must all be [N, K] or all [E, N, K], got {[tuple(w.shape) for w in ws]}")
    if any(w.shape[:-2] != ws[0].shape[:-2] or w.shape[-1] != ws[0].shape[-1] for w in ws):
        raise CoscaleError(f"stacked weights need one E and one K, got {[tuple(w.shape) for w in ws]}")
    for w in ws:
        if not w.is_floating_point() or w.dtype == FP8_DTYPE:
            raise CoscaleError(f"w must be fp32/bf16/fp16, got {w.dtype}")


def _fake_weight_quant(ws, round_scale, transpose, backend):
    _check_weights(ws)
    return _weight_outputs(ws, transpose)


@operator("weight_quant", opaque=True, fake=_fake_weight_quant)
def weight_quant_op(
    ws: list[torch.Tensor], round_scale: bool, transpose: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights w_i [N_i, K] (or all [E, N_i, K]) in 128x128 blocks, stacked along N, each part padded to
    128 rows: (y [.., sum Np_i, Kp], s [.., sum Np_i/128, Kp/128]) and, with ``transpose``, the stack's
    transpose (yt [.., Kp, sum Np_i], st [.., Kp/128, sum Np_i/128]): W^T's blocks are W's transposed,
    with the same scales. Without ``transpose`` yt and st have zero columns."""
    _check_weights(ws)
    if runs_triton(backend, ws[0], "weight_quant_128x128"):
        return _weight_quant_triton(ws, round_scale, transpose)
    return _weight_quant_torch(ws, round_scale, transpose)
