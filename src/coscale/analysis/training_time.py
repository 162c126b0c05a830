"""Training step time, GPU-hours and cost from FLOPs, achieved kernel rates and communication.

Per micro-batch and pipeline stage (``layers / pp`` layers, ``seq_len x micro_batch`` tokens per GPU):

- ``F`` forward: the serving model's prefill kernels (``layers``), FP8 GEMMs, BF16 attention;
- ``B`` input gradients: every GEMM again with the roles of N and K swapped (dgrad), attention backward
  (2.5 x the forward FLOPs at the backward rate), elementwise kernels twice the forward bytes, and the
  recomputation (DeepSeek: RMSNorm and the MLA up-projections ``q_b``, ``kv_b``; ``full``: all of F);
- ``W`` weight gradients: ``N x K`` outputs contracted over the tokens (grouped expert wgrad at its own,
  lower, rate).

A step is ``micro_batches x (F + B + W)`` plus the pipeline bubble, plus the data-parallel gradient reduce-scatter
and parameter all-gather (ZeRO-1, over the NICs, not overlapped), plus the AdamW update (22 bytes per local
parameter: FP32 master, BF16 moments, FP32 gradient, BF16 weight). Bubbles: 1F1B ``(pp - 1)(F + B + W)``; DualPipe
``(pp/2 - 1)(F&B + B - 3W)`` (the DeepSeek-V3 report's Table 2; its B a whole backward chunk, input and weight
gradients, and F&B a forward-backward pair: F + B + W and what of the pair's all-to-all outlasts it). With DualPipe
each expert all-to-all runs beside computation of the other direction's chunk, as the report's Figure 4 pairs them
(:func:`dualpipe_exposed`), and only what outlasts that computation is exposed (little for V3's layout, as the
report's "near-zero" overhead says), except in the chunks DualPipe's warm-up and cool-down run alone
(:func:`dualpipe_unpaired_chunks`), where it is exposed whole; with 1F1B it is exposed whole. Either way, while it
runs it holds ``comm_sms`` SMs, so MoE computation runs on the rest. The MTP modules train with the model. Routing
is balanced unless ``expert_imbalance`` says otherwise: the busiest expert-parallel rank receives ``1 +
expert_imbalance`` times the mean number of routed rows (MaxVio over EP ranks, as ``coscale train`` reports it over
experts), and every rank waits for it at the all-to-all, so the routed experts' kernels (permutation, grouped
GEMMs, SwiGLU) and the all-to-all take that much longer.

Layers are whole: a pipeline runs at the pace of its busiest rank, so F, B and W are those of the busiest
rank under the best split of the layers into ``pp`` contiguous stages (:func:`stage_split`), the output
head and the MTP modules on the last stage. Under DualPipe a rank holds stage r and stage pp-1-r and runs
each for half the micro-batches (the report deploys the shallowest layers, with the embedding, and the
deepest, with the output head, on one rank), so its time is the mean of the two. The excess over an even
split is the step's ``pipeline stage imbalance``.

GPU-hours for ``N`` tokens = N / tokens per step x step time x GPUs; cost at a price per GPU-hour (the
report's $2 for the H800). The report's 180K H800 GPU-hours per trillion tokens (2.664M for 14.8T) is
the check for DeepSeek-V3's layout (:data:`DEEPSEEK_V3_TRAINING`), never an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coscale.analysis import layers as L
from coscale.analysis.costs import OpTime, attention_prefill, elementwise, gemm, unmodelled_kernels
from coscale.analysis.flops import training_flops_per_token
from coscale.analysis.memory import ParallelLayout
from coscale.analysis.models import Model, ModelView, as_view
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, load_hardware

SCHEDULES = ("dualpipe", "1f1b")
RECOMPUTE = ("deepseek", "none", "full")

# DeepSeek-V3 pre-training (the report, the paper's Table 4): 2,048 H800, PP16 DualPipe, EP64, ZeRO-1 DP,
# 15,360 sequences of 4,096 tokens per step; 180K GPU-hours per trillion tokens; $2 per GPU-hour.
DEEPSEEK_V3_TRAINING = dict(model="deepseek-v3", hardware="h800", layout=ParallelLayout(dp=128, pp=16, ep=64),
                            seq_len=4096, global_batch=15360, micro_batch=1, schedule="dualpipe")
PUBLISHED_GPU_HOURS_PER_TRILLION = 180e3  # the report: "180K H800 GPU hours" per trillion tokens (2.664M / 14.8T)
PRICE_PER_GPU_HOUR = 2.0  # US$, the report's H800 rental assumption

# Optimizer recipes: bytes per parameter of the master copy, the gradient, each AdamW moment and the
# separate low-precision weight copy the update writes (0: none; autocast casts in the forward instead).
# clip_passes: gradient-sized passes the global-norm clip adds to the update (which takes its factor): the norm's
# read, and for torch's fused AdamW the unscaled gradient it writes back when handed a grad_scale.
OPTIMIZERS = {
    "deepseek": dict(master=4, grad=4, moment=2, weight_copy=2, clip_passes=1),  # the V3 report: FP32 master/grads,
    # BF16 moments
    "fp32": dict(master=4, grad=4, moment=4, weight_copy=0, clip_passes=2),  # torch's fused AdamW over FP32 params
    # (coscale train)
}


def optimizer_bytes_per_param(recipe: str) -> int:
    """HBM traffic of one fused AdamW update per parameter: read master, gradient and both moments; write
    master, both moments and the weight copy (DeepSeek's recipe: 12 + 10 = 22 bytes; FP32 moments: 28)."""
    o = OPTIMIZERS[recipe]
    return o["master"] + o["grad"] + 2 * o["moment"] + o["master"] + 2 * o["moment"] + o["weight_copy"]


@dataclass
class TrainingTime:
    model: str
    hardware: str
    layout: ParallelLayout
    tokens_per_step: int
    step_s: float
    parts_s: dict[str, float]  # forward, backward, weight gradients, bubble, dp sync, optimizer, exposed a2a
    model_flops_per_token: float  # the Table 2 convention (causal attention, no MTP)
    peak_bf16_flops: float
    assumptions: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_s / self.world

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops_per_token * self.tokens_per_s_per_gpu / 1e12

    @property
    def mfu(self) -> float:
        return self.model_tflops_per_gpu * 1e12 / self.peak_bf16_flops

    def gpu_hours(self, tokens: float) -> float:
        return tokens / self.tokens_per_step * self.step_s * self.world / 3600

    def cost(self, tokens: float, price_per_gpu_hour: float = PRICE_PER_GPU_HOUR) -> float:
        return self.gpu_hours(tokens) * price_per_gpu_hour


def _pass_ops(v: ModelView, hw: HardwareSpec, tokens: int, micro_batch: int, seq_len: int, tp: int, ep: int,
              moe: bool, dtype: str) -> tuple[list[OpTime], list[OpTime], list[OpTime], list[OpTime]]:
    """(forward, input-gradient, weight-gradient, recomputed-in-DeepSeek's-scheme) ops of one layer."""
    eff = hw.achieved
    b = L.Batch(tokens=tokens, requests=micro_batch, queries=seq_len, context=seq_len, decode=False)
    par = L.Parallel(ep=ep, tp=tp, redundant_experts=0, gemm_dtype=dtype)
    stages = L.layer_stages(v, hw, b, par, moe=moe)
    forward = [op for stage in stages for op in stage.compute]
    backward, wgrad, recompute = [], [], []
    for op in forward:
        if op.name == "attention":
            h = v.heads / tp
            backward.append(attention_prefill(eff, "attention backward", micro_batch, seq_len, h,
                                              v.qk_head_dim, v.v_head_dim, backward=True))
        elif not op.flops and op.bound in ("memory", "launch"):  # elementwise: twice the bytes backward
            backward.append(elementwise(eff, op.name + " (backward)", 2 * op.bytes))
        # GEMMs are rebuilt from their shapes below; the TP all-reduce repeats in backward as is
    for name, m, n, k, groups in _gemm_shapes(v, tokens, tp, ep, moe):
        experts = name.startswith("experts")  # the routed experts run grouped GEMMs
        backward.append(gemm(eff, name + " dgrad", m, k, n, groups=groups, kind="grouped" if experts else "dense",
                             dtype=dtype))
        wgrad.append(gemm(eff, name + " wgrad", n, k, m, kind="wgrad" if experts else "dense", dtype=dtype))
        if name in ("q_b", "kv_b"):
            recompute.append(gemm(eff, name + " recomputed", m, n, k, dtype=dtype))
    return forward, backward, wgrad, recompute


def _routed(op: OpTime) -> bool:
    """Whether an op of a MoE layer works on the routed rows (its time grows with the busiest rank's load)."""
    return op.name.startswith(("experts", "permute to grouped layout"))


def _mlp(op: OpTime) -> bool:
    """Whether an op of a MoE layer belongs to its MLP (shared and routed experts, between dispatch and combine)
    rather than to its attention side (norms, projections, attention, router)."""
    return op.name.startswith(("experts", "permute to grouped layout", "shared"))


def dualpipe_exposed(fwd: list[OpTime], bwd: list[OpTime], wgrad: list[OpTime], dispatch_s: float,
                     combine_s: float, slowdown: float = 1.0) -> float:
    """Seconds of one MoE layer's all-to-all that DualPipe's overlap leaves exposed, per micro-batch.

    The V3 report (Figure 4) overlaps a forward chunk with a backward chunk by pairing each communication with
    computation of the other direction: ATTN(F) with COMBINE(B) (the output gradient sent to the experts, FP8
    as a dispatch), MLP(B) and MLP(W) with DISPATCH(F), MLP(F) with DISPATCH(B) (the input gradients summed
    back, BF16 as a combine), ATTN(B) and ATTN(W) with COMBINE(F). Each pair takes the longer of the two, so
    a communication is hidden only up to the computation it is paired with; the rest is exposed. ``bwd``
    holds the recomputation; ``slowdown`` how much longer the computation takes on the SMs the all-to-all
    leaves it, sms / (sms - comm_sms) (the all-to-all runs in every phase)."""
    def part(ops, mlp):  # computation only: a TP all-reduce (tp > 1) hides nothing
        return slowdown * sum(op.seconds for op in ops
                              if _mlp(op) == mlp and op.bound not in ("scale-out", "scale-up", "latency"))
    phases = ((part(fwd, False), dispatch_s), (part(bwd, True) + part(wgrad, True), dispatch_s),
              (part(fwd, True), combine_s), (part(bwd, False) + part(wgrad, False), combine_s))
    return sum(max(0.0, comm - compute) for compute, comm in phases)


def dualpipe_unpaired_chunks(pp: int, micro_batches: int) -> int:
    """How many forward chunks (and as many backward chunks) of the busiest rank DualPipe runs alone, each
    with its all-to-all exposed: its warm-up and cool-down. In DeepSeek's public schedule (deepseek-ai/DualPipe,
    ``DualPipe.step``) a rank at distance h from the nearer end of the pipeline runs 2 (pp/2 - h - 1) + 2 (h + 1)
    + (pp/2 - h - 1) = 1.5 pp - h - 1 forward chunks alone (steps 1-3) and as many backward chunks (steps 3 and
    5-7); the two middle ranks one more of each (their first step-4 pair is not overlapped). The most: 1.5 pp - 1
    on the end ranks, pp + 1 on the middle ones (pp 2 and 4). One rank alone (pp 1, an extension: forward and
    backward chunks of consecutive micro-batches paired) runs its first forward and last backward chunk alone."""
    if pp == 1:
        return min(micro_batches, 1)
    return min(micro_batches, max(3 * pp // 2 - 1, pp + 1))


def _gemm_shapes(v: ModelView, tokens: int, tp: int, ep: int, moe: bool) -> list[tuple]:
    """(name, M, N, K, groups) of the layer's GEMMs for ``tokens`` tokens on one GPU."""
    h, T = v.heads / tp, tokens
    out = []
    if v.attention == "MLA":
        latent = v.kv_lora_rank + v.qk_rope_head_dim
        nope = v.qk_head_dim - v.qk_rope_head_dim
        out.append(("q_a + kv_a", T, (v.q_lora_rank or 0) + latent, v.hidden_size, 1))
        out.append(("q_b", T, int(h * v.qk_head_dim), v.q_lora_rank or v.hidden_size, 1))
        out.append(("kv_b", T, int(h * (nope + v.v_head_dim)), v.kv_lora_rank, 1))
    else:
        out.append(("qkv", T, int((h + 2 * max(v.kv_heads / tp, 1)) * v.qk_head_dim), v.hidden_size, 1))
    out.append(("o_proj", T, v.hidden_size, int(h * v.v_head_dim), 1))
    t = T / tp
    if moe:
        rows, local = t * v.experts_per_token, -(-v.n_routed_experts // ep)
        out += [("experts gate+up", rows, 2 * v.moe_intermediate, v.hidden_size, local),
                ("experts down", rows, v.hidden_size, v.moe_intermediate, local)]
        if v.shared_experts:
            out += [("shared gate+up", t, 2 * v.shared_intermediate, v.hidden_size, 1),
                    ("shared down", t, v.hidden_size, v.shared_intermediate, 1)]
    else:
        out += [("dense gate+up", t, 2 * v.dense_intermediate, v.hidden_size, 1),
                ("dense down", t, v.hidden_size, v.dense_intermediate, 1)]
    return out


def stage_split(layer_s: list[float], tail_s: float, pp: int, schedule: str) -> tuple[list[int], float]:
    """The split of the layers (seconds per micro-batch each, in model order) into ``pp`` contiguous stages,
    ``tail_s`` (output head, MTP modules) on the last, that minimises the busiest rank's seconds per micro-batch
    (module docstring: 1F1B a rank runs its stage; DualPipe the mean of stages r and pp-1-r). Returns (layers per
    stage, the busiest rank's seconds). Dynamic programming over the stages, stage sizes within a few layers of
    the mean (a stage far larger than the mean is never the best split of layers of similar cost)."""
    n = len(layer_s)
    prefix = [0.0]
    for c in layer_s:
        prefix.append(prefix[-1] + c)
    if pp == 1:
        return [n], prefix[n] + tail_s
    mean = n / pp
    sizes = range(max(0, int(mean) - max(3, int(mean / 2))), int(mean) + max(4, int(mean / 2) + 1) + 1)

    def seg(i: int, j: int) -> float:
        return prefix[j] - prefix[i]

    if schedule == "1f1b":
        # level r: {first layer of stage r: (busiest so far, sizes)}
        level = {0: (0.0, [])}
        for r in range(pp):
            last = r == pp - 1
            nxt: dict[int, tuple[float, list[int]]] = {}
            for i, (worst, split) in level.items():
                for a in ([n - i] if last else sizes):
                    if i + a > n:
                        continue
                    cand = (max(worst, seg(i, i + a) + (tail_s if last else 0.0)), split + [a])
                    if i + a not in nxt or cand[0] < nxt[i + a][0]:
                        nxt[i + a] = cand
            level = nxt
        worst, split = level[n]
        return split, worst
    # DualPipe: pairs (r, pp-1-r) from the outside in; a state is (layers taken from the front, from the back).
    # First the least busiest-rank time; then, among the splits that reach it, the one with the smallest largest
    # stage (even stages keep the two directions' chunks alike, which DualPipe's overlap of one direction's
    # forward with the other's backward needs).
    pairs, middle = pp // 2, pp % 2

    def search(by_stage: bool, limit: float) -> tuple[float, list[int]] | None:
        level: dict[tuple[int, int], tuple[float, list[int], list[int]]] = {(0, 0): (0.0, [], [])}
        for r in range(pairs):
            nxt: dict[tuple[int, int], tuple[float, list[int], list[int]]] = {}
            final = r == pairs - 1 and not middle
            for (i, k), (worst, front, back) in level.items():
                for a in sizes:
                    for b in ([n - i - k - a] if final else sizes):
                        if b < 0 or i + a + k + b > n:
                            continue
                        first, second = seg(i, i + a), seg(n - k - b, n - k) + (tail_s if r == 0 else 0.0)
                        if (first + second) / 2 > limit:
                            continue
                        cand = (max(worst, max(first, second) if by_stage else (first + second) / 2),
                                front + [a], [b] + back)
                        state = (i + a, k + b)
                        if state not in nxt or cand[0] < nxt[state][0]:
                            nxt[state] = cand
            level = nxt
        best = None
        for (i, k), (worst, front, back) in level.items():
            if middle:  # an odd pp: the middle stage is a rank of its own
                rest = seg(i, n - k)
                if rest > limit:
                    continue
                worst, front = max(worst, rest), front + [n - i - k]
            elif i + k != n:
                continue
            if best is None or worst < best[0]:
                best = (worst, front + back)
        return best

    fastest = search(False, float("inf"))
    if fastest is None:
        raise ConfigError(f"cannot split {n} layers into {pp} pipeline stages")
    even = search(True, fastest[0] * (1 + 1e-9))
    return (even or fastest)[1], fastest[0]


def training_time(model: Model = "deepseek-v3", hardware: str | HardwareSpec = "h800",
                  layout: ParallelLayout | None = None, seq_len: int = 4096, global_batch: int = 15360,
                  micro_batch: int = 1, schedule: str = "dualpipe", recompute: str = "deepseek",
                  include_mtp: bool = True, precision: str = "fp8", eager: bool = False,
                  optimizer: str = "deepseek", kernels_per_step: int | None = None,
                  grad_clip: bool = True, expert_imbalance: float = 0.0, clip_in_update: bool = True) -> TrainingTime:
    """Step time of one training step; see the module docstring. ``precision``: the GEMMs' (``fp8`` or
    ``bf16``); ``eager``: every op is launched from Python (no CUDA graphs), so a step takes at least
    ``ops x host_launch_us`` of host time; ``optimizer``: a recipe of :data:`OPTIMIZERS` (``fp32``: FP32
    moments, and the BF16 weights cast from the FP32 masters by autocast in every forward);
    ``kernels_per_step``: the training stack's kernels per step and GPU where a profile has counted them
    (tools/count_step_kernels.py): those beyond the modelled ops run after them
    (``costs.unmodelled_kernels``; None: only the modelled ops); ``grad_clip``: the step clips the global
    gradient norm (the V3 report's 1.0; coscale train's default): one pass reads every gradient for the
    norm and the update takes the factor (``clip_passes`` x the gradient's bytes per parameter at copy bandwidth:
    torch's fused AdamW also writes the gradient back); ``clip_in_update`` False: the factor applied by a pass of
    its own that reads and writes every gradient (3 passes; coscale train before the thirty-second session);
    ``expert_imbalance``: the busiest expert-parallel rank's routed rows over the mean, minus 1 (module docstring;
    0: balanced)."""
    v, hw = as_view(model), load_hardware(hardware)
    layout = layout or ParallelLayout()
    layout.check(v)
    if schedule not in SCHEDULES or recompute not in RECOMPUTE or precision not in ("fp8", "bf16") \
            or optimizer not in OPTIMIZERS:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, recompute one of {RECOMPUTE}, precision "
                          f"fp8 or bf16 and optimizer one of {tuple(OPTIMIZERS)}")
    # micro-batch before global batch: the CLI's default global batch is dp x micro-batch, so a bad micro-batch
    # would otherwise be reported as a global batch the user did not give
    for name, value in (("sequence length", seq_len), ("micro-batch", micro_batch), ("global batch", global_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= expert_imbalance < float("inf"):
        raise ConfigError(f"expert imbalance must be a finite number >= 0 (MaxVio over EP ranks), "
                          f"got {expert_imbalance!r}")
    if expert_imbalance and not v.is_moe:
        raise ConfigError(f"{v.name} has no routed experts: an expert imbalance does not apply")
    dp = layout.dp
    if global_batch % (dp * micro_batch):
        raise ConfigError(f"global batch ({global_batch}) must be a multiple of dp x micro-batch ({dp * micro_batch})")
    micro_batches = global_batch // (dp * micro_batch)
    pp = layout.pp
    if schedule == "dualpipe" and pp > 1 and pp % 2:
        raise ConfigError(f"DualPipe pairs pipeline stages, so it needs an even pp, got {pp}: take the 1f1b schedule")
    if schedule == "dualpipe" and pp > 1 and (micro_batches % 2 or micro_batches < 2 * pp):
        raise ConfigError(f"DualPipe needs an even number of micro-batches, at least 2 x pp = {2 * pp}; got "
                          f"{micro_batches} (global batch / (dp x micro-batch)): raise the global batch or take the "
                          f"1f1b schedule")
    eff, tokens = hw.achieved, seq_len * micro_batch
    mtp = v.mtp_depth if include_mtp else 0
    f = b = w = 0.0
    layer_counts = [(False, v.dense_layers), (v.is_moe, v.moe_layers + mtp)]
    slowdown = eff.sms / (eff.sms - eff.comm_sms) if v.is_moe and layout.ep > 1 else 1.0
    a2a = hidden_a2a_exposed = kernels = 0.0
    layer_s = {}  # one layer's F + B + W (and exposed all-to-all) by kind (dense or MoE), for the stage split
    for moe, count in layer_counts:
        if not count:
            continue
        fwd, bwd, wg, rec = _pass_ops(v, hw, tokens, micro_batch, seq_len, layout.tp, layout.ep, moe, precision)
        if moe and expert_imbalance:  # the busiest rank's routed rows
            fwd, bwd, wg = ([op.scaled(1 + expert_imbalance) if _routed(op) else op for op in ops]
                            for ops in (fwd, bwd, wg))
        scale = count / layout.pp * (slowdown if moe else 1.0)
        extra = fwd if recompute == "full" else (rec if recompute == "deepseek" else [])
        f += scale * sum(op.seconds for op in fwd)
        b += scale * sum(op.seconds for op in bwd + extra)
        w += scale * sum(op.seconds for op in wg)
        layer_s[moe] = (slowdown if moe else 1.0) * sum(op.seconds for op in fwd + bwd + extra + wg)
        kernels += count / layout.pp * len(fwd + bwd + extra + wg)
        if moe and layout.ep > 1:
            par = L.Parallel(ep=layout.ep, tp=layout.tp, redundant_experts=0)
            dispatch, combine = L.collectives(v, hw, tokens / layout.tp, par, decode=False)
            dispatch_s, combine_s = (op.seconds * (1 + expert_imbalance) for op in (dispatch, combine))
            a2a += count / layout.pp * 2 * (dispatch_s + combine_s)
            if schedule == "dualpipe":
                exposed = dualpipe_exposed(fwd, bwd + extra, wg, dispatch_s, combine_s, slowdown)
                hidden_a2a_exposed += count / layout.pp * exposed
                layer_s[moe] += exposed
    head = sum(op.seconds for op in L.head_ops(v, hw, tokens, layout.tp)) * (1 + mtp) / layout.pp
    f, b, w = f + head, b + head, w + head
    # whole layers: the busiest rank's F + B + W against the mean (the MTP modules ride with the head)
    layers = [layer_s.get(False, 0.0)] * v.dense_layers + [layer_s.get(True, 0.0)] * v.moe_layers
    tail = mtp * layer_s.get(v.is_moe, 0.0) + 3 * head * layout.pp
    split, busiest = stage_split(layers, tail, layout.pp, schedule)
    per_micro_batch = f + b + w + hidden_a2a_exposed
    stage_ratio = busiest / per_micro_batch if layout.pp > 1 and per_micro_batch > 0 else 1.0
    if layout.pp == 1:
        bubble = 0.0
    elif schedule == "1f1b":
        bubble = (layout.pp - 1) * (f + b + w) * stage_ratio
    else:  # the report's F&B + B - 3W with B a whole backward chunk (input and weight gradients, b + w) and F&B a
        # forward-backward pair (its computation, and what of its all-to-all outlasts it)
        pair, backward = f + b + w + hidden_a2a_exposed, b + w
        bubble = (layout.pp / 2 - 1) * max(pair + backward - 3 * w, 0.0) * stage_ratio
    unpaired = dualpipe_unpaired_chunks(layout.pp, micro_batches) if schedule == "dualpipe" else micro_batches
    exposed_a2a = (micro_batches - unpaired) * hidden_a2a_exposed + unpaired * a2a
    local_params = v.non_expert_params / (layout.tp * layout.pp) + v.routed_expert_params / (layout.ep * layout.pp)
    dp_bytes = (v.non_expert_params / (layout.tp * layout.pp) * (dp - 1) / dp
                + v.routed_expert_params / (layout.ep * layout.pp) * (layout.edp - 1) / max(layout.edp, 1)) * (4 + 2)
    dp_sync = dp_bytes / (eff.a2a_scale_out_gbps * 1e9) if dp > 1 else 0.0
    opt_bytes = optimizer_bytes_per_param(optimizer)
    update_s = local_params * opt_bytes / (eff.memory_tbps * 1e12)
    # no separate weight copy: autocast casts each FP32 master to BF16 in every micro-batch's forward
    # (read 4 + write 2 bytes per parameter)
    casts = micro_batches * local_params * 6 / (eff.memory_tbps * 1e12) if not OPTIMIZERS[optimizer]["weight_copy"] \
        else 0.0
    parts = {"forward": micro_batches * f, "input gradients": micro_batches * b, "weight gradients": micro_batches * w,
             "pipeline stage imbalance": micro_batches * per_micro_batch * (stage_ratio - 1),
             "pipeline bubble": bubble, "exposed all-to-all": exposed_a2a, "data-parallel sync": dp_sync,
             "optimizer": update_s}
    if grad_clip:  # the norm reads every gradient; the factor is applied inside the update, which reads them anyway
        o = OPTIMIZERS[optimizer]
        passes = o["clip_passes"] if clip_in_update else 3
        parts["gradient clipping"] = local_params * passes * o["grad"] / (eff.memory_tbps * 1e12)
    if casts:
        parts["weight casts (autocast)"] = casts
    head_kernels = 3 * len(L.head_ops(v, hw, tokens, layout.tp)) * (1 + mtp) / layout.pp  # forward, both gradients
    other = unmodelled_kernels(eff, kernels_per_step, micro_batches * (kernels + head_kernels))
    if other is not None:
        parts["other kernels"] = other.seconds
    if eager:  # the host launches every op; the GPU cannot run ahead of it
        host = micro_batches * kernels * eff.host_launch_us * 1e-6
        parts["host launch (beyond GPU time)"] = max(host - sum(parts.values()), 0.0)
    step = sum(parts.values())
    notes = [f"{v.name} on {layout.world} x {hw.name}: dp {dp} tp {layout.tp} pp {layout.pp} ep {layout.ep}; "
             f"{micro_batches} micro-batches of {micro_batch} x {seq_len} tokens per pipeline; {schedule} schedule; "
             f"recompute {recompute}; MTP modules {'trained' if mtp else 'excluded'}; {precision.upper()} GEMMs; "
             f"AdamW '{optimizer}' ({opt_bytes} B per parameter at copy bandwidth)"
             + ("; autocast casts every FP32 master to BF16 per micro-batch (6 B per parameter)" if casts else "")
             + (("; gradients clipped to a global norm (read for the norm; the factor taken by the update)"
                 if clip_in_update else "; gradients clipped to a global norm (read for the norm, scaled in place)")
                if grad_clip else "")
             + (f"; eager: {kernels:.0f} ops per micro-batch and stage at {eff.host_launch_us:g} us each"
                if eager else ""),
             (f"layers per pipeline stage {split} (the last with the output head and {mtp} MTP module(s)); the busiest "
              f"rank {100 * (stage_ratio - 1):.1f}% above an even split" if layout.pp > 1 else "one pipeline stage"),
             (f"the busiest expert-parallel rank receives {1 + expert_imbalance:.3g} x the mean routed rows "
              f"(expert imbalance {expert_imbalance:g})" if expert_imbalance else "routing balanced over the EP ranks"),
             f"MoE computation on {eff.sms - eff.comm_sms} of {eff.sms} SMs (the all-to-all kernels hold the rest)"
             if slowdown > 1 else "no SMs held by communication kernels",
             ("expert all-to-all: " + (f"DualPipe pairs each with the other direction's computation (the V3 report's "
                                       f"Figure 4), what outlasts it exposed; the busiest rank runs {unpaired} of its "
                                       f"{micro_batches} forward and backward chunks alone (warm-up, cool-down: "
                                       f"deepseek-ai/DualPipe's schedule), exposed whole" if schedule == "dualpipe"
                                       else "exposed whole (1F1B overlaps none)")) if a2a else "no expert all-to-all",
             "achieved rates: " + "; ".join(f"{k} {getattr(eff, k):g}" for k in (
                 "gemm_fp8_tflops", "gemm_wgrad_fp8_tflops", "gemm_k_overhead", "attention_prefill_tflops",
                 "attention_backward_tflops", "memory_tbps", "a2a_scale_out_gbps", "kernel_floor_us", "gemm_floor_us",
                 "sustained_clock_ratio")),
             f"compute-bound kernels at {eff.sustained_clock_ratio:.3g} x their benchmarked rates (sustained clock)"]
    return TrainingTime(v.name, hw.name, layout, global_batch * seq_len, step, parts,
                        training_flops_per_token(v, seq_len), hw.peak_flops("bf16"), notes)
