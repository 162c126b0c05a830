"""Grouped GEMM (a @ b[e]^T per expert segment) and its gradients against a per-segment loop."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels.grouped_gemm import grouped_mm

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def _torch_grouped_mm_on_cpu() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.randn(16, 8), torch.randn(1, 8, 8), offs=torch.tensor([16], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


BACKENDS = ["loop"]
if HAVE_TRITON:
    BACKENDS.append("triton")
if _torch_grouped_mm_on_cpu():
    BACKENDS.append("torch")

# group sizes: empty groups, a single row, ragged sizes, one group with everything
SIZES = [
    [16, 0, 32, 16],
    [0, 1, 0, 5, 17, 2],
    [0, 0, 48, 0],
    [33, 7, 0, 64, 1, 9, 0],
]


def _reference(a, b, sizes):
    """Plain autograd-able loop; rows outside every group are zero."""
    outs, start = [], 0
    for e, n in enumerate(sizes):
        outs.append(a[start : start + n] @ b[e].t())
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", SIZES)
def test_forward_and_gradients_match_loop(backend, sizes):
    if backend == "torch" and any(n % 16 for n in sizes):
        sizes = [(n + 15) // 16 * 16 for n in sizes]  # torch._grouped_mm wants 16-aligned groups
    gen = torch.Generator().manual_seed(sum(sizes))
    E, N, K = len(sizes), 40, 24
    M = sum(sizes)
    a = torch.randn(M, K, generator=gen, requires_grad=True)
    b = torch.randn(E, N, K, generator=gen, requires_grad=True)
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = grouped_mm(a, b, offs, backend=backend)
    ref = _reference(a, b, sizes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn(M, N, generator=gen)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    ga_ref, gb_ref = torch.autograd.grad(ref, (a, b), g)
    torch.testing.assert_close(ga, ga_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-4)
    for e, n in enumerate(sizes):
        if n == 0:  # an expert without rows gets an exactly zero weight gradient
            assert torch.equal(gb[e], torch.zeros_like(gb[e]))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_triton_takes_strided_weights():
    """b given as a transposed view ([E, K, N] storage) and a with a padded row stride."""
    gen = torch.Generator().manual_seed(1)
    sizes = [5, 0, 20]
    storage = torch.randn(3, 24, 40, generator=gen)  # [E, K, N]
    b = storage.transpose(1, 2)  # [E, N, K], non-contiguous
    a = torch.randn(25, 32, generator=gen)[:, :24]
    offs = torch.tensor([5, 5, 25], dtype=torch.int32)
    torch.testing.assert_close(
        grouped_mm(a, b, offs, backend="triton"), _reference(a, b, sizes), rtol=1e-4, atol=1e-4
    )


def test_bf16_loop_matches_float32_within_bf16_tolerance():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(48, 64, generator=gen)
    b = torch.randn(3, 32, 64, generator=gen) / 8
    offs = torch.tensor([16, 16, 48], dtype=torch.int32)
    out = grouped_mm(a.bfloat16(), b.bfloat16(), offs, backend="loop")
    torch.testing.assert_close(out.float(), _reference(a, b, [16, 0, 32]), rtol=2e-2, atol=5e-2)


def test_contract_errors():
    a, b = torch.randn(8, 4), torch.randn(2, 3, 4)
    with pytest.raises(CoscaleError, match="int32"):
        grouped_mm(a, b, torch.tensor([4, 8]))
    with pytest.raises(CoscaleError, match="b \\[E, N, K\\]"):
        grouped_mm(a, torch.randn(2, 3, 5), torch.tensor([4, 8], dtype=torch.int32))
    with pytest.raises(CoscaleError, match="backend"):
        grouped_mm(a, b, torch.tensor([4, 8], dtype=torch.int32), backend="cublas")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_autotuning_times_decode_tiles_for_decode_and_prefill_tiles_for_prefill():
    from coscale.kernels import grouped_gemm

    configs = grouped_gemm._MM_CONFIGS[0]  # the GPU's candidates
    def heights(rows):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                for c in grouped_gemm._prune_mm_configs(configs, {"ROWS_PER_EXPERT": rows})}

    decode, prefill = heights(16), heights(2048)
    assert decode and prefill and max(m for m, _ in decode) <= 32 and min(n for _, n in prefill) >= 128
    assert (16, 64) in decode and (128, 256) in prefill and (16, 64) not in prefill
    # never empty: the interpreter's single candidate survives any key
    assert grouped_gemm._prune_mm_configs([grouped_gemm._MM_CONFIGS[1]], {"ROWS_PER_EXPERT": 4096})


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_auto_takes_the_triton_kernel_at_decode_and_cutlass_beyond():
    from coscale.kernels.grouped_gemm import DECODE_ROWS_PER_EXPERT, prefers_torch_grouped_mm

    # V2-Lite at batch 16: 16 x 6 routes padded to 16 rows for each of 64 experts
    assert not prefers_torch_grouped_mm(16 * 6 + 64 * 15, 64)
    assert not prefers_torch_grouped_mm(DECODE_ROWS_PER_EXPERT * 64, 64)
    assert prefers_torch_grouped_mm(DECODE_ROWS_PER_EXPERT * 64 + 1, 64)
    assert prefers_torch_grouped_mm(8192 * 4, 16)  # proxy-v3's training step: 2,048 rows an expert
