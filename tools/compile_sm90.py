"""Compile coscale's newest Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

Triton's wheel carries ptxas, so `triton.compile` can lower a kernel to a cubin for a named target with no
driver: this catches what the CPU interpreter cannot (type errors in lowering, float64 constants,
unsupported ops, register or shared-memory limits) before device time is spent. It does not run
anything. Run: `PYTHONPATH=src python3 tools/compile_sm90.py` (prints one line per kernel variant and
exits non-zero if any fails); `--counts` adds each variant's SASS instructions a thread, registers and
shared memory (nvdisasm / cuobjdump from Triton's wheel); `--only TEXT` keeps the variants whose label
holds TEXT; `--sass DIR` writes each variant's SASS to DIR. The Gluon kernels (`--only gluon`: the grouped FP8
GEMMs, the FP8-cache MLA decode) compile through their own `compile_for_sm90` (Gluon kernels take descriptor types
with their shared-memory layouts).

Every pointer and integer argument is compiled as divisible by 16, as Triton specialises them on the GPU
when their values are (V3's shapes and strides; torch's allocations): without it the vectorised loads and
stores become scalar and the instruction counts are about twice the GPU's (run 33: the LogFMT decoder,
50 against 28 an element).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from coscale.kernels import _logfmt_triton as lk
from coscale.kernels import _mla_decode_triton as mk
from coscale.kernels import _quant_triton as qk
from coscale.kernels.logfmt import _groups, _pow2, code_packing, code_planes

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, types: dict[str, str], constexprs: dict) -> dict:
    """Every argument of fn: its type from `types`, "i32" for other plain arguments, "constexpr" for those in
    `constexprs`."""
    return {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}


def divisible_by_16(fn, sig: dict) -> dict:
    """Triton's attrs marking every pointer and integer argument divisible by 16 (the GPU's specialisation)."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
            if kind.startswith("*") or kind in ("i32", "i64")}


def _wheel_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_text(cubin: bytes) -> str:
    """The cubin's SASS (nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_wheel_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout


def sass_counts(cubin: bytes) -> str:
    """"N instructions, R registers" of a cubin (a thread's static SASS instruction count)."""
    sass = sass_text(cubin)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_wheel_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    count = len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/", sass, flags=re.M))
    reg = re.search(r"REG:(\d+)", usage)
    return f"{count} instructions, {reg.group(1) if reg else '?'} registers"


def compile_one(label: str, fn, types: dict[str, str], constexprs: dict, num_warps: int,
                counts: bool = False, sass_dir: str = "") -> bool:  # fmt: skip
    sig = signature(fn, types, constexprs)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, attrs=divisible_by_16(fn, sig),
                                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    except Exception as exc:  # noqa: BLE001 - report every variant
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return False
    extra = f"; {sass_counts(kernel.asm['cubin'])}, {kernel.metadata.shared} B shared" if counts else ""
    if sass_dir:
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        with open(os.path.join(sass_dir, name + ".sass"), "w") as out:
            out.write(sass_text(kernel.asm["cubin"]))
    print(f"ok   {label}: {time.perf_counter() - t0:.1f} s, {len(kernel.asm['cubin'])} bytes of cubin{extra}")
    return True


def logfmt_cases():
    fp = {"range_clamp": "fp32", "log2_clamp": "fp32", "delta": "fp32"}
    variants = ((8, True, True, "nearest"), (8, False, False, "nearest"), (10, True, True, "nearest"),
                (8, False, False, "stochastic"), (3, True, False, "nearest"), (8, False, False, "fast"),
                (8, True, False, "fast"), (10, True, False, "fast"), (10, False, False, "fast"),
                (10, True, False, "nearest"))
    for n_bits, packed, gather, rounding in variants:
        planes = packed and code_planes(n_bits, packed)
        group, gbytes = _groups(n_bits - 8) if planes else code_packing(n_bits, packed)
        gb_p2 = _pow2(gbytes)
        types = {"x_ptr": "*bf16", "idx_ptr": "*i64", "codes_ptr": "*u8" if n_bits <= 8 else "*i16",
                 "min_ptr": "*fp32", "step_ptr": "*fp32", "pay_ptr": "*u8", **fp}
        for block_r, warps, chunk, regather in ((8, 4, 128, True), (64, 4, 16, True), (32, 2, 32, True),
                                                (32, 2, 32, False), (16, 4, 128, False), (32, 8, 128, False),
                                                (4, 1, 128, False), (128, 4, 32, True)):
            const = dict(N_BITS=n_bits, STOCHASTIC=rounding == "stochastic", FAST=rounding == "fast", GATHER=gather,
                         TOPK=8 if gather else 1, PACKED=packed,
                         PLANES=planes, GROUP=group, GBYTES=gbytes, GB_P2=gb_p2, BLOCK_R=block_r, TILE_C=128,
                         CHUNK_C=chunk, REGATHER=regather, FAST_LOG2=True, PAIRS=True, PAIR_ASM=True)
            label = (f"logfmt encode n{n_bits} packed={packed} gather={gather} {rounding} "
                     f"R{block_r} w{warps} C{chunk}{' regather' if regather else ''}")
            yield label, lk.encode_kernel, types, const, warps
        types = {"codes_ptr": "*u8" if n_bits <= 8 else "*i16", "min_ptr": "*fp32", "step_ptr": "*fp32",
                 "pay_ptr": "*u8", "pair_row_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*bf16"}
        const = dict(N_BITS=n_bits, PACKED=packed, PLANES=planes, GROUP=group, GBYTES=gbytes, GB_P2=gb_p2,
                     TOPK=8 if gather else 1, GATHER=gather, HAS_WEIGHT=gather, BLOCK_R=8, TILE_C=128,
                     BYTE_ASM=n_bits == 8 and (not packed or (group, gbytes) == (1, 1)))
        yield f"logfmt decode n{n_bits} packed={packed} gather={gather}", lk.decode_sum_kernel, types, const, 4


def quant_cases():
    types = {"x_ptr": "*bf16", "b_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*fp32", "dot_ptr": "*bf16",
             "dot_out_ptr": "*fp32", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32", "amax_floor": "fp32", "fp8_max": "fp32"}
    cases = ((3, 8, 8, 8, False, False, False), (3, 4, 16, 8, True, False, False), (0, 2, 16, 4, False, False, False),
             (1, 4, 8, 4, False, False, False), (2, 2, 32, 8, False, False, False), (3, 8, 8, 4, True, True, False),
             (2, 2, 32, 8, False, False, True), (2, 1, 32, 4, False, False, True), (2, 4, 8, 4, False, False, True),
             (2, 1, 16, 4, False, False, True), (2, 2, 16, 8, False, False, True), (2, 1, 32, 8, False, False, True))
    for source, tiles, block_m, warps, weight, dot, paired in cases:
        const = dict(SOURCE=source, TOPK=8 if source == 3 else 1, HAS_WEIGHT=weight, DOT=dot, BLOCK_M=block_m,
                     TILES=tiles, ROUND_SCALE=False, GRID_ROUND=False, ROW_ORDER=True, PAIRED=paired,
                     FAST_SIGMOID=source in (1, 2))
        label = (f"rows_quant source {source} TILES {tiles} M{block_m} w{warps} weight={weight} dot={dot}"
                 f"{' paired' if paired else ''}")
        yield label, qk.rows_quant_kernel, types, const, warps
    types = {"x_ptr": "*bf16", "yt_ptr": "*fp8e4nv", "st_ptr": "*fp32", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32",
             "amax_floor": "fp32", "fp8_max": "fp32"}
    for block_k, groups, warps in ((64, 1, 4), (64, 4, 8)):  # the pipelined loop over token tiles
        const = dict(BLOCK_K=block_k, GROUPS=groups, ROUND_SCALE=False, GRID_ROUND=False, PACK4=False)
        yield f"cols BLOCK_K {block_k} GROUPS {groups} w{warps}", qk.cols_kernel, types, const, warps
    for block_k, warps in ((32, 1), (64, 4)):  # four tokens' bytes a word (the words packed by inline asm)
        const = dict(BLOCK_K=block_k, GROUPS=1, ROUND_SCALE=False, GRID_ROUND=False, PACK4=True)
        yield f"cols PACK4 BLOCK_K {block_k} w{warps}", qk.cols_kernel, types, const, warps
    for groups, warps, wt in ((1, 4, False), (4, 8, False), (1, 4, True), (1, 8, True), (4, 8, True)):
        const = dict(GROUPS=groups, TRANSPOSED_SCALES=True, WT=wt, ROUND_SCALE=False, GRID_ROUND=False)
        yield f"weight GROUPS {groups} w{warps} WT={wt}", qk.weight_kernel, types, const, warps
    for source, chunk, pack4, warps in ((0, 128, True, 4), (0, 128, True, 8), (1, 128, True, 8), (3, 128, True, 8),
                                        (0, 32, False, 4), (0, 32, True, 4), (0, 32, True, 8), (0, 64, True, 8),
                                        (3, 32, True, 4)):  # both layouts from one launch
        const = dict(SOURCE=source, TOPK=8 if source == 3 else 1, HAS_WEIGHT=source == 3, CHUNK=chunk, PACK4=pack4,
                     ROUND_SCALE=False, GRID_ROUND=False, FAST_SIGMOID=source in (1, 2))
        dual_types = {**types, "b_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*fp32"}
        yield (f"dual_quant source {source} CHUNK {chunk} PACK4={pack4} w{warps}", qk.dual_quant_kernel, dual_types,
               const, warps)
    for source, block_k, pack4, warps, paired in (
            (3, 32, False, 4, False), (3, 32, True, 1, False), (3, 32, True, 4, False), (3, 64, True, 4, False),
            (3, 64, True, 8, False), (1, 32, True, 4, False), (2, 32, True, 4, False), (2, 64, True, 8, False),
            (0, 32, True, 4, False), (2, 32, True, 4, True), (2, 64, True, 8, True), (2, 32, True, 2, True),
            (2, 32, False, 4, True), (2, 16, True, 4, True), (2, 32, True, 8, True), (2, 16, True, 2, True)):
        const = dict(SOURCE=source, TOPK=8 if source == 3 else 1, HAS_WEIGHT=source == 3, BLOCK_K=block_k, GROUPS=1,
                     ROUND_SCALE=False, GRID_ROUND=False, PACK4=pack4, ROW_ORDER=True, PAIRED=paired,
                     FAST_SIGMOID=source in (1, 2))  # a producer's transposed layout
        cols_types = {**types, "b_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*fp32"}
        yield (f"cols_quant source {source} BLOCK_K {block_k} PACK4={pack4} w{warps}{' paired' if paired else ''}",
               qk.cols_quant_kernel, cols_types, const, warps)
    from coscale.kernels import swiglu as sw  # SwiGLU's own kernels with the fast sigmoid (inline PTX)

    sw_types = {"g_ptr": "*bf16", "u_ptr": "*bf16", "a_ptr": "*bf16", "da_ptr": "*bf16", "grad_ptr": "*bf16"}
    for name, fn in (("swiglu fwd", sw._swiglu_fwd_kernel), ("swiglu bwd", sw._swiglu_bwd_kernel)):
        yield f"{name} FAST", fn, sw_types, dict(BLOCK=1024, FAST=True), 4
    for block_r, block_c, warps in ((128, 128, 4), (128, 256, 8)):  # W^T through 32-bit words (PTX prmt)
        const = dict(BLOCK_R=block_r, BLOCK_C=block_c, ASM=True)
        yield (f"transpose words {block_r}x{block_c} w{warps}", qk.transpose_words_kernel,
               {"x_ptr": "*i32", "y_ptr": "*i32"}, const, warps)


def mla_cases():
    """The MLA decode split kernel with 16 heads: BF16 cache, FP8 read through bf16, in fp16, in fp16 with the
    cast before shared memory (EARLY_CVT: inline asm, GPU code only), and whole (WHOLE: scales in the latent)."""
    fn = mk.mla_decode_split_kernel.fn
    for name, fp8, lat16, early, whole in (("bf16", False, False, False, False),
                                           ("fp8 via bf16", True, False, False, False),
                                           ("fp8 in fp16", True, True, False, False),
                                           ("fp8 in fp16, early cast", True, True, True, False),
                                           ("fp8 whole tile, early cast", True, True, True, True)):
        types = {"q_ptr": "*bf16", "qpe_ptr": "*bf16", "latent_ptr": "*fp8e4nv" if fp8 else "*bf16",
                 "rope_ptr": "*bf16", "scale_ptr": "*fp32", "table_ptr": "*i32", "seq_lens_ptr": "*i32",
                 "out_ptr": "*fp32", "lse_ptr": "*fp32", "sm_scale_log2": "fp32"}
        for block_n, swap, warps in ((32, 0, 8), (64, 1, 4)):
            tiles = fp8 and not whole  # one chunk per 128-column scale tile
            const = dict(C=512, DR=64, S_Q=1, HEADS_TILE=16, BLOCK_M=16, CHUNK=128 if tiles else 512,
                         NUM_CHUNKS=4 if tiles else 1, BLOCK_R=64, PAGE=64, FP8=fp8, LAT_FP16=lat16, EARLY_CVT=early,
                         WHOLE=whole, NT=4 if whole else 1, LAZY=0,
                         DOT_FP32=False, PRECISION="tf32", BLOCK_N=block_n, SWAP=swap)
            yield f"mla decode {name} n{block_n} swap{swap} w{warps}", fn, types, const, warps


def gluon_cases():
    """The Gluon kernels: the grouped FP8 GEMMs (coscale.kernels._fp8_grouped_gluon) and the FP8-cache MLA decodes
    (coscale.kernels._mla_decode_gluon_regs and _mla_decode_gluon): (label, which, cfg, K steps an iteration)."""
    from coscale.kernels import _fp8_grouped_gluon as gm

    for cfg in gm.GLUON_MM_CANDIDATES:
        for defer in (cfg["DEFER_MAX"], 7, 1):
            yield f"gluon mm {cfg['BLOCK_M']}x{cfg['BLOCK_N']} s{cfg['STAGES']} defer {defer}", "mm", cfg, defer
    for cfg in gm.GLUON_WGRAD_CANDIDATES:
        ring = " ring" if cfg.get("A_RING") else ""
        yield f"gluon wgrad {cfg['BLOCK_M']}x{cfg['BLOCK_N']} s{cfg['STAGES']}{ring}", "wgrad", cfg, 1
    # the FP8-cache MLA decode (coscale.kernels._mla_decode_gluon_regs, the default, at each ring depth, and
    # coscale.kernels._mla_decode_gluon): 16 query rows, 64-key pages
    for stages in (4, 3, 2):
        yield f"gluon mla decode fp8 registers 16 rows s{stages}", "decode_regs", {"rows": 16, "s_q": 1,
                                                                                   "stages": stages}, 1
    yield "gluon mla decode fp8 converter 16 rows", "decode", {"rows": 16, "s_q": 1}, 1


def compile_gluon(label: str, which: str, cfg: dict, defer: int, counts: bool, sass_dir: str) -> bool:
    from coscale.kernels import _fp8_grouped_gluon as gm
    from coscale.kernels import _mla_decode_gluon as dm
    from coscale.kernels import _mla_decode_gluon_regs as dr

    t0 = time.perf_counter()
    try:
        if which in ("decode", "decode_regs"):
            kernel = (dm if which == "decode" else dr).compile_for_sm90(**cfg)
        else:
            kernel = gm.compile_for_sm90(which, cfg, defer)
    except Exception as exc:  # noqa: BLE001 - report every variant
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return False
    extra = f"; {sass_counts(kernel.asm['cubin'])}, {kernel.metadata.shared} B shared" if counts else ""
    if sass_dir:
        with open(os.path.join(sass_dir, re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".sass"), "w") as out:
            out.write(sass_text(kernel.asm["cubin"]))
    print(f"ok   {label}: {time.perf_counter() - t0:.1f} s, {len(kernel.asm['cubin'])} bytes of cubin{extra}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="SASS instructions, registers and shared memory")
    parser.add_argument("--only", default="", help="compile only the variants whose label holds this text")
    parser.add_argument("--sass", default="", metavar="DIR", help="write each variant's SASS to DIR/<label>.sass")
    args = parser.parse_args()
    if args.sass:
        try:
            os.makedirs(args.sass, exist_ok=True)
        except OSError as exc:
            parser.error(f"--sass {args.sass}: {exc.strerror}")
    ok = True
    for label, fn, types, const, warps in [*quant_cases(), *logfmt_cases(), *mla_cases()]:
        if args.only in label:
            ok &= compile_one(label, fn, types, const, warps, args.counts, args.sass)
    for label, which, cfg, defer in gluon_cases():
        if args.only in label:
            ok &= compile_gluon(label, which, cfg, defer, args.counts, args.sass)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
