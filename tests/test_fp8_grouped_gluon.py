"""The Gluon grouped FP8 GEMM (coscale.kernels._fp8_grouped_gluon).

Gluon has no interpreter, so on the CPU the kernel is compiled for sm_90 (Triton's wheel carries ptxas) and
its machine code checked for what would silently cost its speed (wgmma serialized by ptxas, spills); on a
Hopper GPU it runs against the TMA kernel, which is CPU-tested under the interpreter: the same products
promoted in the same order, so the same bits.
"""

from __future__ import annotations

import re

import pytest
import torch

from coscale.kernels import _fp8_grouped_gluon as gm
from coscale.kernels import fp8_grouped_kernels as kernels
from coscale.kernels import quant as q
from coscale.kernels.fp8_grouped_gemm import expert_tile_map, fp8_grouped_mm_ref, quantize_expert_weights
from sm90 import compile_ptx, on_hopper, ptxas_report

needs_gluon = pytest.mark.skipif(not gm.gluon_available(), reason="needs triton with Gluon's Hopper API")



@needs_gluon
@pytest.mark.timeout(120)
@pytest.mark.parametrize("defer", [8, 7])
def test_the_kernel_compiles_for_sm90_with_overlapped_unserialized_wgmma(defer, tmp_path):
    """An sm_90 compile (no GPU needed): DEFER products an iteration, each waited with one still in flight
    but the last, and ptxas neither serializes the wgmma (warning C7514: what a product read across the
    loop's back edge, or promotions sunk past their waits, cause) nor spills."""
    ptx, _ = compile_ptx("coscale.kernels._fp8_grouped_gluon", ["mm", gm.GLUON_MM_CANDIDATES[0], defer], tmp_path)
    per_product = 4  # a 128-deep product is four k32 wgmma instructions
    assert ptx.count("wgmma.mma_async") == defer * per_product
    assert len(re.findall(r"wgmma\.wait_group\.sync\.aligned 1;", ptx)) == defer - 1
    assert len(re.findall(r"wgmma\.wait_group\.sync\.aligned 0;", ptx)) == 1
    report = ptxas_report(ptx, tmp_path)
    assert "C7514" not in report and "serialized" not in report, report
    assert re.search(r"\b0 bytes spill stores", report), report


@needs_gluon
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cfg", gm.GLUON_WGRAD_CANDIDATES, ids=lambda c: "{}x{}s{}{}".format(
    c["BLOCK_M"], c["BLOCK_N"], c["STAGES"], "ring" if c.get("A_RING") else ""))
def test_the_wgrad_kernel_compiles_for_sm90_with_overlapped_unserialized_wgmma(cfg, tmp_path):
    """The weight-gradient kernel: two chunks an iteration, the first waited with the second in flight, no
    serialized wgmma, and at most a few spilled scalars (the 128x128 tile's math warps hold two products, the
    accumulator and a chunk's column scales: its epilogue's tile coordinates go to local memory)."""
    ptx, _ = compile_ptx("coscale.kernels._fp8_grouped_gluon", ["wgrad", cfg], tmp_path)
    # two 128-deep products of 4 instructions (k 32) for each 64 rows a warpgroup holds
    assert ptx.count("wgmma.mma_async") == 2 * 4 * cfg["BLOCK_M"] // (16 * cfg["num_warps"])
    assert len(re.findall(r"wgmma\.wait_group\.sync\.aligned 1;", ptx)) == 1
    report = ptxas_report(ptx, tmp_path)
    assert "C7514" not in report and "serialized" not in report, report
    spilled = [int(b) for b in re.findall(r"(\d+) bytes spill stores", report)]
    assert spilled and max(spilled) <= 32, report


def test_off_hopper_the_launcher_declines_so_the_picker_skips_it():
    """Not a user error (a CoscaleError would stop the picker): a plain exception the picker skips."""
    x = torch.zeros(128, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="sm_90"):
        gm.launch_grouped_mm_gluon(x, torch.ones(128, 1), x.view(1, 128, 128), torch.ones(1, 1, 1),
                                   torch.zeros(1, dtype=torch.int32), torch.empty(128, 128),
                                   gm.GLUON_MM_CANDIDATES[0])  # fmt: skip
    gluon = [c for c in kernels.MM_PICKER.candidates if c.get("GLUON")]
    assert len(gluon) == len(gm.GLUON_MM_CANDIDATES)
    assert not kernels.MM_PICKER.candidates[0].get("GLUON")  # what runs where nothing can be timed
    with pytest.raises(RuntimeError, match="sm_90"):
        one_expert = torch.tensor([128], dtype=torch.int32)
        gm.launch_grouped_wgrad_gluon(x, torch.ones(128, 1), x, torch.ones(128, 1), one_expert,
                                      torch.empty(1, 128, 128), gm.GLUON_WGRAD_CANDIDATES[0])  # fmt: skip


@on_hopper
@pytest.mark.parametrize("steps", [1, 5, 7, 12, 16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_gluon_matches_the_tma_kernel_bit_for_bit(steps, out_dtype):
    """K of 1-16 steps of 128 (DEFER 1, 5, 7, 6, 8), empty experts first, between and last, rows after the
    last expert (zeros), a row of zeros, huge and tiny rows, an output pre-filled with NaN (every element
    is written), every candidate: the same bits as the TMA kernel, and close to the float64 reference."""
    torch.manual_seed(steps)
    k, n = 128 * steps, 384
    counts = [0, 256, 0, 384, 128, 0]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    m = int(offsets[-1]) + 128 + 40
    x = torch.randn(m, k, device="cuda")
    x[3] = 0
    x[130] *= 1e4
    x[260] *= 1e-4
    xq, xs = q.act_quant_1x128(x)
    wq, ws = quantize_expert_weights(torch.randn(len(counts), n, k, device="cuda") * k**-0.5)
    tile_expert = expert_tile_map(offsets, m)
    tma_cfg = kernels.MM_CANDIDATES[1]
    expected = kernels.launch_grouped_mm_tma(xq, xs, wq, ws, tile_expert, torch.empty(m, n, device="cuda",
                                                                                       dtype=out_dtype), tma_cfg)
    reference = fp8_grouped_mm_ref(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), offsets.cpu(), torch.float32).double()
    for cfg in gm.GLUON_MM_CANDIDATES:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
        gm.launch_grouped_mm_gluon(xq, xs, wq, ws, tile_expert, out, cfg)
        assert torch.equal(out, expected), (cfg, int((out != expected).sum()))
        assert not out[int(offsets[-1]):].any()
        tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
        assert torch.allclose(out.double().cpu(), reference, rtol=tol, atol=tol * float(reference.abs().max()))


@on_hopper
def test_gpu_the_picker_may_choose_gluon_and_the_op_still_matches():
    """fp8_grouped_mm through the picker (which times the Gluon candidates beside the TMA kernel's) at a
    V3-like expert shape: whatever it picks gives the TMA kernel's bits."""
    from coscale.kernels.fp8_grouped_gemm import fp8_grouped_mm

    torch.manual_seed(0)
    offsets = (torch.arange(1, 9) * 256).to(torch.int32).cuda()
    m, k, n = 2048, 2048, 1024
    xq, xs = q.act_quant_1x128(torch.randn(m, k, device="cuda"))
    wq, ws = quantize_expert_weights(torch.randn(8, n, k, device="cuda") * k**-0.5)
    got = fp8_grouped_mm(xq, xs, wq, ws, offsets)
    tile_expert = expert_tile_map(offsets, m)
    tma_cfg = kernels.MM_CANDIDATES[1]
    expected = kernels.launch_grouped_mm_tma(xq, xs, wq, ws, tile_expert, torch.empty_like(got), tma_cfg)
    assert torch.equal(got, expected)


@on_hopper
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_gluon_wgrad_matches_the_tma_kernel_bit_for_bit(out_dtype):
    """Experts of 0-5 chunks (empty first, between and last; odd counts take their last chunk twice with zero
    scales), NaN in the tokens after the last expert (never read), an output pre-filled with NaN (every element
    written, empty experts by the zeros launch): the TMA kernel's values, and close to the float64 reference."""
    from coscale.kernels.fp8_grouped_gemm import fp8_grouped_wgrad_ref

    torch.manual_seed(1)
    counts = [0, 128, 384, 0, 256, 640, 0]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    mp = int(offsets[-1]) + 256
    n, k = 256, 384
    dy = torch.randn(mp, n, device="cuda")
    x = torch.randn(mp, k, device="cuda")
    dy[int(offsets[-1]):] = float("nan")
    _, _, dyt, dyts = q.act_quant_1x128_dual(dy, pad_t=True)
    _, _, xt, xts = q.act_quant_1x128_dual(x, pad_t=True)
    expected = kernels.launch_grouped_wgrad_tma(dyt, dyts, xt, xts, offsets,
                                                torch.empty(len(counts), n, k, device="cuda", dtype=out_dtype),
                                                kernels.WGRAD_CANDIDATES[1])  # fmt: skip
    reference = fp8_grouped_wgrad_ref(dyt.cpu(), dyts.cpu(), xt.cpu(), xts.cpu(), offsets.cpu()).double()
    ran = 0
    for cfg in gm.GLUON_WGRAD_CANDIDATES:
        out = torch.full((len(counts), n, k), float("nan"), device="cuda", dtype=out_dtype)
        try:
            kernels.launch_grouped_wgrad(dyt, dyts, xt, xts, offsets, out, {**cfg, "GLUON": True})
        except ValueError as exc:  # 128x128 tiles with an FP32 output and 4 stages: not enough shared memory
            assert "shared memory" in str(exc) and out_dtype == torch.float32
            continue
        ran += 1
        assert torch.equal(out, expected), (cfg, int((out != expected).sum()))
        tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
        assert torch.allclose(out.double().cpu(), reference, rtol=tol, atol=tol * float(reference.abs().max()))
    assert ran >= 2


@on_hopper
def test_gpu_gluon_wgrad_of_one_long_expert_matches_the_tma_kernel():
    """One expert of 17 chunks (FP8Linear's weight gradient, an odd count): every candidate, A streamed or
    not, gives the TMA kernel's bits."""
    torch.manual_seed(2)
    tokens, n, k = 17 * 128, 256, 512
    offsets = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    _, _, dyt, dyts = q.act_quant_1x128_dual(torch.randn(tokens, n, device="cuda"), pad_t=True)
    _, _, xt, xts = q.act_quant_1x128_dual(torch.randn(tokens, k, device="cuda"), pad_t=True)
    expected = kernels.launch_grouped_wgrad_tma(dyt, dyts, xt, xts, offsets,
                                                torch.empty(1, n, k, device="cuda", dtype=torch.bfloat16),
                                                kernels.WGRAD_CANDIDATES[1])  # fmt: skip
    for cfg in gm.GLUON_WGRAD_CANDIDATES:
        out = torch.full((1, n, k), float("nan"), device="cuda", dtype=torch.bfloat16)
        kernels.launch_grouped_wgrad(dyt, dyts, xt, xts, offsets, out, {**cfg, "GLUON": True})
        assert torch.equal(out, expected), (cfg, int((out != expected).sum()))
