"""The decoding speed limit of expert parallelism (the paper's section 4.4.2 worked example).

Each device holds one expert and processes ``T`` tokens per micro-batch; each token goes to ``k``
experts (routed + shared). Per layer and micro-batch the device sends its tokens to their experts in
FP8 (dispatch, 1 byte per number) and receives them back in BF16 (combine, 2 bytes):

    t_comm = (1 + 2) bytes x T x k x hidden / bandwidth

Two micro-batches overlap one's computation with the other's communication, so when communication
binds a layer takes ``2 x t_comm`` and ``TPOT = layers x 2 x t_comm``. With T = 32, k = 9,
hidden = 7,000 (the paper rounds 7,168 to "7K") and 400 Gbps InfiniBand (50 GB/s, GB = 10^9 bytes):
120.96 us, 241.92 us per layer, 14.76 ms for 61 layers, ~67 tokens/s; on GB200 NVL72 (900 GB/s):
6.72 us, 0.82 ms, ~1,200 tokens/s. With the real hidden size 7,168 the InfiniBand case is 15.11 ms.

Beside that bound the same step has two more (ours, not the paper's), per device and layer, each x the
number of micro-batches:
- compute: ``2 x T x`` (attention weights + ``k`` expert weights) plus attention over the context
  (MLA in its absorbed decoding form: ``2 x T x heads x (2 x kv_lora_rank + rope) x context``), at the
  GPU's dense peak for ``compute_dtype``;
- memory bandwidth: the attention weights and one expert read once per micro-batch at
  ``weight_bytes`` per parameter, plus the KV cache of ``T`` sequences of ``context`` tokens.
Every layer is treated as an MoE layer, as in the paper's estimate. The binding bound is the largest;
compute and memory share the GPU (roofline: the larger of the two) and overlap with communication.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from coscale.analysis.models import Model, ModelView, as_view
from coscale.analysis.table import Table
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, load_hardware

LINKS = ("auto", "scale-up", "scale-out")
PAPER_HIDDEN = 7000  # the paper's "7K"

# The paper's worked example, for comparison and tests only.
PUBLISHED = {
    "ib": dict(bandwidth_gbps=50.0, comm_us=120.96, layer_us=241.92, tpot_ms=14.76, tokens_per_s=67),
    "nvl72": dict(bandwidth_gbps=900.0, comm_us=6.72, tpot_ms=0.82, tokens_per_s=1200),
    "ib_hidden_7168": dict(tpot_ms=15.11),
}


def ep_comm_time(tokens: int, experts_per_token: int, hidden: int, bandwidth_gbps: float,
                 dispatch_bytes: float = 1, combine_bytes: float = 2) -> float:
    """Seconds to dispatch and combine one micro-batch over one link of ``bandwidth_gbps`` GB/s."""
    if not 0 < bandwidth_gbps < math.inf:  # an infinite link would make the communication bound 0 s
        raise ConfigError(f"bandwidth must be a positive finite number (GB/s), got {bandwidth_gbps}")
    for name, value in (("tokens per device", tokens), ("experts per token", experts_per_token),
                        ("hidden size", hidden)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    return (dispatch_bytes + combine_bytes) * tokens * experts_per_token * hidden / (bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class InferenceLimit:
    model: str
    hardware: str
    bandwidth_gbps: float
    hidden: int
    tokens_per_device: int
    experts_per_token: int
    layers: int
    micro_batches: int
    comm_time_s: float  # per layer and micro-batch
    layer_time_s: float  # communication-bound time of one layer (all micro-batches)
    tpot_s: float  # communication bound: the paper's TPOT
    compute_tpot_s: float
    memory_tpot_s: float
    mtp_acceptance: float = 0.0  # probability that the MTP draft token is accepted (paper: 0.8-0.9)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s

    @property
    def tokens_per_s_with_mtp(self) -> float:
        """Tokens/s at the communication bound when each step also emits an accepted MTP draft."""
        return (1.0 + self.mtp_acceptance) / self.tpot_s

    @property
    def bounds(self) -> dict[str, float]:
        return {"communication": self.tpot_s, "compute": self.compute_tpot_s, "memory": self.memory_tpot_s}

    @property
    def binding(self) -> str:
        bounds = self.bounds
        return max(bounds, key=bounds.get)

    @property
    def achievable_tpot_s(self) -> float:
        return max(self.bounds.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "binding": self.binding,
                "achievable_tpot_s": self.achievable_tpot_s, "tokens_per_s_with_mtp": self.tokens_per_s_with_mtp}


def link_bandwidth(hardware: HardwareSpec, link: str = "auto") -> float:
    """GB/s per GPU and direction for EP traffic: the scale-up fabric when it spans more than an
    8-GPU node (``auto``; GB200 NVL72), else the scale-out NICs (400 Gbps InfiniBand -> 50 GB/s)."""
    if link not in LINKS:
        raise ConfigError(f"link must be one of {LINKS}, got {link!r}")
    if link == "scale-up" or (link == "auto" and hardware.scale_up_domain > 8):
        return hardware.scale_up_bandwidth_gbps
    return hardware.scale_out_bandwidth_gbps


def inference_limit(model: Model = "deepseek-v3", hardware: str | HardwareSpec = "h800",
                    bandwidth_gbps: float | None = None, link: str = "auto", tokens_per_device: int = 32,
                    experts_per_token: int | None = None, hidden: int | None = None,
                    micro_batches: int = 2, context: int = 4096, weight_bytes: float = 1,
                    kv_bytes: float = 2, compute_dtype: str = "fp8",
                    mtp_acceptance: float = 0.0) -> InferenceLimit:
    """EP decoding limits for ``model`` on ``hardware``; see the module docstring for the formulas.

    ``bandwidth_gbps`` (GB/s, 10^9 bytes/s) overrides the hardware's link; ``experts_per_token``
    defaults to routed + shared experts (9 for DeepSeek-V3); ``hidden`` overrides the hidden size for
    the communication term only (7000 reproduces the paper's rounding). ``mtp_acceptance`` (0-1) adds
    the MTP draft token's expected yield to ``tokens_per_s_with_mtp`` (0.8-0.9 gives the paper's ~1.8x).
    """
    v = as_view(model)
    if not v.is_moe:
        raise ConfigError(f"inference-limit models expert-parallel decoding; {v.name} has no routed experts")
    if not 0 <= mtp_acceptance <= 1:
        raise ConfigError(f"MTP acceptance must be between 0 and 1, got {mtp_acceptance}")
    for name, value in (("micro-batches", micro_batches), ("context", context),
                        ("tokens per device", tokens_per_device)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    hw = load_hardware(hardware)
    bandwidth = link_bandwidth(hw, link) if bandwidth_gbps is None else bandwidth_gbps
    k = v.experts_per_token + v.shared_experts if experts_per_token is None else experts_per_token
    h = v.hidden_size if hidden is None else hidden
    comm = ep_comm_time(tokens_per_device, k, h, bandwidth)
    compute, memory = _gpu_layer_times(v, hw, tokens_per_device, k, context, weight_bytes, kv_bytes,
                                       compute_dtype)
    return InferenceLimit(
        model=v.name, hardware=hw.name, bandwidth_gbps=bandwidth, hidden=h,
        tokens_per_device=tokens_per_device, experts_per_token=k, layers=v.layers,
        micro_batches=micro_batches, comm_time_s=comm, layer_time_s=micro_batches * comm,
        tpot_s=v.layers * micro_batches * comm, compute_tpot_s=v.layers * micro_batches * compute,
        memory_tpot_s=v.layers * micro_batches * memory, mtp_acceptance=mtp_acceptance,
    )


def _gpu_layer_times(v: ModelView, hw: HardwareSpec, tokens: int, k: int, context: int,
                     weight_bytes: float, kv_bytes: float, compute_dtype: str) -> tuple[float, float]:
    """(compute, memory) seconds of one layer and micro-batch on one device."""
    if v.attention == "MLA":  # absorbed form: scores over latent + rope, values over the latent
        core = 2 * v.heads * (v.kv_cache_elements_per_layer + v.kv_lora_rank) * context
    else:
        core = 2 * v.heads * (v.qk_head_dim + v.v_head_dim) * context
    flops = tokens * (2 * v.attention_params_per_layer + 2 * k * v.expert_params + core)
    weights = (v.attention_params_per_layer + v.expert_params) * weight_bytes
    kv = tokens * context * v.kv_cache_elements_per_layer * kv_bytes
    return flops / hw.peak_flops(compute_dtype), (weights + kv) / (hw.hbm_bandwidth_tbps * 1e12)


def tpot_sweep(bandwidths_gbps: list[float], **kwargs) -> list[InferenceLimit]:
    """:func:`inference_limit` at each bandwidth (GB/s)."""
    return [inference_limit(bandwidth_gbps=b, **kwargs) for b in bandwidths_gbps]


def paper_cases(model: Model = "deepseek-v3") -> list[tuple[str, InferenceLimit]]:
    """The paper's two cases at hidden 7,000, and the InfiniBand case at the model's real hidden size."""
    return [
        ("400G IB, hidden 7000 (paper)", inference_limit(model, "h800", hidden=PAPER_HIDDEN)),
        ("GB200 NVL72, hidden 7000 (paper)", inference_limit(model, "gb200-nvl72", hidden=PAPER_HIDDEN)),
        ("400G IB, real hidden", inference_limit(model, "h800")),
        ("GB200 NVL72, real hidden", inference_limit(model, "gb200-nvl72")),
    ]


def inference_limit_table(cases: list[tuple[str, InferenceLimit]], title: str = "EP decoding speed limit") -> Table:
    """One row per case: the paper's communication bound ("comm TPOT", "comm tokens/s"), our compute and
    HBM bounds, and the binding (largest) bound with its TPOT and tokens/s."""
    mtp = any(r.mtp_acceptance for _, r in cases)
    rows = []
    for label, r in cases:
        row = [label, r.hardware, r.bandwidth_gbps, r.hidden, r.tokens_per_device, r.comm_time_s * 1e6,
               r.layer_time_s * 1e6, r.tpot_s * 1e3, r.tokens_per_s, r.compute_tpot_s * 1e3, r.memory_tpot_s * 1e3,
               r.binding, r.achievable_tpot_s * 1e3, 1 / r.achievable_tpot_s]
        if mtp:
            row.append((1 + r.mtp_acceptance) / r.achievable_tpot_s)
        rows.append(row)
    first = cases[0][1]
    notes = [
        f"communication: (1 B FP8 dispatch + 2 B BF16 combine) x tokens x {first.experts_per_token} experts x "
        f"hidden / bandwidth per layer and micro-batch; {first.micro_batches} micro-batches overlapped; x "
        f"{first.layers} layers; GB = 10^9 bytes. 'comm TPOT' and 'comm tokens/s' are this bound alone (the "
        "paper's figures); 'TPOT' and 'tokens/s' are the binding (largest) of the three bounds.",
        "compute and memory bounds (ours): FP8 weights, BF16 KV cache, one expert per device; see "
        "docs/analysis.md. The paper quotes 14.76 ms / ~67 tok/s and 0.82 ms / ~1,200 tok/s at hidden 7000, "
        "and 15.11 ms at hidden 7168. For deployment throughput (efficiencies, latencies, prefill) use "
        "'coscale analyze serve'.",
    ]
    columns = ["case", "hardware", "GB/s", "hidden", "tokens", "comm [us]", "layer [us]", "comm TPOT [ms]",
               "comm tokens/s", "compute TPOT [ms]", "memory TPOT [ms]", "binding", "TPOT [ms]", "tokens/s"]
    formats = ["", "", ".0f", "", "", ".2f", ".2f", ".2f", ".1f", ".3f", ".3f", "", ".2f", ".1f"]
    if mtp:
        columns.append(f"tokens/s with MTP ({first.mtp_acceptance:.0%} accepted)")
        formats.append(".1f")
    return Table(title=title, columns=columns, rows=rows, formats=formats, notes=notes)
