"""Prefill and decode throughput per GPU for MoE + MLA models under expert parallelism.

A deployment (DeepSeek's inference system, SGLang's large-scale EP): routed experts spread over ``ep``
GPUs (``(routed + redundant) / ep`` per GPU, rounded up), attention in data parallel or with ``tp``-way
tensor parallelism inside groups of the same GPUs, the shared expert and dense layers replicated, two
micro-batches overlapping computation with the all-to-all (``overlap``), FP8 GEMMs and dispatch, BF16
combine and KV cache. Kernel times come from ``layers`` / ``costs`` with the GPU's achieved rates
(``coscale.hardware.Efficiency``: published kernel figures, or ``coscale calibrate``'s measurements).

- **Decode step**: every request adds ``1 + d`` tokens (``d`` MTP drafts to verify) through the model,
  then the ``d`` MTP modules draft the next ones; a request emits ``1 + a + ... + a^d`` tokens per step
  at acceptance ``a``. TPOT = step / that yield; tokens/s per GPU = batch x yield / step / tp.
- **Prefill**: ``tokens`` per GPU, ``prompt_len`` each, causal; the MTP modules run over every token (they
  keep their own KV cache); the output head only over the last token of each prompt. TTFT = step time.
  The bulk all-to-all kernels occupy ``comm_sms`` SMs while computation overlaps them, so computation in
  MoE layers runs on the remaining SMs when micro-batches overlap.

Routing is balanced (every GPU receives ``tokens x k`` routed rows), as DeepSeek's profile simulates.
Everything assumed is listed in :attr:`PhaseResult.assumptions` and printed by ``coscale analyze serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coscale.analysis import costs, overlap
from coscale.analysis import layers as L
from coscale.analysis.models import Model, ModelView, as_view
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, load_hardware

DTYPES = {"fp8": 1, "bf16": 2}

# DeepSeek's published inference profile (github.com/deepseek-ai/profile-data), per GPU, as the SGLang
# team read it (lmsys.org/blog/2025-05-05-large-scale-ep: 18,598 output and 62,713 input tokens/s per node
# of 8 H800s). The decode profile verifies one MTP draft per request (256 tokens per step for 128
# requests); the SGLang comparison assumes 60% acceptance.
DEEPSEEK_PROFILE = {
    "decode": dict(model="deepseek-v3", hardware="h800", ep=128, batch=128, context=4096, mtp_drafts=1,
                   mtp_acceptance=0.6, published_tokens_per_s=18598 / 8),
    "prefill": dict(model="deepseek-v3", hardware="h800", ep=32, tokens=16384, prompt_len=4096,
                    published_tokens_per_s=62713 / 8),
}


@dataclass(frozen=True)
class ServingLayout:
    ep: int = 1  # GPUs sharing the routed experts
    tp: int = 1  # attention tensor parallelism (attention data parallel = ep / tp)
    redundant_experts: int = 0  # extra expert replicas for load balancing (EPLB)
    micro_batches: int = 2  # two-batch overlap; 1 = no overlap

    def check(self, v: ModelView, hw: HardwareSpec) -> None:
        for name in ("ep", "tp", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.redundant_experts, int) or self.redundant_experts < 0:
            raise ConfigError(f"redundant experts must be >= 0, got {self.redundant_experts!r}")
        if v.is_moe and self.ep > v.n_routed_experts + self.redundant_experts:
            raise ConfigError(f"ep ({self.ep}) exceeds the routed + redundant experts "
                              f"({v.n_routed_experts + self.redundant_experts}): some GPU would hold none")
        if not v.is_moe and (self.ep > 1 or self.redundant_experts):
            raise ConfigError(f"{v.name} is dense: expert parallelism needs routed experts")
        if v.heads % self.tp or self.tp > hw.scale_up_domain:
            raise ConfigError(f"tp ({self.tp}) must divide the heads ({v.heads}) and fit in one scale-up "
                              f"domain ({hw.scale_up_domain} GPUs)")
        if v.is_moe and self.ep % self.tp:
            raise ConfigError(f"tp ({self.tp}) must divide ep ({self.ep}): attention groups are carved "
                              "out of the EP group")


@dataclass
class PhaseResult:
    phase: str  # "decode" or "prefill"
    model: str
    hardware: str
    layout: ServingLayout
    step_s: float  # one forward pass (a decode step, or the prefill of the batch)
    tokens_per_step: float  # per GPU: output tokens (decode, expected) or prompt tokens (prefill)
    gpus_per_node: int
    latency_s: float  # TPOT (decode) or TTFT (prefill)
    schedule: overlap.Schedule
    memory: dict[str, float]  # bytes per GPU
    hbm_bytes: float
    assumptions: list[str] = field(default_factory=list)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_node(self) -> float:
        return self.tokens_per_s_per_gpu * self.gpus_per_node

    @property
    def fits(self) -> bool:
        return sum(self.memory.values()) <= self.hbm_bytes

    @property
    def binding(self) -> str:
        """The resource busy longest: tensor cores, HBM, kernel launches, NICs, NVLink or latency."""
        busy = self.schedule.busy_by_bound
        return {"compute": "compute", "memory": "HBM bandwidth", "launch": "kernel launches",
                "scale-out": "scale-out network (all-to-all)", "scale-up": "NVLink",
                "latency": "collective latency"}[max(busy, key=busy.get)]

    def to_dict(self) -> dict:
        s = self.schedule
        return {"phase": self.phase, "model": self.model, "hardware": self.hardware,
                "layout": vars(self.layout), "step_s": self.step_s, "latency_s": self.latency_s,
                "tokens_per_step_per_gpu": self.tokens_per_step,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "tokens_per_s_per_node": self.tokens_per_s_per_node, "binding": self.binding,
                "compute_busy_s": s.compute_busy_s, "network_busy_s": s.network_busy_s,
                "busy_by_bound_s": s.busy_by_bound, "busy_by_op_s": s.busy_by_op,
                "memory_bytes": self.memory, "fits": self.fits, "assumptions": self.assumptions}


def mtp_yield(drafts: int, acceptance: float) -> float:
    """Expected tokens a request emits per step: 1 + a + a^2 + ... + a^d (a draft counts only if all
    before it were accepted)."""
    return sum(acceptance ** i for i in range(drafts + 1))


def memory_per_gpu(v: ModelView, layout: ServingLayout, requests: float, tokens_per_request: float,
                   weight_dtype: str = "fp8", kv_dtype: str = "bf16", mtp_modules: int = 0) -> dict[str, float]:
    """Weights (attention / tp, experts / ep, the rest replicated; embedding and head in BF16) and the KV
    cache of ``requests`` sequences of ``tokens_per_request`` (the MLA latent is replicated across tp)."""
    wb, kvb = DTYPES[weight_dtype], DTYPES[kv_dtype]
    emb = v.embedding_params
    per_layer_replicated = v.attention_params_per_layer / layout.tp
    dense = v.dense_layers * (per_layer_replicated + 3 * v.hidden_size * v.dense_intermediate / layout.tp)
    moe_layers = v.moe_layers + mtp_modules
    moe = moe_layers * (per_layer_replicated + 3 * v.hidden_size * v.shared_intermediate
                        + v.hidden_size * v.n_routed_experts)
    routed = moe_layers * -(-(v.n_routed_experts + layout.redundant_experts) // layout.ep) * v.expert_params
    mtp_own = mtp_modules * 2 * v.hidden_size * v.hidden_size
    kv_elements = v.kv_cache_elements_per_layer if v.attention == "MLA" else \
        v.kv_cache_elements_per_layer / min(layout.tp, v.kv_heads)
    return {"weights": (dense + moe + routed + mtp_own) * wb + 2 * emb * 2,
            "kv_cache": requests * tokens_per_request * (v.layers + mtp_modules) * kv_elements * kvb}


def _forward(v: ModelView, hw: HardwareSpec, b: L.Batch, par: L.Parallel, layout: ServingLayout,
             mtp_layers: int, head_tokens: float, slowdown: float, kernels_per_step: int | None = None
             ) -> overlap.Schedule:
    """Dense layers, MoE layers, the output head; then each MTP module (projection, one MoE layer, head).
    With ``kernels_per_step`` (a stack's kernel count, from a profile of its step), the kernels beyond
    the modelled ops run after them (``costs.unmodelled_kernels``)."""
    m = layout.micro_batches
    moe_layer = L.layer_stages(v, hw, b, par, moe=v.is_moe, compute_slowdown=slowdown)
    stages = [L.layer_stages(v, hw, b, par, moe=False)] * v.dense_layers + [moe_layer] * v.moe_layers
    stages.append((overlap.Stage(tuple(L.head_ops(v, hw, head_tokens / m, layout.tp))),))
    for _ in range(mtp_layers):
        stages.append((overlap.Stage(tuple(L.mtp_entry_ops(v, hw, b.tokens / layout.tp))),))
        stages.append(moe_layer)
        stages.append((overlap.Stage(tuple(L.head_ops(v, hw, head_tokens / m, layout.tp, "MTP head"))),))
    other = costs.unmodelled_kernels(hw.achieved, kernels_per_step,
                                     m * sum(len(stage.compute) for layer in stages for stage in layer))
    if other is not None:
        stages.append((overlap.Stage((other,)),))
    return overlap.run(stages, m)


def decode(model: Model = "deepseek-v3", hardware: str | HardwareSpec = "h800", layout: ServingLayout | None = None,
           batch: int = 128, context: int = 4096, mtp_drafts: int = 0, mtp_acceptance: float = 0.0,
           weight_dtype: str = "fp8", kv_dtype: str = "bf16", dispatch_dtype: str = "fp8",
           combine_dtype: str = "bf16", kernels_per_step: int | None = None) -> PhaseResult:
    """One decode step of ``batch`` requests per attention group (per GPU at tp = 1), ``context``
    cached tokens each; see the module docstring. ``kernels_per_step``: the serving stack's kernel
    count per step where it is known (``_forward``); None counts only the modelled ops."""
    v, hw, layout = as_view(model), load_hardware(hardware), layout or ServingLayout()
    _check_common(v, hw, layout, {"batch": batch, "context": context}, mtp_drafts, mtp_acceptance,
                  (weight_dtype, kv_dtype, dispatch_dtype, combine_dtype))
    queries = 1 + mtp_drafts
    m = layout.micro_batches
    b = L.Batch(tokens=batch * queries / m, requests=batch / m, queries=queries, context=context, decode=True)
    par = _parallel(layout, weight_dtype, dispatch_dtype, combine_dtype, kv_dtype)
    sched = _forward(v, hw, b, par, layout, mtp_drafts, batch * queries, 1.0, kernels_per_step)
    per_request = mtp_yield(mtp_drafts, mtp_acceptance)
    mem = memory_per_gpu(v, layout, batch, context + queries, weight_dtype, kv_dtype, mtp_drafts)
    notes = _assumptions(v, hw, layout, par, decode=True) + [
        f"decode: {batch} requests x {queries} token(s) per step ({mtp_drafts} MTP draft(s), acceptance "
        f"{mtp_acceptance:g}: {per_request:.3g} tokens per request and step); {context} cached tokens each; "
        f"{m} micro-batch(es) of {batch / m:g} requests",
    ] + ([f"{kernels_per_step} kernels per step (the stack's, measured): those beyond the modelled ops at "
          f"{hw.achieved.small_kernel_us:g} us each"] if kernels_per_step is not None else [])
    return PhaseResult("decode", v.name, hw.name, layout, sched.total_s, batch * per_request / layout.tp,
                       hw.gpus_per_node, sched.total_s / per_request, sched, mem, hw.hbm_bytes, notes)


def prefill(model: Model = "deepseek-v3", hardware: str | HardwareSpec = "h800", layout: ServingLayout | None = None,
            tokens: int = 16384, prompt_len: int = 4096, weight_dtype: str = "fp8", kv_dtype: str = "bf16",
            dispatch_dtype: str = "fp8", combine_dtype: str = "bf16", mtp_modules: int | None = None) -> PhaseResult:
    """The prefill of ``tokens`` prompt tokens per attention group (prompts of ``prompt_len``)."""
    v, hw, layout = as_view(model), load_hardware(hardware), layout or ServingLayout()
    _check_common(v, hw, layout, {"tokens": tokens, "prompt length": prompt_len}, 0, 0.0,
                  (weight_dtype, kv_dtype, dispatch_dtype, combine_dtype))
    if prompt_len > tokens:  # the tokens hold whole prompts: a fraction of one prompt is no prefill batch
        raise ConfigError(f"prompt length ({prompt_len}) exceeds the tokens per attention group ({tokens}): "
                          "they must hold at least one whole prompt")
    mtp = v.mtp_depth if mtp_modules is None else mtp_modules
    m = layout.micro_batches
    prompts = tokens / prompt_len
    b = L.Batch(tokens=tokens / m, requests=prompts / m, queries=prompt_len, context=prompt_len, decode=False)
    par = _parallel(layout, weight_dtype, dispatch_dtype, combine_dtype, kv_dtype)
    eff = hw.achieved
    slowdown = eff.sms / (eff.sms - eff.comm_sms) if m > 1 and layout.ep > 1 and v.is_moe else 1.0
    sched = _forward(v, hw, b, par, layout, mtp, prompts, slowdown)
    mem = memory_per_gpu(v, layout, prompts, prompt_len, weight_dtype, kv_dtype, mtp)
    notes = _assumptions(v, hw, layout, par, decode=False) + [
        f"prefill: {tokens} tokens per attention group ({prompts:g} prompts of {prompt_len}), {m} micro-batch(es)"
        " with the attention load split evenly; MTP modules over every token, the output head over the last"
        " token of each prompt",
        f"computation in MoE layers on {eff.sms - eff.comm_sms} of {eff.sms} SMs while the bulk all-to-all "
        f"kernels run (x{slowdown:.3g})" if slowdown > 1 else "no SMs lost to communication kernels",
    ]
    return PhaseResult("prefill", v.name, hw.name, layout, sched.total_s, tokens / layout.tp, hw.gpus_per_node,
                       sched.total_s, sched, mem, hw.hbm_bytes, notes)


def _parallel(layout: ServingLayout, weights: str, dispatch: str, combine: str, kv: str) -> L.Parallel:
    return L.Parallel(ep=layout.ep, tp=layout.tp, redundant_experts=layout.redundant_experts,
                      dispatch_bytes=DTYPES[dispatch], combine_bytes=DTYPES[combine], kv_bytes=DTYPES[kv],
                      gemm_dtype=weights)


def _check_common(v: ModelView, hw: HardwareSpec, layout: ServingLayout, counts: dict[str, int], drafts: int,
                  acceptance: float, dtypes: tuple[str, ...]) -> None:
    layout.check(v, hw)
    check_requests(v, counts, drafts, acceptance)
    for d in dtypes:
        if d not in DTYPES:
            raise ConfigError(f"precision must be one of {', '.join(DTYPES)}, got {d!r}")


def check_requests(v: ModelView, counts: dict[str, int], drafts: int, acceptance: float) -> None:
    """The request shape (``counts``: positive integers such as batch and context) and the MTP drafting of
    a decode step: what ``search`` checks before it looks at memory, so a bad value is an error there too."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(drafts, bool) or not isinstance(drafts, int) or drafts < 0 \
            or (drafts and drafts > max(v.mtp_depth, 1) * 8):
        raise ConfigError(f"MTP drafts must be an integer from 0 to {max(v.mtp_depth, 1) * 8}, got {drafts!r}")
    if drafts and not v.mtp_depth:
        raise ConfigError(f"{v.name} has no MTP module to draft with")
    if not 0 <= acceptance <= 1:
        raise ConfigError(f"MTP acceptance must be between 0 and 1, got {acceptance}")


def _assumptions(v: ModelView, hw: HardwareSpec, layout: ServingLayout, par: L.Parallel, decode: bool) -> list[str]:
    eff = hw.achieved
    dp = max(layout.ep // layout.tp, 1)
    out = [f"{v.name} on {hw.name}: ep {layout.ep} ({par.local_experts(v) if v.is_moe else 0} routed experts per "
           f"GPU with {layout.redundant_experts} redundant), attention tp {layout.tp} x dp {dp}; "
           "shared expert, router and dense layers replicated; balanced routing",
           f"{par.gemm_dtype.upper()} GEMMs, dispatch {par.dispatch_bytes:g} B/number (+ scales if FP8), combine "
           f"{par.combine_bytes:g} B/number, KV cache {par.kv_bytes:g} B/number, output head BF16"]
    if v.is_moe and layout.ep > hw.scale_up_domain:
        out.append("all-to-all: every routed copy over the NICs (low-latency kernels)" if decode else
                   f"all-to-all: node-limited routing ({v.topk_group} of {v.n_group} groups), one InfiniBand "
                   "copy per remote node, NVLink forwarding inside the node (bulk kernels)")
    elif v.is_moe and layout.ep > 1:
        out.append(f"all-to-all inside one scale-up domain ({hw.scale_up_domain} GPUs) over NVLink")
    out.append("achieved rates: " + "; ".join(f"{k} {getattr(eff, k):g}" for k in _RATES_SHOWN))
    out.append(f"compute-bound kernels at {eff.sustained_clock_ratio:.3g} x their benchmarked rates (sustained clock: "
               f"{eff.source('sustained_clock_ratio')})")
    out.append("weights read: only the local experts that receive a row (expected count under balanced routing)")
    return out


_RATES_SHOWN = ("gemm_fp8_tflops", "gemm_masked_fp8_tflops", "gemm_k_overhead", "gemm_memory_tbps",
                "gemm_bf16_tflops", "gemm_bf16_memory_tbps",
                "attention_decode_tflops", "attention_decode_tbps", "attention_prefill_tflops", "memory_tbps",
                "kernel_floor_us", "gemm_floor_us", "attention_decode_floor_us", "small_kernel_us",
                "a2a_scale_out_gbps", "a2a_low_latency_gbps", "a2a_scale_up_gbps", "collective_latency_us")
