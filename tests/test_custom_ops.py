"""coscale's kernels as torch operators: every operator passes torch.library.opcheck on the CPU (the
PyTorch reference, and Triton's interpreter where the operator has kernels); torch.compile traces an
FP8 model and a BF16 model with grouped experts with fullgraph=True (no graph break, no tracing into
Triton source) and computes what eager mode computes; Inductor's analysis of every transparent
operator's Triton kernels succeeds (the source analysis that failed for the FP8 kernels under
torch.compile before they were operators); on a GPU, a CUDA graph captures an FP8 step."""

import contextlib
import inspect
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import coscale.kernels.fused_quant  # noqa: F401  (registers its operators)
import coscale.kernels.grouped_gemm  # noqa: F401
from coscale.config import get_preset
from coscale.fp8 import FP8Linear, convert_to_fp8
from coscale.kernels import quant as q
from coscale.kernels import quant_ops
from coscale.kernels.fp8_grouped_gemm import expert_tile_map
from coscale.kernels.permute import build_permute_info
from coscale.model import DeepseekForCausalLM

ops = torch.ops.coscale
# Triton's interpreter runs the kernels on CPU tensors (tests/conftest.py turns it on where no GPU is)
KERNEL_BACKENDS = ["torch", "triton"] if q.triton_available() and q.interpreting() else ["torch"]
FP8 = q.FP8_DTYPE


def _routing(t=19, k=2, e=3, align=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return build_permute_info(idx, e, align=align), torch.rand(t, k, generator=gen)


def _check(op, args, utils=None):
    result = opcheck(op, args, test_utils=utils or ("test_schema", "test_autograd_registration", "test_faketensor",
                                                      "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


def _check_fp8_inputs(op, args):
    """opcheck without its schema test (which compares FP8 inputs with arithmetic the CPU lacks), plus
    that test's point: no input is written."""
    before = [a.view(torch.uint8).clone() if torch.is_tensor(a) and a.dtype == FP8 else a for a in args]
    _check(op, args, ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args)
    for a, b in zip(args, before):
        if torch.is_tensor(a) and a.dtype == FP8:
            assert torch.equal(a.view(torch.uint8), b)


# ---- quantization -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("rows,cols,pad_t,one_pass", [(True, True, True, False), (True, True, False, True),
                                                      (True, False, False, False), (False, True, True, False)])
def test_act_quant_opcheck(backend, rows, cols, pad_t, one_pass):
    x = (torch.randn(150, 200) * 3).to(torch.bfloat16)
    _check(ops.act_quant, (x, False, rows, cols, pad_t, one_pass, backend))
    _check(ops.act_quant, (x.t(), True, rows, cols, pad_t, one_pass, backend))  # a transposed view


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weight_quant_opcheck(backend):
    w = torch.randn(2, 200, 136)
    _check(ops.weight_quant, ([w, w[:, :72]], False, True, backend))
    _check(ops.weight_quant, ([w[0].bfloat16()], True, False, backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_quant_opchecks(backend):
    # The interpreter's sigmoid (NumPy's) and ATen's differ in the last bit of a few values, and after the
    # 16-bit rounding some FP8 bytes differ: on the interpreter the reference (what AOT traces on fake CPU
    # tensors) is not the kernels' bit for bit, so the eager-vs-traced comparison runs on the reference.
    swiglu_utils = None if backend == "torch" else ("test_schema", "test_autograd_registration", "test_faketensor")
    gate_up = torch.randn(130, 2 * 160).to(torch.bfloat16)
    _check(ops.swiglu_quant, (gate_up, True, True, True, False, False, backend), swiglu_utils)
    da = torch.randn(130, 160).to(torch.bfloat16)
    _check(ops.swiglu_backward_quant, (gate_up, da, True, True, False, True, False, backend), swiglu_utils)
    # weighted by each row's router weight, the backward with the weight's gradient (paired: 256 gate columns)
    gate_up2, da2 = torch.randn(130, 512).to(torch.bfloat16), torch.randn(130, 256).to(torch.bfloat16)
    rw = torch.rand(130)
    _check(ops.swiglu_quant, (gate_up2, True, True, True, False, False, backend, rw), swiglu_utils)
    _check(ops.swiglu_backward_quant, (gate_up2, da2, True, True, False, False, False, backend, rw, True),
           swiglu_utils)
    info, weight = _routing()
    src = torch.randn(19, 136)
    _check(ops.gather_quant, (src, info.row_pair, 2, None, None, True, True, True, False, False, backend))
    dot = torch.randn(info.num_rows, 136)
    _check(ops.gather_quant, (src, info.row_pair, 2, weight, dot, True, True, False, False, False, backend))


# ---- data movement and SwiGLU (differentiable operators: their autograd registration is checked) -------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_permutation_opchecks(backend):
    info, weight = _routing(align=16)
    x = torch.randn(19, 40, requires_grad=True)
    _check(ops.permute, (x, info.row_pair, info.pair_row, False, backend))
    y = torch.randn(info.num_rows, 40, requires_grad=True)
    _check(ops.combine, (y, weight.requires_grad_(), info.pair_row, info.row_pair, True, backend))
    _check(ops.gather_rows, (x.detach(), info.row_pair, 2, weight.detach(), y.detach(), torch.float32, backend))
    _check(ops.sum_rows, (y.detach(), info.pair_row, info.row_pair, None, torch.float32, False, backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_swiglu_opchecks(backend):
    gate_up = torch.randn(9, 96, requires_grad=True)
    _check(ops.swiglu, (gate_up, backend))
    g, u = torch.randn(2, 9, 48, requires_grad=True).unbind(0)
    _check(ops.swiglu_pair, (g, u, backend))
    _check(ops.swiglu_backward, (g.detach(), u.detach(), torch.randn(9, 48), backend))


# ---- GEMMs (opaque operators) -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["loop", "triton"] if "triton" in KERNEL_BACKENDS else ["loop"])
def test_grouped_mm_opchecks(backend):
    offs = torch.tensor([5, 5, 20], dtype=torch.int32)  # every row in a group (others: unspecified)
    a = torch.randn(20, 32, requires_grad=True)
    b = torch.randn(3, 24, 32, requires_grad=True)
    _check(ops.grouped_mm, (a, b, offs, backend))
    _check(ops.grouped_mm_dgrad, (torch.randn(20, 24), b.detach(), offs, backend))
    _check(ops.grouped_mm_wgrad, (torch.randn(20, 24), a.detach(), offs, torch.float32, backend))


def test_fp8_gemm_opcheck():
    a = torch.randn(64, 256).to(FP8)
    b = torch.randn(128, 256).to(FP8)
    _check_fp8_inputs(ops.fp8_gemm, (a, torch.rand(64, 2) + 0.5, b, torch.rand(1, 2) + 0.5, torch.bfloat16, "torch"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp8_grouped_opchecks(backend):
    offs = torch.tensor([128, 128, 256], dtype=torch.int32)
    a = torch.randn(300, 128).to(FP8)
    b = torch.randn(3, 128, 128).to(FP8)
    tiles = expert_tile_map(offs, 300)
    _check_fp8_inputs(ops.fp8_grouped_mm, (a, torch.rand(300, 1) + 0.5, b, torch.rand(3, 1, 1) + 0.5, offs, tiles,
                                           torch.float32, backend))
    dyt, xt = torch.randn(128, 384).to(FP8), torch.randn(256, 384).to(FP8)
    scales = torch.rand(128, 3) + 0.5, torch.rand(256, 3) + 0.5
    for chunks in (None, expert_tile_map(offs, 384)):  # the chunk -> expert map computed inside, or given
        _check_fp8_inputs(ops.fp8_grouped_wgrad, (dyt, scales[0], xt, scales[1], offs, chunks, torch.bfloat16,
                                                  backend))


# ---- torch.compile of whole models -----------------------------------------------------------------
# One dense layer and one MoE layer with MTP on top: every kind of block.
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2,
             num_key_value_heads=2)


def _model(fp8: bool):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_preset("tiny", **SMALL))
    if fp8:
        convert_to_fp8(model)
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = "grouped"
    return model.train()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-grouped", "fp8"])
def test_compute_loss_compiles_with_fullgraph_and_matches_eager(fp8):
    model = _model(fp8)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    eager = model.compute_loss(x, y)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    torch._dynamo.reset()
    compiled = torch.compile(model.compute_loss, fullgraph=True, backend="aot_eager")(x, y)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_weight_cache_stands_aside_under_compile():
    layer = FP8Linear(128, 128, bias=False, backend="torch")
    layer.fp8_weight_cache = True
    x = torch.randn(4, 128)
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert layer.fp8_weight_cache.num_entries == 0  # the compiled forward quantized W itself
    torch.testing.assert_close(out, layer(x))  # eager uses (and fills) the cache
    assert layer.fp8_weight_cache.num_entries == 1


# ---- Inductor's analysis of the transparent operators' Triton kernels -------------------------------
class _Recorder:
    """Stands in for coscale.kernels.quant_ops.launcher: records each launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return Launch()


@contextlib.contextmanager
def _cuda_target():
    """Triton's active driver reporting an sm_90 target on a machine without a GPU (TTIR only)."""
    import triton
    from triton.backends.compiler import GPUTarget

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    config = triton.runtime.driver
    saved = config._active
    config._active = Driver()
    try:
        yield
    finally:
        config._active = saved


def analyse_transparent_kernels() -> set[str]:
    """Record the launches of every transparent quantization operator (without running them) and run
    Inductor's analysis of which tensors each kernel reads and writes (TTIR, for an sm_90 target).
    Returns the kernels analysed; raises if an analysis failed (it then reports every tensor written).
    Needs a process that imported Triton with TRITON_INTERPRET=0 (the interpreter's triton.language
    cannot be compiled); the operators then see TRITON_INTERPRET=1 to accept CPU tensors."""
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    import coscale.kernels._quant_triton  # noqa: F401  (decorated now, for the compiler)
    from coscale.kernels import permute, router, swiglu

    recorder = _Recorder()
    quant_ops.launcher = permute.launcher = swiglu.launcher = router.launcher = recorder
    os.environ["TRITON_INTERPRET"] = "1"
    x = torch.randn(130, 200).to(torch.bfloat16)
    info, weight = _routing()
    ops.act_quant(x, False, True, True, True, False, "triton")
    ops.act_quant(x, False, True, True, True, True, "triton")
    ops.weight_quant([torch.randn(200, 136)], False, True, "triton")  # W^T's bytes from weight_kernel (WT)
    saved = quant_ops.WEIGHT_PAIR_ONE_PASS, quant_ops.TRANSPOSE_WORDS
    quant_ops.WEIGHT_PAIR_ONE_PASS = False  # W^T by a second launch: bytes, then 32-bit words
    try:
        for words in (False, True):
            quant_ops.TRANSPOSE_WORDS = words
            ops.weight_quant([torch.randn(200, 136)], False, True, "triton")
    finally:
        quant_ops.WEIGHT_PAIR_ONE_PASS, quant_ops.TRANSPOSE_WORDS = saved
    ops.swiglu_quant(x[:, :160], True, True, False, False, False, "triton")
    ops.swiglu_backward_quant(x[:, :160], x[:, :80], True, True, False, True, False, "triton")
    # weighted by each row's router weight (fp8_moe); the backward paired, with the weight's gradient in parts
    gate_up, rw = torch.randn(130, 256).to(torch.bfloat16), torch.rand(130)
    ops.swiglu_quant(gate_up, True, True, False, False, False, "triton", rw)
    ops.swiglu_backward_quant(gate_up, gate_up[:, :128], True, True, False, False, False, "triton", rw, True)
    ops.gather_quant(x, info.row_pair, 2, weight, torch.randn(info.num_rows, 200), True, True, False, False, False,
                     "triton")
    y_perm = torch.randn(info.num_rows, 200)
    ops.gather_rows(x, info.row_pair, 2, weight, y_perm, torch.bfloat16, "triton")
    ops.sum_rows(y_perm, info.pair_row, info.row_pair, weight, torch.float32, True, "triton")
    ops.swiglu(x[:, :160], "triton")
    ops.swiglu_backward(x[:, :80], x[:, 80:160], x[:, :80], "triton")
    ops.route(x[:20], torch.randn(64, 200), torch.randn(64), 6, 8, 4, True, True, True, 2.5, True, "triton")
    seen = set()
    with _cuda_target():
        for kernel, args, kwargs in recorder.launches:
            jit = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction under an autotuner
            named = dict(zip(jit.arg_names, args)) | kwargs
            if hasattr(kernel, "configs"):  # an autotuner: its (interpreter) configuration's constexprs
                named |= kernel.configs[0].kwargs
            named = {k: v for k, v in named.items() if k in jit.arg_names}
            if "GRID_ROUND" in named:
                named["GRID_ROUND"] = False  # as on a GPU (rounding for the interpreter's cast is off)
            accesses = identify_accessed_tensors(jit, named, {})
            writes = {dep.name for dep in accesses.read_writes.writes}
            inputs = {name for name in ("x_ptr", "b_ptr", "part_ptr", "bias_ptr", "idx_ptr", "w_ptr", "dot_ptr",
                                        "src_ptr", "row_pair_ptr",
                                        "weight_ptr", "pair_row_ptr", "g_ptr", "u_ptr", "da_ptr") if name in named}
            if not writes or writes & inputs:  # the analysis fell back to "every input is mutated"
                raise AssertionError(f"Inductor could not analyse {jit.__name__}: writes {sorted(writes)}")
            if named.get("WT") and "yt_ptr" not in writes:  # W^T's bytes, stored through a word pointer
                raise AssertionError(f"Inductor does not see weight_kernel write W^T: writes {sorted(writes)}")
            if named.get("TILE_DOT") and "dot_out_ptr" not in writes:
                raise AssertionError(f"Inductor does not see the router weight's dots written: {sorted(writes)}")
            seen.add(jit.__name__)
    return seen


@pytest.mark.skipif(not q.triton_available(), reason="needs triton")
def test_inductor_analyses_every_transparent_kernel():
    """In a fresh process that imports Triton for compiling (this one imported its interpreter)."""
    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    analyse = getattr(wrap, "identify_accessed_tensors", None)
    if analyse is None or "tma_descriptor_metadata" not in inspect.signature(analyse).parameters:
        pytest.skip("this torch's kernel analysis has another interface")
    code = "import test_custom_ops as t; print(sorted(t.analyse_transparent_kernels()))"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(
        ["_route_logits_kernel", "_route_select_kernel", "_rows_from_tokens_kernel", "_swiglu_bwd_kernel",
         "_swiglu_fwd_kernel", "_tokens_from_rows_kernel",
         "cols_kernel", "cols_quant_kernel", "dual_quant_kernel", "rows_kernel", "rows_quant_kernel",
         "transpose_bytes_kernel", "transpose_words_kernel", "weight_kernel"]
    )


# ---- on a GPU: Inductor compiling the operators, CUDA graphs capturing them ------------------------
def _fp8_step_losses(mode, steps: int):
    from coscale.parallel.world import SingleProcess
    from coscale.train.optim import build_optimizer
    from coscale.train.step_runner import StepRunner

    dev = torch.device("cuda")
    model = _model(fp8=True).to(dev)
    optimizer = build_optimizer(model, lr=1e-3)
    runner = StepRunner(model, optimizer, SingleProcess(dev), mode, gamma=1e-2, grad_clip=1.0,
                        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 257), generator=gen)
        metrics = runner((ids[:, :-1].to(dev), ids[:, 1:].to(dev)), lr=1e-3)
        losses.append(float(metrics["loss"]))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton code generation needs a GPU")
def test_an_fp8_training_step_compiled_and_graphed_on_cuda_matches_eager():
    """Inductor compiles the transparent operators' kernels (what the CPU tests cannot run) and the whole
    FP8 step replays from a CUDA graph: the losses of 6 steps follow the eager step's."""
    from coscale.train.step_runner import StepMode

    eager = _fp8_step_losses(StepMode(compile=False, cuda_graphs=False), 6)
    fast = _fp8_step_losses(StepMode(compile=True, cuda_graphs=True), 6)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, eager, rtol=2e-2, atol=2e-2)  # bf16 roundings differ under Inductor


# ---- CUDA graphs (GPU only) ------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_graph_captures_fp8_forward_and_backward():
    torch.manual_seed(2)
    dev = torch.device("cuda")
    layer = FP8Linear(512, 384, bias=False).to(dev)
    x = torch.randn(256, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(256, 384, device=dev, dtype=torch.bfloat16)

    def step():
        layer.weight.grad, x.grad = None, None
        layer(x).backward(dy)
        return x.grad, layer.weight.grad

    want = [t.clone() for t in step()]  # eager, also the warm-up (autotuning, cuBLAS probe)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
