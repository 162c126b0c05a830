"""The fused FP8 routed experts (coscale.kernels.fp8_moe): the same bits as the unfused composition of
FP8 operations on each backend, close to the high-precision loop, every gradient present or absent as
asked, and no host read on the kernel path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module decorates its kernels

import pytest
import torch

from coscale.kernels import quant as q
from coscale.kernels.fp8_moe import fp8_routed_experts
from coscale.kernels.moe import grouped_experts_forward
from coscale.kernels.permute import build_permute_info
from coscale.model.moe import experts_forward_loop
from test_fp8_grouped_gemm import host_reads_in_coscale
from test_moe_kernels import _routing

BACKENDS = ["torch", "triton"] if q.triton_available() else ["torch"]
NAMES = ["x", "topk_weight", "w_gate", "w_up", "w_down"]


def _problem(kind, T, K, E, H, I, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_()
    idx = _routing(kind, T, K, E, gen)
    w = torch.rand(T, K, generator=gen).requires_grad_()
    ws = [(torch.randn(E, I, H, generator=gen) / H**0.5).requires_grad_() for _ in range(2)]
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).requires_grad_()  # FP32 master weights
    grad_out = torch.randn(T, H, generator=gen).to(dtype)
    return x, idx, w, *ws, w_down, grad_out


def _run(fused, backend, x, idx, w, wg, wu, wd, grad_out):
    out = grouped_experts_forward(x, idx, w, wg, wu, wd, precision="fp8", backend=backend, fused=fused)
    inputs = [t for t in (x, w, wg, wu, wd) if t.requires_grad]
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,T,K,E,H,I,dtype", [("random", 40, 3, 3, 128, 128, torch.float32),
                                                  ("edge", 12, 2, 4, 200, 72, torch.bfloat16),
                                                  ("skewed", 30, 2, 4, 136, 256, torch.float32)])
def test_fused_equals_unfused_and_tracks_the_loop(backend, kind, T, K, E, H, I, dtype):
    x, idx, w, wg, wu, wd, grad_out = _problem(kind, T, K, E, H, I, T + E, dtype)
    out, grads = _run(True, backend, x, idx, w, wg, wu, wd, grad_out)
    ref_out, ref_grads = _run(False, backend, x, idx, w, wg, wu, wd, grad_out)
    assert out.dtype == dtype and torch.equal(out, ref_out)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if name == "topk_weight":  # float32 dot products summed in another order by the fused kernel
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, r), name
    # and FP8 is FP8: within its quantization error of the high-precision per-expert loop
    loop = experts_forward_loop(x.double(), idx, w.double(), wg.double(), wu.double(), wd.double())
    loop_grads = torch.autograd.grad(loop, (x, w, wg, wu, wd), grad_out.double())
    for name, got, want in zip(["out", *NAMES], (out, *grads), (loop, *loop_grads)):
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < 0.12, (name, err)
    edge_empty = set(range(E)) - set(idx.flatten().tolist())
    for e in edge_empty:  # an expert without tokens gets exact zero gradients
        assert all(int(g[e].count_nonzero()) == 0 for g in grads[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("x",), ("topk_weight",), ("w_gate", "w_up"), ("w_down",), ("x", "w_down"),
                                    ("x", "w_gate", "w_up", "w_down")])  # the last: only the router weight
def test_only_the_gradients_asked_for(backend, frozen):
    x, idx, w, wg, wu, wd, grad_out = _problem("random", 24, 2, 3, 128, 128, 9, torch.float32)
    tensors = dict(zip(NAMES, (x, w, wg, wu, wd)))
    for name in frozen:
        tensors[name].requires_grad_(False)
    out, grads = _run(True, backend, x, idx, w, wg, wu, wd, grad_out)
    ref_out, ref_grads = _run(False, backend, x, idx, w, wg, wu, wd, grad_out)
    assert torch.equal(out, ref_out) and len(grads) == 5 - len(frozen)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_quantized_once_change_no_bit(backend, monkeypatch):
    """fp8_moe.QUANTIZE_TOKENS_ONCE (x quantized per token, its FP8 rows gathered) gives the layer's outputs and
    every gradient bit for bit (the permutation has padding rows: 128-row expert segments)."""
    from coscale.kernels import fp8_moe

    x, idx, w, wg, wu, wd, grad_out = _problem("edge", 12, 2, 4, 200, 72, 21, torch.bfloat16)
    runs = []
    for once in (False, True):
        monkeypatch.setattr(fp8_moe, "QUANTIZE_TOKENS_ONCE", once)
        runs.append(_run(True, backend, x, idx, w, wg, wu, wd, grad_out))
    (out, grads), (out_once, grads_once) = runs
    assert torch.equal(out, out_once)
    for name, g, r in zip(NAMES, grads, grads_once):
        assert torch.equal(g, r), name


@pytest.mark.skipif(not q.triton_available(), reason="needs triton")
@pytest.mark.parametrize("tokens_once", [False, True])
def test_the_fused_kernel_path_never_reads_the_device_back(tokens_once, monkeypatch):
    from coscale.kernels import fp8_moe

    monkeypatch.setattr(fp8_moe, "QUANTIZE_TOKENS_ONCE", tokens_once)
    x, idx, w, wg, wu, wd, grad_out = _problem("random", 24, 2, 3, 128, 128, 10, torch.float32)
    info = build_permute_info(idx, 3, align=128)  # (index building checks ids on the CPU: outside the spy)
    with host_reads_in_coscale() as seen:
        out = fp8_routed_experts(x, w, info, wg, wu, wd, backend="triton")
        out.backward(grad_out)
    assert seen == []


# ---- a dense SwiGLU MLP (the shared experts) through the same kernels: fp8_swiglu_mlp ------------------------


def test_the_identity_layout_is_what_routing_every_token_to_one_expert_gives():
    from coscale.kernels.permute import identity_permute_info

    for T, align in [(0, 128), (1, 128), (40, 128), (128, 128), (300, 16)]:
        want = build_permute_info(torch.zeros(T, 1, dtype=torch.int64), 1, align)
        got = identity_permute_info(T, "cpu", align)
        for field in ("pair_row", "row_pair", "group_end_offsets", "tokens_per_expert"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (T, align, field)
        assert (got.num_tokens, got.topk, got.align) == (want.num_tokens, want.topk, want.align)
        # tight: the same rows and offsets, cut after the one group's padding
        tight = identity_permute_info(T, "cpu", align, tight=True)
        end = -(-T // align) * align
        assert tight.num_rows == end and torch.equal(tight.row_pair, want.row_pair[:end])
        assert torch.equal(tight.group_end_offsets, want.group_end_offsets)


def _mlp_problem(T, H, I, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_()
    wg, wu = ((torch.randn(I, H, generator=gen) / H**0.5).requires_grad_() for _ in range(2))
    wd = (torch.randn(H, I, generator=gen) / I**0.5).requires_grad_()
    return x, wg, wu, wd, torch.randn(T, H, generator=gen).to(dtype)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,I,dtype", [(40, 128, 128, torch.float32), (12, 200, 72, torch.bfloat16),
                                         (130, 136, 256, torch.float32)])
def test_the_fp8_mlp_is_one_routed_expert_that_every_token_picks(backend, T, H, I, dtype, dense, monkeypatch):
    """fp8_swiglu_mlp's outputs and gradients are those of fp8_routed_experts with one expert and every token's
    weight 1 (the weights' gradients in their own 2-D shape): bit for bit through the grouped kernels; through
    the dense GEMM (fp8_moe.DENSE_GEMMS_FOR_ONE_EXPERT) the same FP8 operands summed in another
    order, so that at most a few FP8 codes of the re-quantized a, dY or [dG | dU] can flip at a rounding tie.
    Both within FP8's error of the float64 MLP."""
    from coscale.kernels import fp8_moe
    from coscale.kernels.fp8_moe import fp8_swiglu_mlp

    monkeypatch.setattr(fp8_moe, "DENSE_GEMMS_FOR_ONE_EXPERT", dense)
    x, wg, wu, wd, grad_out = _mlp_problem(T, H, I, T + I, dtype)
    out = fp8_swiglu_mlp(x, wg, wu, wd, backend=backend)
    grads = torch.autograd.grad(out, (x, wg, wu, wd), grad_out)
    experts = [w.detach().unsqueeze(0).requires_grad_() for w in (wg, wu, wd)]
    x2 = x.detach().clone().requires_grad_()
    info = build_permute_info(torch.zeros(T, 1, dtype=torch.int64), 1, align=128)
    ref = fp8_routed_experts(x2, torch.ones(T, 1), info, *experts, backend=backend, deterministic=True)
    ref_grads = torch.autograd.grad(ref, (x2, *experts), grad_out)
    def same(a, b):
        if not dense:
            return torch.equal(a, b)
        # a flipped e4m3 code moves one element by 1/16 of itself: a few of them stay far below 1e-3 of the norm
        # here (a wrong scale on one 128-wide tile would not); cuBLAS on a GPU also rounds dW to BF16 (2^-9)
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm()) <= (4e-3 if x.is_cuda else 1e-3) * float(b.norm())

    assert out.dtype == dtype and same(out, ref)
    for name, g, r, w in zip(("x", "w_gate", "w_up", "w_down"), grads, ref_grads, (x, wg, wu, wd)):
        assert g.shape == w.shape and g.dtype == r.dtype and same(g, r.view(w.shape)), name
    xd, wgd, wud, wdd = (t.detach().double().requires_grad_() for t in (x, wg, wu, wd))
    mlp = (torch.nn.functional.silu(xd @ wgd.t()) * (xd @ wud.t())) @ wdd.t()
    mlp_grads = torch.autograd.grad(mlp, (xd, wgd, wud, wdd), grad_out.double())
    for name, got, want in zip(("out", "x", "w_gate", "w_up", "w_down"), (out, *grads), (mlp, *mlp_grads)):
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < 0.12, (name, err)


def test_the_fp8_mlp_refuses_mismatched_shapes_and_takes_no_tokens():
    from coscale.errors import CoscaleError
    from coscale.kernels.fp8_moe import fp8_swiglu_mlp

    x, wg, wu, wd, _ = _mlp_problem(8, 128, 64, 3, torch.float32)
    with pytest.raises(CoscaleError, match="2-D weights"):
        fp8_swiglu_mlp(x, wg.unsqueeze(0), wu, wd)
    with pytest.raises(CoscaleError, match="needs w_gate and w_up"):
        fp8_swiglu_mlp(x, wg, wu, wd.t())
    with pytest.raises(CoscaleError, match="needs w_gate and w_up"):
        fp8_swiglu_mlp(x[:, :64], wg, wu, wd)
    empty = fp8_swiglu_mlp(x[:0], wg, wu, wd)
    assert empty.shape == (0, 128) and empty.dtype == x.dtype


@pytest.mark.skipif(not q.triton_available(), reason="needs triton")
def test_the_fp8_mlp_never_reads_the_device_back():
    from coscale.kernels.fp8_moe import fp8_swiglu_mlp

    x, wg, wu, wd, grad_out = _mlp_problem(24, 128, 128, 4, torch.float32)
    with host_reads_in_coscale() as seen:
        fp8_swiglu_mlp(x, wg, wu, wd, backend="triton").backward(grad_out)
    assert seen == []


def test_shared_experts_run_fp8_by_the_experts_size_rule_and_keep_their_names():
    """SharedExperts: MLP's parameter names and its BF16 forward; with precision "fp8" fp8_swiglu_mlp over its
    weights (autocast's dtype applied first), its weight cache reused until invalidated; convert_to_fp8 sets
    the precision by the experts' size rule and leaves its linear layers nn.Linear."""
    from torch import nn

    from coscale.fp8 import AUTO, convert_to_fp8, describe_fp8_layers, invalidate_fp8_weight_caches
    from coscale.kernels.fp8_moe import fp8_swiglu_mlp
    from coscale.model.moe import MLP, SharedExperts

    torch.manual_seed(0)
    shared, mlp = SharedExperts(128, 256), MLP(128, 256)
    assert list(shared.state_dict()) == list(mlp.state_dict())
    mlp.load_state_dict(shared.state_dict())
    x = torch.randn(2, 5, 128)
    assert torch.equal(shared(x), mlp(x))
    with pytest.raises(ValueError, match="precision"):
        shared.precision = "fp4"
    shared.precision, shared.fp8_weight_cache = "fp8", True
    out = shared(x)
    want = fp8_swiglu_mlp(x.reshape(10, 128), shared.gate_proj.weight, shared.up_proj.weight,
                          shared.down_proj.weight)
    assert out.shape == x.shape and torch.equal(out.reshape(10, 128), want)
    assert shared.fp8_weight_cache.num_entries == 2  # [gate; up] and down
    assert torch.equal(shared(x), out)  # from the kept copies
    assert invalidate_fp8_weight_caches(shared) == 1 and shared.fp8_weight_cache.num_entries == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared(x).dtype == torch.bfloat16

    with torch.device("meta"):
        model = nn.Module()
        model.shared = SharedExperts(7168, 2048)  # DeepSeek-V3's shared expert: FP8 with its routed experts
        model.small_shared = SharedExperts(1024, 256)  # the small preset's: BF16
    convert_to_fp8(model, policy="auto")
    assert model.shared.precision == "fp8" and model.small_shared.precision == "bf16"
    assert all(type(m) is nn.Linear for m in (model.shared.gate_proj, model.shared.down_proj))
    line = describe_fp8_layers(model, AUTO)
    assert "shared experts of 1 of 2 MoE layers (hidden/width 7168/2048)" in line, line
    assert "shared experts 1024/256" in line and "0 of 0 linear layers" in line, line
    convert_to_fp8(model, policy="all")
    assert model.small_shared.precision == "fp8" and type(model.small_shared.up_proj) is nn.Linear


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False])
def test_the_routed_experts_run_under_autocast(backend, fused):
    """Under BF16 autocast the layer gives the bits it gives without it: autocast is off inside (it would run the
    PyTorch reference's float32 products in BF16, and CPU autocast's torch.cat has no rank for float8)."""
    x, idx, w, wg, wu, wd, grad_out = _problem("edge", 12, 2, 4, 200, 72, 22, torch.bfloat16)
    plain = _run(fused, backend, x, idx, w, wg, wu, wd, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _run(fused, backend, x, idx, w, wg, wu, wd, grad_out)
    for a, b in zip((plain[0], *plain[1]), (under[0], *under[1])):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_experts_keep_no_output_for_the_router_weight_gradient():
    """The router weight multiplies a before the down projection, so its gradient comes from SwiGLU's backward
    and the experts' output rows y [M, H] are not kept: the routed experts with a trained weight save only the
    rows' weights [M] float32 more than fp8_swiglu_mlp (the shared experts, unweighted)."""
    from coscale.kernels.fp8_moe import fp8_swiglu_mlp

    x, wg, wu, wd, _ = _mlp_problem(40, 128, 128, 5, torch.bfloat16)

    def saved_bytes(out):
        return sum(t.numel() * t.element_size() for t in out.grad_fn.saved_tensors if t is not None)

    from coscale.kernels.permute import identity_permute_info

    mlp = fp8_swiglu_mlp(x, wg, wu, wd)
    info = identity_permute_info(40, "cpu", align=128, tight=True)  # fp8_swiglu_mlp's layout
    routed = fp8_routed_experts(x, torch.ones(40, 1, requires_grad=True), info, *(w.unsqueeze(0) for w in (wg, wu, wd)))
    assert saved_bytes(routed) - saved_bytes(mlp) == info.num_rows * 4
