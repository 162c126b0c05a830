"""FP8Linear: a drop-in nn.Linear whose three GEMMs run in FP8 with fine-grained scaling.

Shape legend: M tokens (all leading dims flattened), K in_features, N out_features.

Forward   Y  [M, N] = X [M, K] @ W^T          X 1x128 tiles along K, W 128x128 blocks
Dgrad     dX [M, K] = dY [M, N] @ W           dY 1x128 tiles along N, W^T blocks (W's, transposed)
Wgrad     dW [N, K] = dY^T [N, M] @ X [M, K]  dY^T and X^T both in 1x128 tiles along M (tokens)

kernels.quant.act_quant_1x128_dual quantizes X into both layouts in the forward and dY into both in
the backward; weight_quant_128x128_dual writes W in FP8 and W^T as a byte transpose of it.
Saved for backward: the FP8 X^T (1 byte per element plus one FP32 scale per 128) and the FP8 W^T,
never the BF16 activation. The GEMMs accumulate in FP32 with promotion
every 128 elements of K (kernels.fp8_gemm). The output and dX come back in X's dtype; dW is computed in
FP32 and returned in the master weight's dtype (FP32 master weights get FP32 gradients); the bias and
its gradient stay in high precision.

in_features / out_features that are not multiples of 128 are zero-padded inside the quantization
kernels (the padding columns are zeros in both operands, so they add nothing to any dot product) and
the outputs are sliced back; the parameters keep their nn.Linear shapes and names, so a state_dict
moves freely between plain and converted models.

Weight cache: ``FP8Linear.fp8_weight_cache = True`` (or an FP8WeightCache) keeps W's FP8 copies (and
W^T's once an input gradient was needed) between calls, until whoever steps the optimizer calls
``invalidate_fp8_weight_caches(model)`` (coscale.kernels.fp8_weight_cache: the rule, the safety net
and the cost). Off by default.

No host synchronisation on any path except the one-time probe of cuBLAS (kernels.fp8_gemm) and the
first call of each shape of the Triton GEMM (Triton's autotuner): warm up before CUDA-graph capture.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from coscale.kernels import quant_ops
from coscale.kernels.backend import autocast_off, to_autocast_dtype
from coscale.kernels.fp8_gemm import fp8_gemm
from coscale.kernels.fp8_weight_cache import FP8WeightCache, as_weight_cache, usable_now
from coscale.kernels.quant import act_quant_1x128, act_quant_1x128_dual, check_backend
from coscale.kernels.quant_ops import act_quant_op, weight_quant_op

__all__ = ["FP8LinearFunction", "FP8Linear", "fp8_linear", "OVERLAP_TRANSPOSED_QUANT"]

# X^T's and dY^T's transposed layouts feed only the weight-gradient GEMM, so on CUDA they are quantized on
# a side stream while the current stream quantizes the rows, the weight and runs the forward (dgrad) GEMM:
# a memory-bound kernel beside a compute-bound one. The streams fork once the input is ready and join
# before the forward returns (backward: before the weight-gradient GEMM), GPU-side only: no host
# synchronisation, and CUDA-graph capture takes the fork and join. No record_stream is needed: the input is
# alive until after the join, and the side stream's outputs come from its own pool, which reuses a block only
# in a later fork, ordered after every use of it on the current stream.
# Not under torch.compile tracing (the layer's kernels run eagerly in a compiled step anyway) and not with
# the one-launch dual (quant_ops.DUAL_ONE_PASS). benchmarks/bench_fp8.py --overlap-quant times both: on the
# H200 (run 33D, 8192 tokens, fwd+bwd, graphed) it changed FP8Linear's TFLOP/s by -1.1% to +2.7% (expert_up +1.3%),
# about the run-to-run spread: cuBLAS's FP8 GEMMs fill every SM, so the side kernel mostly waits for the GEMM
# and little overlaps. Off by default; exact either way (tests/test_fp8_linear.py, on the GPU).
OVERLAP_TRANSPOSED_QUANT = False


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def _no_join() -> None:
    """The join of a quantization that ran on the current stream: nothing to wait for."""


def _quant_both_layouts(x2: torch.Tensor, round_scale: bool, backend: str):
    """(xq, xs, xt, xts, join): x2 in 1x128 tiles and transposed (padded to Kp rows), the transposed layout
    on a side stream where that applies (module note above); ``join()`` makes the current stream wait for
    it (a no-op otherwise)."""
    overlap = (OVERLAP_TRANSPOSED_QUANT and x2.is_cuda and not quant_ops.DUAL_ONE_PASS
               and not torch.compiler.is_compiling())  # fmt: skip
    if not overlap:
        xq, xs, xt, xts = act_quant_1x128_dual(x2, round_scale, backend, pad_t=True, one_pass=quant_ops.DUAL_ONE_PASS)
        return xq, xs, xt, xts, _no_join
    main = torch.cuda.current_stream(x2.device)
    side = _side_stream(x2.device.index)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        _, _, xt, xts = act_quant_op(x2, round_scale, False, True, True, False, backend)
    xq, xs, _, _ = act_quant_op(x2, round_scale, True, False, True, False, backend)
    return xq, xs, xt, xts, lambda: main.wait_stream(side)


class FP8LinearFunction(torch.autograd.Function):
    """y = x @ weight^T (+ bias) with the forward, dgrad and wgrad GEMMs in FP8 (module docstring).

    Full passes over memory, per direction (M tokens, K in, N out; Kp/Np rounded up to 128):
      forward   1. x        -> xq [M, Kp] (+ xt [Kp, Mp] when W needs a gradient: a second launch; with
                               OVERLAP_TRANSPOSED_QUANT on a side stream beside steps 2-3)
                2. weight   -> wq [Np, Kp] (+ wq_t [Kp, Np] when x needs a gradient: a byte transpose)
                3. GEMM     Y = X W^T
                (+ the bias add and, when N % 128 != 0, a slice copy of Y)
      backward  1. dY       -> dyq [M, Np] (+ dyt [Np, Mp] when W needs a gradient; or beside step 2)
                2. GEMM     dX = dY W      (wq_t saved from the forward: no transposing copy)
                3. GEMM     dW = dY^T X    (written in the weight's dtype when it is bf16/fp16)
                (+ the bias-gradient reduction; slice copies when K or N % 128 != 0)
    Under no_grad (or frozen inputs) only the single layouts are produced: act_quant_1x128 and
    weight_quant_128x128. Saved for backward: xt/xts (FP8 X^T) and wq_t/ws_t (FP8 W^T).
    ``weight_cache`` (an FP8WeightCache or None): step 2 is skipped while it holds W's copies.
    The transposed layouts are padded to Kp / Np rows, so every GEMM has 128-multiple M and N and can
    take cuBLAS under backend="auto" (kernels.fp8_gemm decides, including its K % 512 rule).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, bias, backend="auto", round_scale=False, weight_cache=None):
        k = x.shape[-1]
        n = weight.shape[0]
        x2 = x.reshape(-1, k)
        need_dgrad, need_wgrad = ctx.needs_input_grad[:2]  # both False under no_grad
        if need_wgrad:
            xq, xs, xt, xts, join = _quant_both_layouts(x2, round_scale, backend)
        else:
            (xq, xs), xt, xts, join = act_quant_1x128(x2, round_scale, backend), None, None, _no_join
        wq, ws, wq_t, ws_t = _quantize_weight(weight, need_dgrad, backend, round_scale, weight_cache)
        out = fp8_gemm(xq, xs, wq, ws, x.dtype, backend)  # [M, Np]
        join()
        if out.shape[1] != n:
            out = out[:, :n]
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(xt, xts, wq_t, ws_t)
        ctx.config = (backend, round_scale, x.shape, x.dtype, weight.dtype, k, n)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*x.shape[:-1], n)

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        xt, xts, wq_t, ws_t = ctx.saved_tensors
        backend, round_scale, x_shape, x_dtype, w_dtype, k, n = ctx.config
        dy2 = dy.reshape(-1, n).contiguous()  # free for the usual contiguous gradient
        need_dgrad, need_wgrad, need_bias = ctx.needs_input_grad[:3]
        dx = dw = db = None
        join = _no_join
        if need_wgrad:
            dyq, dys, dyt, dyts, join = _quant_both_layouts(dy2, round_scale, backend)
        elif need_dgrad:
            dyq, dys = act_quant_1x128(dy2, round_scale, backend)
        if need_dgrad:  # W^T's 128x128 blocks are W's blocks transposed, written by the forward
            dx = fp8_gemm(dyq, dys, wq_t, ws_t, x_dtype, backend)  # [M, Kp]
            dx = (dx[:, :k] if dx.shape[1] != k else dx).reshape(x_shape)
        join()
        if need_wgrad:
            # FP32 accumulation inside the GEMM; written directly in a 16-bit master dtype (one pass
            # instead of an FP32 buffer plus a conversion)
            gemm_dtype = w_dtype if w_dtype in (torch.bfloat16, torch.float16) else torch.float32
            dw = fp8_gemm(dyt, dyts, xt, xts, gemm_dtype, backend)  # [Np, Kp]
            if dw.shape != (n, k):
                dw = dw[:n, :k]
            dw = dw.to(w_dtype)
        if need_bias:
            db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def _quantize_weight(weight, need_t: bool, backend: str, round_scale: bool, weight_cache: FP8WeightCache | None):
    """(wq, ws, wq_t, ws_t): W in 128x128 blocks, and W^T's bytes and scales when ``need_t``."""

    def quantize():
        wq, ws, wq_t, ws_t = weight_quant_op([weight.detach()], round_scale, need_t, backend)
        return (wq, ws, wq_t, ws_t) if need_t else (wq, ws, None, None)

    if weight_cache is None:
        return quantize()
    return weight_cache.get((weight,), (backend, round_scale), need_t, quantize)


def fp8_linear(
    x, weight, bias=None, backend: str = "auto", round_scale: bool = False, weight_cache: FP8WeightCache | None = None
):
    """Functional form of FP8Linear (``weight_cache``: the FP8WeightCache of the weight's owner, or None)."""
    check_backend(backend, x, op="fp8_linear")
    # The FP8 GEMMs accumulate in FP32 whatever autocast says (the reference backend's matmuls would
    # otherwise run in the autocast dtype); the output dtype is the input's (FP8Linear casts it first).
    with torch.autocast(x.device.type, enabled=False):
        return FP8LinearFunction.apply(x, weight, bias, backend, round_scale, usable_now(weight_cache))


class FP8Linear(nn.Module):
    """nn.Linear with FP8 GEMMs; same parameters (``weight`` [N, K] master copy, optional ``bias``).
    ``fp8_weight_cache``: None (off) or this module's FP8WeightCache (assign True to make one)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
        round_scale: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.round_scale = round_scale
        self.fp8_weight_cache = None
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:  # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", round_scale: bool = False):
        """Wrap an existing nn.Linear, sharing its Parameter objects (ties and optimizer state hold)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.backend, module.round_scale = backend, round_scale
        module.fp8_weight_cache = None
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def __setattr__(self, name, value):
        if name == "fp8_weight_cache":  # True -> an FP8WeightCache this module owns, False -> None
            value = as_weight_cache(value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the input is cast first, as nn.Linear's is: the GEMMs then write the autocast dtype
        # and the input's gradient comes back in it (FP32 in and out cost a conversion copy after each of
        # the three GEMMs: 89 copies, 15 ms of proxy-v3's 312 ms FP8 step on the H200, run 21). The cast
        # stays outside run_kernels, the part a compiled step leaves eager, so Inductor fuses it into the
        # producer of x (coscale.train.step_runner.keep_fp8_layers_eager).
        return self.run_kernels(to_autocast_dtype(x))

    def run_kernels(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.backend, self.round_scale, self.fp8_weight_cache)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend!r}, round_scale={self.round_scale}"
        )
