"""Per-GPU memory for training under a parallel layout, and for inference (weights + KV cache).

Layout: ``dp x tp x pp`` GPUs. Non-expert weights are split over TP and PP; routed experts over EP and
PP (not TP). EP groups are carved out of the ``dp x tp`` ranks of a pipeline stage, so ``ep`` divides
``dp x tp``; experts are replicated over ``dp x tp / ep`` ranks ("expert data parallel", EDP). Any EP
size works: with ``redundant_experts`` extra replicas (EPLB) a GPU holds ``ceil((routed + redundant) /
ep)`` experts per MoE layer. ZeRO stage 1 shards the optimizer states (FP32 master and the AdamW moments) over the
data-parallel ranks (DP for non-expert, EDP for expert weights), stage 2 also the gradients, stage 3
(FSDP) also the weights.

Training precisions (bytes per parameter): compute weights (BF16, or FP8), master weights (FP32, or none),
gradients (FP32 as in DeepSeek-V3, or BF16), two AdamW moments (BF16 as in DeepSeek-V3, or FP32).

Activations are a rough estimate: ``coeff x seq x micro_batch x hidden`` bytes per layer and micro-batch
(coeff 34 for BF16 without recomputation and with flash attention, after Korthikanti et al. 2022; 2 with
full recomputation, where only each layer's input is kept), / TP, x layers per stage, x the micro-batches
in flight on the first stage under 1F1B (``pp``). MoE layers hold more (k expert inputs per token); the
coefficient is editable.

Inference: weights at ``weight_dtype`` split as above, plus the KV cache of ``batch / dp`` sequences of
``context`` tokens per GPU, / PP, and / TP for MHA/GQA (up to the KV-head count; MLA's latent is
replicated across TP).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from coscale.analysis.kv_cache import kv_cache_bytes_per_token
from coscale.analysis.models import Model, ModelView, as_view
from coscale.analysis.table import Table
from coscale.errors import ConfigError
from coscale.hardware import PRESETS as HARDWARE_PRESETS
from coscale.hardware import get_hardware

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def dtype_bytes(name: str | None, what: str) -> float:
    if name is None or name == "none":
        return 0
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{what} precision must be one of {', '.join(DTYPE_BYTES)}, got {name!r}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ParallelLayout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 1  # 0: none, 1: optimizer states, 2: + gradients, 3: + weights (FSDP)
    redundant_experts: int = 0  # extra expert replicas spread over the EP group (load balancing)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        return self.dp * self.tp // self.ep

    def check(self, v: ModelView) -> None:
        for name, value in asdict(self).items():
            if name in ("zero", "redundant_experts"):  # 0 is valid for both: checked below
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel size {name} must be a positive integer, got {value!r}")
        r = self.redundant_experts
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"redundant experts (--redundant-experts) must be an integer >= 0, got {r!r}")
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.pp > v.layers:
            raise ConfigError(f"pp ({self.pp}) exceeds the number of layers ({v.layers})")
        if v.heads % self.tp:
            raise ConfigError(f"tp ({self.tp}) must divide the attention heads ({v.heads})")
        if self.ep > 1 and not v.is_moe:
            raise ConfigError(f"ep ({self.ep}) > 1 needs an MoE model; {v.name} is dense")
        if (self.dp * self.tp) % self.ep:
            raise ConfigError(f"ep ({self.ep}) must divide dp x tp ({self.dp * self.tp})")
        if self.redundant_experts and not v.is_moe:
            raise ConfigError(f"redundant experts need an MoE model; {v.name} is dense")
        if v.is_moe and self.ep > v.n_routed_experts + self.redundant_experts:
            raise ConfigError(f"ep ({self.ep}) exceeds the routed + redundant experts "
                              f"({v.n_routed_experts + self.redundant_experts}): some GPU would hold none")

    def experts_per_gpu(self, v: ModelView) -> int:
        """Routed experts one GPU holds per MoE layer: (routed + redundant) / ep, rounded up."""
        return -(-(v.n_routed_experts + self.redundant_experts) // self.ep) if v.is_moe else 0


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU by item."""

    weights: float
    gradients: float
    master_weights: float
    optimizer_moments: float
    activations: float
    kv_cache: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def fits(self) -> list[str]:
        """Hardware presets whose HBM holds ``total`` bytes."""
        return [n for n in HARDWARE_PRESETS if get_hardware(n).hbm_bytes >= self.total]


def _local_params(v: ModelView, layout: ParallelLayout) -> tuple[float, float]:
    """(non-expert, expert) parameters held by one GPU before ZeRO sharding."""
    moe_layers = v.routed_expert_params / (v.n_routed_experts * v.expert_params) if v.is_moe else 0
    return (v.non_expert_params / (layout.tp * layout.pp),
            layout.experts_per_gpu(v) * v.expert_params * moe_layers / layout.pp)


def memory_per_gpu(model: Model, layout: ParallelLayout | None = None, seq_len: int = 4096,
                   micro_batch: int = 1, weights: str = "bf16", master: str | None = "fp32",
                   grads: str = "fp32", moments: str = "bf16", activation_coeff: float = 34.0) -> MemoryBreakdown:
    """Training memory per GPU in bytes (main model; MTP excluded); see the module docstring."""
    v = as_view(model)
    layout = layout or ParallelLayout()
    layout.check(v)
    if seq_len < 1 or micro_batch < 1 or not 0 <= activation_coeff < math.inf:
        raise ConfigError("sequence length and micro-batch must be >= 1 and the activation coefficient a finite "
                          f"number >= 0, got {seq_len}, {micro_batch} and {activation_coeff}")
    dense, expert = _local_params(v, layout)

    def sharded(stage: int) -> float:  # parameters per GPU after ZeRO sharding from `stage` on
        if layout.zero >= stage:
            return dense / layout.dp + expert / layout.edp
        return dense + expert

    per_layer = activation_coeff * seq_len * micro_batch * v.hidden_size / layout.tp
    return MemoryBreakdown(
        weights=sharded(3) * dtype_bytes(weights, "weight"),
        gradients=sharded(2) * dtype_bytes(grads, "gradient"),
        master_weights=sharded(1) * dtype_bytes(master, "master weight"),
        optimizer_moments=sharded(1) * 2 * dtype_bytes(moments, "optimizer moment"),
        # layers / pp per stage, x pp micro-batches in flight on the first stage (1F1B)
        activations=per_layer * v.layers,
        kv_cache=0.0,
    )


def inference_memory_per_gpu(model: Model, layout: ParallelLayout | None = None, batch: int = 1,
                             context: int = 4096, weight_dtype: str = "fp8",
                             kv_dtype: str = "bf16") -> MemoryBreakdown:
    """Inference memory per GPU in bytes: weights plus the KV cache of ``batch`` sequences."""
    v = as_view(model)
    layout = layout or ParallelLayout(zero=0)
    layout.check(v)
    if batch < 1 or context < 1:
        raise ConfigError(f"batch and context must be >= 1, got {batch} and {context}")
    dense, expert = _local_params(v, layout)
    kv_split = 1 if v.attention == "MLA" else min(layout.tp, v.kv_heads)
    per_token = kv_cache_bytes_per_token(v, dtype_bytes(kv_dtype, "KV cache"))
    sequences = -(-batch // layout.dp)  # the most any data-parallel rank holds
    return MemoryBreakdown(
        weights=(dense + expert) * dtype_bytes(weight_dtype, "weight"), gradients=0.0, master_weights=0.0,
        optimizer_moments=0.0, activations=0.0,
        kv_cache=sequences * context * per_token / layout.pp / kv_split,
    )


def memory_table(m: MemoryBreakdown, title: str, notes: list[str] | None = None) -> Table:
    rows = [[k.replace("_", " "), val / 1e9] for k, val in asdict(m).items() if val]
    rows.append(["total", m.total / 1e9])
    fits = m.fits()
    return Table(
        title=title, columns=["item", "GB per GPU"], rows=rows, formats=["", ".2f"],
        notes=(notes or []) + [f"fits on: {', '.join(fits) if fits else 'none of the presets'} "
                               "(HBM capacity, no allowance for fragmentation or workspace)."],
    )
