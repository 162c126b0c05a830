"""Grouped FP8 GEMMs for the routed experts: kernels vs references, autograd vs float64."""

import contextlib
import functools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import coscale
from coscale.errors import CoscaleError
from coscale.kernels import fp8_grouped_kernels as kernels
from coscale.kernels import quant as q
from coscale.kernels.fp8_grouped_gemm import (
    expert_tile_map,
    fp8_grouped_mm,
    fp8_grouped_mm_ref,
    fp8_grouped_wgrad,
    fp8_grouped_wgrad_ref,
    quantize_expert_weights,
)
from coscale.kernels.fp8_grouped_linear import fp8_grouped_gate_up, fp8_grouped_linear

BOUND = 0.07  # see tests/test_fp8_gemm.py
needs_triton = pytest.mark.skipif(
    not (q.triton_available() and (q.interpreting() or torch.cuda.is_available())), reason="needs triton"
)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def offsets_of(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def reference_linear(x, w, offsets):
    m = x.shape[0]
    expert = torch.searchsorted(offsets.long(), torch.arange(m), right=True)
    valid = expert < w.shape[0]
    out = torch.zeros(m, w.shape[1], dtype=torch.float64)
    out[valid] = torch.einsum("mk,mnk->mn", x[valid], w[expert[valid]])
    return out


@needs_triton
@pytest.mark.parametrize(
    "counts,extra", [([128, 0, 256], 128), ([256, 128], 0), ([128, 0, 256], 37), ([0, 128, 0, 0, 256, 0], 128)]
)
def test_triton_grouped_mm_and_wgrad_match_reference(counts, extra):
    torch.manual_seed(0)
    e, n, k = len(counts), 128, 256
    off = offsets_of(counts)
    m = int(off[-1]) + extra  # rows after the last expert produce zeros
    x, w, dy = torch.randn(m, k), torch.randn(e, n, k), torch.randn(m, n)
    x[int(off[-1]) :] = float("nan")  # rows after the last expert are never read into an output
    dy[int(off[-1]) :] = float("nan")
    xq, xs, xt, xts = q.act_quant_1x128_dual(x, backend="torch")
    wq, ws = quantize_expert_weights(w, backend="torch")
    out = fp8_grouped_mm(xq, xs, wq, ws, off, torch.float32, backend="triton")
    oracle = fp8_grouped_mm_ref(xq, xs, wq, ws, off, torch.float32)
    assert torch.allclose(out, oracle, rtol=1e-4, atol=1e-4 * float(oracle.abs().max()))
    assert torch.equal(out[int(off[-1]) :], torch.zeros(extra, n))
    assert rel(out, reference_linear(x.double(), w.double(), off)) < BOUND
    _, _, dyt, dyts = q.act_quant_1x128_dual(dy, backend="torch")
    dw = fp8_grouped_wgrad(dyt, dyts, xt, xts, off, backend="triton")
    dw_oracle = fp8_grouped_wgrad_ref(dyt, dyts, xt, xts, off)
    assert torch.allclose(dw, dw_oracle, rtol=1e-4, atol=1e-4 * float(dw_oracle.abs().max()))
    for e, c in enumerate(counts):
        if c == 0:  # an expert with no tokens gets an exactly zero gradient
            assert torch.equal(dw[e], torch.zeros(n, k))
    # the chunk -> expert map a caller already has gives the same bits; a wrong one is refused
    chunks = expert_tile_map(off, xt.shape[1])
    assert torch.equal(fp8_grouped_wgrad(dyt, dyts, xt, xts, off, backend="triton", chunk_expert=chunks), dw)
    with pytest.raises(CoscaleError, match="chunk_expert must be"):
        fp8_grouped_wgrad(dyt, dyts, xt, xts, off, backend="triton", chunk_expert=chunks[1:])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "counts,n,k",
    [([128, 256], 128, 256), ([50, 0, 120], 100, 200), ([0, 0, 64], 128, 128)],
)
def test_grouped_linear_forward_backward(backend, counts, n, k):
    torch.manual_seed(1)
    off = torch.tensor(counts).cumsum(0)
    m = int(off[-1])
    x = torch.randn(m, k, requires_grad=True)
    w = (torch.randn(len(counts), n, k) * 0.05).requires_grad_()
    y = fp8_grouped_linear(x, w, off, backend=backend)
    dy = torch.randn(m, n)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = reference_linear(x64, w64, off)
    y64.backward(dy.double())
    assert y.shape == (m, n) and w.grad.shape == w.shape
    assert rel(y, y64) < BOUND and rel(x.grad, x64.grad) < BOUND
    used = [e for e, c in enumerate(counts) if c > 0]
    assert rel(w.grad[used], w64.grad[used]) < BOUND
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(w.grad[e], torch.zeros(n, k))


def test_grouped_linear_bf16_and_trailing_rows():
    off = torch.tensor([128, 256])
    x = torch.randn(300, 128, dtype=torch.bfloat16)
    w = torch.randn(2, 128, 128, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_grouped_linear(x, w, off)
    assert y.dtype == torch.bfloat16 and torch.equal(y[256:].float(), torch.zeros(44, 128))
    y.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16


def test_grouped_nan_propagates():
    off = torch.tensor([128, 256])
    x = torch.randn(256, 128)
    x[200, 3] = float("nan")
    y = fp8_grouped_linear(x, torch.randn(2, 128, 128), off)
    assert torch.all(torch.isnan(y[200])) and torch.isfinite(y[:128]).all()


def test_grouped_contract_errors():
    a = torch.zeros(128, 128).to(q.FP8_DTYPE)
    b = torch.zeros(2, 128, 128).to(q.FP8_DTYPE)
    with pytest.raises(CoscaleError, match="group_end_offsets"):
        fp8_grouped_mm(a, torch.ones(128, 1), b, torch.ones(2, 1, 1), torch.tensor([128]))
    with pytest.raises(CoscaleError, match="b_scale"):
        fp8_grouped_mm(a, torch.ones(128, 1), b, torch.ones(2, 2, 1), torch.tensor([64, 128]))
    with pytest.raises(CoscaleError, match="w"):
        fp8_grouped_linear(torch.randn(4, 64), torch.randn(2, 32, 48), torch.tensor([2, 4]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("i,k", [(128, 256), (100, 200)])
def test_gate_up_equals_two_linears(backend, i, k):
    torch.manual_seed(4)
    off = torch.tensor([128, 128, 384])
    x = torch.randn(384, k, requires_grad=True)
    wg = (torch.randn(3, i, k) * 0.05).requires_grad_()
    wu = (torch.randn(3, i, k) * 0.05).requires_grad_()
    gu = fp8_grouped_gate_up(x, wg, wu, off, backend=backend)
    assert gu.shape == (384, 2 * i)
    dy = torch.randn(384, 2 * i)
    gu.backward(dy)
    grads = [t.grad.clone() for t in (x, wg, wu)]
    for t in (x, wg, wu):
        t.grad = None
    g = fp8_grouped_linear(x, wg, off, backend=backend, aligned=True)
    u = fp8_grouped_linear(x, wu, off, backend=backend)
    torch.cat([g, u], 1).backward(dy)
    # same quantized operands: forward and weight gradients agree to FP32 summation order; dX sums
    # two GEMMs in one accumulator instead of two rounded outputs
    tol = dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(gu, torch.cat([g, u], 1), **tol)
    assert torch.allclose(grads[1], wg.grad, **tol) and torch.allclose(grads[2], wu.grad, **tol)
    assert rel(grads[0], x.grad) < 1e-5
    assert torch.equal(wg.grad[1], torch.zeros(i, k))  # expert 1 has no rows
    x64, wg64 = x.detach().double(), wg.detach().double()
    assert rel(gu[:, :i], reference_linear(x64, wg64, off)) < BOUND


@needs_triton
def test_empty_and_misaligned_inputs_on_the_triton_path():
    torch.manual_seed(6)
    w = (torch.randn(2, 128, 128) * 0.1).requires_grad_()
    x = torch.zeros(0, 128, requires_grad=True)
    fp8_grouped_linear(x, w, torch.tensor([0, 0]), backend="triton").sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    # an operand view whose base is not 16-byte aligned is copied for the tensor descriptor
    off = offsets_of([128])
    big = torch.randn(128, 128 + 8)
    xq, xs = q.act_quant_1x128(big, backend="torch")
    wq, ws = quantize_expert_weights(torch.randn(1, 128, 128), backend="torch")
    xv = torch.cat([torch.zeros(128, 8, dtype=q.FP8_DTYPE), torch.zeros(128, 128, dtype=q.FP8_DTYPE)], 1)
    xv[:, 8:] = xq[:, :128]
    got = fp8_grouped_mm(xv[:, 8:], xs[:, :1], wq, ws, off, torch.float32, backend="triton")
    oracle = fp8_grouped_mm_ref(xq[:, :128], xs[:, :1], wq, ws, off, torch.float32)
    assert torch.allclose(got, oracle, rtol=1e-4, atol=1e-4 * float(oracle.abs().max()))


def test_tile_shapes_must_divide_the_scale_block():
    with pytest.raises(CoscaleError, match="BLOCK_N must divide 128"):
        kernels._check_tiles({"BLOCK_M": 64, "BLOCK_N": 256})


@needs_triton
@pytest.mark.parametrize("which", ["mm", "wgrad"])
def test_every_gpu_candidate_configuration_matches_the_reference(which, monkeypatch):
    """The configurations the GPU picks among (TMA bulk stores, persistent grids; FLATTEN only changes
    the GPU pipeliner, the interpreter ignores it) on ragged segments, rows after the last expert, an
    N that is not a multiple of the tile rows and a bf16 output whose rows are not 16-byte aligned
    (the bulk store must fall back to pointer stores for both), in fp32 and bf16. Under the interpreter on
    CPU tensors, and compiled on the GPU where one is (with TRITON_INTERPRET=0)."""
    dev = "cpu" if q.interpreting() else "cuda"
    real = kernels._tensor_descriptor()
    made = []

    class SpyDescriptor:  # counts descriptors: A, B, and C when the bulk store is used
        @staticmethod
        def from_tensor(t, block):
            made.append(tuple(block))
            return real.from_tensor(t, block)

    monkeypatch.setattr(kernels, "_tensor_descriptor", lambda: SpyDescriptor)
    torch.manual_seed(7)
    off = offsets_of([128, 0, 256]).to(dev)
    m = int(off[-1]) + 37

    def check(launch, oracle, out, cfg, storable):
        made.clear()
        got = launch(out, cfg)
        assert len(made) == (3 if cfg.get("TMA_STORE") and storable else 2), cfg
        scale = float(oracle.abs().max())
        # FP8 tensor cores add a 128-deep product in less than FP32's precision (tests below): 1e-3 on a GPU
        rtol = 1e-2 if out.dtype == torch.bfloat16 else (1e-4 if dev == "cpu" else 1e-3)
        assert torch.allclose(got.float(), oracle, rtol=rtol, atol=rtol * scale), cfg

    if which == "mm":
        x = torch.randn(m, 256, device=dev)
        xq, xs = q.act_quant_1x128(x, backend="torch")
        wq, ws = quantize_expert_weights(torch.randn(3, 256, 256, device=dev), backend="torch")
        oracle = fp8_grouped_mm_ref(xq, xs, wq, ws, off, torch.float32)
        tile_expert = expert_tile_map(off, m)
        for cfg in kernels.MM_CANDIDATES:
            for dtype in (torch.float32, torch.bfloat16):
                out = torch.full((m, 256), 7.0, dtype=dtype, device=dev)
                launch = functools.partial(kernels.launch_grouped_mm_tma, xq, xs, wq, ws, tile_expert)
                check(launch, oracle, out, cfg, True)
        return
    for n, k, dtype in ((256, 256, torch.float32), (192, 256, torch.float32), (256, 100, torch.bfloat16)):
        _, _, xt, xts = q.act_quant_1x128_dual(torch.randn(m, k, device=dev), backend="torch")
        _, _, dyt, dyts = q.act_quant_1x128_dual(torch.randn(m, n, device=dev), backend="torch")
        oracle = fp8_grouped_wgrad_ref(dyt, dyts, xt, xts, off)
        storable = (k * torch.empty(0, dtype=dtype).element_size()) % 16 == 0
        for cfg in kernels.WGRAD_CANDIDATES:
            out = torch.full((3, n, k), 7.0, dtype=dtype, device=dev)
            launch = functools.partial(kernels.launch_grouped_wgrad_tma, dyt, dyts, xt, xts, off)
            check(launch, oracle, out, cfg, storable and n % cfg["BLOCK_M"] == 0)


@contextlib.contextmanager
def host_reads_in_coscale():
    """Every read of a tensor's value by the host (.item(), .tolist(), bool(), int(), ...) made from
    coscale's own code: on CUDA each one is a device-to-host synchronisation."""
    package = os.path.dirname(coscale.__file__) + os.sep
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    seen = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(package):
                seen.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@needs_triton
def test_aligned_fp8_paths_never_read_the_device_back():
    """The MoE FP8 path (gate+up, down with aligned=True) and FP8Linear, forward and backward, on the
    Triton path: no host read of a tensor value anywhere in coscale (the references may loop)."""
    from coscale.fp8 import FP8Linear

    torch.manual_seed(8)
    off = offsets_of([128, 0, 128])
    x = torch.randn(256, 128, requires_grad=True)
    wg, wu = ((torch.randn(3, 128, 128) * 0.05).requires_grad_() for _ in range(2))
    wd = (torch.randn(3, 128, 128) * 0.05).requires_grad_()
    layer = FP8Linear(128, 128, bias=False, backend="triton")
    with host_reads_in_coscale() as seen:
        gate_up = fp8_grouped_gate_up(x, wg, wu, off, backend="triton")
        y = fp8_grouped_linear(gate_up[:, :128] * gate_up[:, 128:], wd, off, backend="triton", aligned=True)
        (y.square().sum() + layer(x).square().sum()).backward()
    assert seen == []
    with host_reads_in_coscale() as seen:  # the spy sees what it should: the unaligned path's one sync
        fp8_grouped_linear(x[:200], wd, torch.tensor([100, 100, 200]), backend="triton")
    assert any("tolist" in s for s in seen)


@pytest.mark.skipif(not torch.cuda.is_available() or q.interpreting(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_every_wgrad_candidate_matches_the_reference(out_dtype):
    """On the GPU: each weight-gradient configuration against the dequantized reference, with empty
    experts first, between and last, ragged segments, NaN in the rows after the last expert (never
    read) and an output pre-filled with garbage (every element is written)."""
    torch.manual_seed(11)
    dev = "cuda"
    counts = [0, 384, 128, 0, 0, 1024, 256, 0]
    off = offsets_of(counts).to(dev)
    m = int(off[-1]) + 512
    n, k = 256, 512
    dy, x = torch.randn(m, n, device=dev), torch.randn(m, k, device=dev)
    dy[int(off[-1]) :] = float("nan")
    x[int(off[-1]) :] = float("nan")
    _, _, dyt, dyts = q.act_quant_1x128_dual(dy)
    _, _, xt, xts = q.act_quant_1x128_dual(x)
    oracle = fp8_grouped_wgrad_ref(dyt, dyts, xt, xts, off)
    from triton.runtime.errors import OutOfResources

    ran = 0
    for cfg in kernels.WGRAD_CANDIDATES:
        out = torch.full((len(counts), n, k), float("nan"), device=dev, dtype=out_dtype)
        try:
            got = kernels.launch_grouped_wgrad_tma(dyt, dyts, xt, xts, off, out, cfg).float()
        except OutOfResources:  # the picker would skip such a candidate; none is expected here
            continue
        ran += 1
        # FP8 tensor cores add a 128-deep product in less than FP32's precision (the reason for the
        # promotion every 128 tokens): 1e-3 of the largest gradient, bf16's rounding on top
        rtol = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
        assert torch.allclose(got, oracle, rtol=rtol, atol=rtol * float(oracle.abs().max())), cfg
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.equal(got[e], torch.zeros(n, k, device=dev)), (cfg, e)
    assert ran == len(kernels.WGRAD_CANDIDATES)


@needs_triton
@pytest.mark.parametrize("by_expert", [False, True])
@pytest.mark.parametrize("sms", [1, 3, 5, 7])
def test_wgrad_persistent_grids_of_any_size_cover_every_position(sms, by_expert, monkeypatch):
    """The weight-gradient kernel steps each program through positions pid, pid + grid, ... by
    counters (no division): grids that do not divide the column-tile count, or exceed it, must still
    cover every output position exactly once. The by-expert kernel strides over (expert, row tile)
    items, experts of one, two and three chunks among them."""
    monkeypatch.setattr(kernels, "_num_sms", lambda device: sms)
    torch.manual_seed(12)
    off = offsets_of([256, 0, 128, 384] if by_expert else [256, 0, 128])
    m, n, k = int(off[-1]), 192, 320  # 3 x 5 positions of 64 x 64
    _, _, xt, xts = q.act_quant_1x128_dual(torch.randn(m, k), backend="torch")
    _, _, dyt, dyts = q.act_quant_1x128_dual(torch.randn(m, n), backend="torch")
    oracle = fp8_grouped_wgrad_ref(dyt, dyts, xt, xts, off)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "STAGES": 1, "num_warps": 4, "PROGRAMS_PER_SM": 1, "BY_EXPERT": by_expert}
    got = kernels.launch_grouped_wgrad_tma(dyt, dyts, xt, xts, off, torch.full((len(off), n, k), 7.0), cfg)
    assert torch.allclose(got, oracle, rtol=1e-4, atol=1e-4 * float(oracle.abs().max()))


@needs_triton
def test_wgrad_by_expert_never_reads_another_experts_tokens():
    """The by-expert kernel keeps two chunks of an expert's dY^T; a one-chunk expert takes its only chunk twice
    (the second time with zero scales) rather than the next expert's: NaN tokens in the neighbour (or past the
    end) must not reach its gradient, whose value is the reference's."""
    dev = "cpu" if q.interpreting() else "cuda"
    torch.manual_seed(13)
    off = offsets_of([128, 128, 256]).to(dev)  # one chunk, one chunk, two chunks
    m, n, k = int(off[-1]) + 128, 128, 192
    dy, x = torch.randn(m, n, device=dev), torch.randn(m, k, device=dev)
    for rows in (slice(128, 256), slice(int(off[-1]), m)):  # the second expert's tokens, the rows past the end
        dy[rows], x[rows] = float("nan"), float("nan")
    _, _, dyt, dyts = q.act_quant_1x128_dual(dy, backend="torch")
    _, _, xt, xts = q.act_quant_1x128_dual(x, backend="torch")
    oracle = fp8_grouped_wgrad_ref(dyt, dyts, xt, xts, off)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "STAGES": 1, "num_warps": 4, "PROGRAMS_PER_SM": 1, "BY_EXPERT": True}
    got = kernels.launch_grouped_wgrad_tma(dyt, dyts, xt, xts, off, torch.full((3, n, k), 7.0, device=dev), cfg)
    assert torch.isnan(got[1]).all() and torch.isnan(oracle[1]).all()  # its own NaN tokens: NaN, as the reference
    for e in (0, 2):
        assert torch.isfinite(got[e]).all(), e
        rtol = 1e-4 if dev == "cpu" else 1e-3
        assert torch.allclose(got[e], oracle[e], rtol=rtol, atol=rtol * float(oracle[e].abs().max())), e
