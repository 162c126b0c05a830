"""Accelerator descriptions for the co-design analysis: presets, achieved efficiencies, YAML/JSON files.

Units are in the field names. Decimal prefixes throughout (GB = 10^9 bytes, TB/s = 10^12 bytes/s),
as datasheets and the paper use them. FLOP/s are dense (no 2:4 sparsity). Bandwidths are per GPU and
per direction: NVIDIA quotes NVLink bandwidth as the sum of both directions ("900 GB/s" for H100), so
the presets store half of it; the paper's "900 GB/s unidirectional" for GB200 NVL72 is the NVLink-5
figure of 1.8 TB/s halved. Scale-out bandwidth is ``nics_per_gpu x nic_gbps / 8`` (400 Gbps -> 50 GB/s,
the paper's InfiniBand figure).

A spec holds two kinds of numbers. The datasheet peaks (``HardwareSpec``'s own fields) feed the paper's
bounds. The *achieved* rates (:class:`Efficiency`) feed the throughput predictions of
``coscale.analysis.serving`` and ``training_time``: what real kernels reach, each with its source.
The H800 values come from DeepSeek's published kernel figures (see ``H800_EFFICIENCY``); other
presets scale them by the ratio of the relevant peak and say so in their source; ``coscale calibrate``
measures them on the local GPU and writes a file with the measured ones.

A user file holds the same keys as :class:`HardwareSpec` (``name``, ``source``, ``gpus_per_node`` and
``efficiency`` optional); each efficiency entry is a number or ``{value: ..., source: ...}``, and the
entries left out are derived from the H800 figures by peak ratios::

    name: my-gpu
    hbm_gb: 96
    hbm_bandwidth_tbps: 4.0
    bf16_tflops: 1000
    fp8_tflops: 2000
    scale_up_bandwidth_gbps: 450      # GB/s per direction
    scale_up_domain: 8                # GPUs joined by the scale-up fabric
    nics_per_gpu: 1
    nic_gbps: 400                     # Gbit/s per NIC
    efficiency:
      gemm_fp8_tflops: {value: 1350, source: "my benchmark"}
      memory_tbps: 3.6

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from coscale.errors import ConfigError


@dataclass(frozen=True)
class Efficiency:
    """Achieved rates of real kernels on one GPU (not datasheet peaks). Units in the names."""

    gemm_fp8_tflops: float  # FP8 GEMM compute plateau (large M)
    gemm_grouped_fp8_tflops: float  # contiguous grouped GEMM plateau (prefill and training experts)
    gemm_bf16_tflops: float  # BF16 GEMM compute plateau
    gemm_masked_fp8_tflops: float  # decode-style masked grouped GEMM plateau
    gemm_wgrad_fp8_tflops: float  # grouped (MoE) weight-gradient GEMM, training
    gemm_k_overhead: float  # per-output-tile prologue/epilogue cost, in elements of K
    gemm_memory_tbps: float  # weight-streaming bandwidth of small-M GEMMs (FP8)
    gemm_bf16_memory_tbps: float  # weight-streaming bandwidth of small-M BF16 (grouped) GEMMs
    attention_decode_tflops: float  # absorbed-MLA decode, compute-bound
    attention_decode_tbps: float  # absorbed-MLA decode, memory-bound (KV-cache reads)
    attention_prefill_tflops: float  # causal prefill / training forward attention, BF16
    attention_backward_tflops: float  # training attention backward, BF16
    memory_tbps: float  # elementwise kernels and copies (read + write counted)
    kernel_floor_us: float  # the shortest a small kernel takes (launch and ramp, inside a CUDA graph)
    # a decode-size GEMM inside a CUDA graph (calibrate: 16 rows by a 2.4 MB weight, whose bytes take well
    # under its fixed cost): the floor of every GEMM's time, and where a weight-streaming GEMM's
    # latency-bandwidth line starts (coscale.analysis.costs.gemm)
    gemm_floor_us: float
    # the fixed cost of one absorbed-MLA decode attention (its split kernel and the combine of the splits)
    # inside a CUDA graph: what a batch of one request over a short context takes
    attention_decode_floor_us: float
    # a decode-size kernel (elementwise or row reduction over a [128, 2048] BF16 activation) inside a CUDA
    # graph, waiting for the one before it: what each of a serving stack's many small kernels costs
    small_kernel_us: float
    host_launch_us: float  # host time to launch one op from eager PyTorch (bounds launch-bound steps)
    a2a_scale_out_gbps: float  # all-to-all over the NICs, SM-driven bulk kernels (prefill, training)
    a2a_low_latency_gbps: float  # all-to-all over the NICs, decode (low-latency) kernels
    a2a_scale_up_gbps: float  # NVLink forwarding inside the scale-up domain
    collective_latency_us: float  # fixed cost of one collective (dispatch or combine)
    sms: int  # streaming multiprocessors
    comm_sms: int  # SMs the bulk all-to-all kernels occupy while they run
    sustained_clock_ratio: float  # tensor-core clock in a sustained full-model run / in the rate benchmarks
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if not _is_number(value) or value < 0 or (value == 0 and f.name not in _MAY_BE_ZERO):
                what = "a finite number >= 0" if f.name in _MAY_BE_ZERO else "a positive finite number"
                raise ConfigError(f"efficiency {f.name} must be {what}, got {value!r}{_yaml_hint(value)}")
        for name in ("sms", "comm_sms"):  # counts of SMs: a fraction of one would only skew the SM share
            value = getattr(self, name)
            if not float(value).is_integer():
                raise ConfigError(f"efficiency {name} must be a whole number of SMs, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not 0 < self.sustained_clock_ratio <= 1:
            raise ConfigError(f"efficiency sustained_clock_ratio must be in (0, 1], got {self.sustained_clock_ratio!r}")
        if self.comm_sms >= self.sms:
            raise ConfigError(f"efficiency comm_sms ({self.comm_sms}) must be below sms ({self.sms})")

    def source(self, name: str) -> str:
        return self.sources.get(name, "")


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): an infinite or NaN rate turns every prediction into inf or NaN."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _yaml_hint(value: Any) -> str:
    """Why a number came as a string: PyYAML (YAML 1.1) reads ``1e9`` as text; ``1.0e+9`` is a float."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML 1.1 reads {value} as a string: write it with a dot and a signed exponent, e.g. 1.0e+9)"
    return ""


_MAY_BE_ZERO = {"gemm_k_overhead", "kernel_floor_us", "gemm_floor_us", "attention_decode_floor_us", "small_kernel_us",
                "host_launch_us", "collective_latency_us", "comm_sms"}
EFFICIENCY_FIELDS = tuple(f.name for f in dataclasses.fields(Efficiency) if f.name != "sources")

# How each rate follows the datasheet when a figure measured on one GPU is carried to another.
_SCALES_WITH = {
    "gemm_fp8_tflops": "fp8", "gemm_grouped_fp8_tflops": "fp8", "gemm_masked_fp8_tflops": "fp8",
    "gemm_wgrad_fp8_tflops": "fp8",
    "gemm_bf16_tflops": "bf16", "attention_decode_tflops": "bf16", "attention_prefill_tflops": "bf16",
    "attention_backward_tflops": "bf16", "gemm_memory_tbps": "hbm", "gemm_bf16_memory_tbps": "hbm",
    "attention_decode_tbps": "hbm",
    "memory_tbps": "hbm", "a2a_scale_out_gbps": "scale_out", "a2a_low_latency_gbps": "scale_out",
    "a2a_scale_up_gbps": "scale_up",
}

_DG = "DeepGEMM README (2025-02-25, H800 SXM5)"
_EP = "DeepEP README, V1 (H800, CX7 400 Gb/s)"
# DeepSeek's own published kernel figures on the H800 (the GPU of their inference profile). Derivations
# are ours; docs/analysis.md walks through them.
H800_EFFICIENCY = {
    "gemm_fp8_tflops": (1400, f"{_DG}: M=4096 rows reach 1358 (K=16384) and 1304 (K=7168) TFLOP/s; "
                              "time = FLOPs / 1400 x (1 + 512/K) reproduces both"),
    "gemm_grouped_fp8_tflops": (1390, f"{_DG}: contiguous grouped rows 1297 (K=7168) and 1099 (K=2048) TFLOP/s "
                                      "with the same K overhead"),
    "gemm_bf16_tflops": (700, "half the FP8 plateau: Hopper's BF16 tensor-core rate is half its FP8 rate"),
    "gemm_masked_fp8_tflops": (1150, f"{_DG}: masked grouped rows 1233/925 (1x1024), 1040/916 (2x512) "
                                     "TFLOP/s at K = 7168/2048 with the same K overhead"),
    "gemm_wgrad_fp8_tflops": (457, "torchao blockwise benchmark: DeepGEMM grouped wgrad at DeepSeek-V3 "
                                   "shapes, 457 TFLOP/s (H100, same SMs as H800)"),
    "gemm_k_overhead": (512, f"{_DG}: the K=512..16384 rows at M=4096 (see gemm_fp8_tflops)"),
    "gemm_memory_tbps": (2.6, f"{_DG}: M=64/128 rows with K >= 1536 stream weights at 2.2-2.67 TB/s"),
    "gemm_bf16_memory_tbps": (2.6, "no published H800 figure for BF16 small-M GEMMs: taken as DeepGEMM's FP8 "
                                   "weight-streaming rate (both stream weights from HBM)"),
    "attention_decode_tflops": (580, "FlashMLA README (2025-02-24): 580 TFLOP/s compute-bound, H800 SXM5"),
    "attention_decode_tbps": (3.0, "FlashMLA README (2025-02-24): 3000 GB/s memory-bound, H800 SXM5"),
    "attention_prefill_tflops": (579, "FlashAttention-3 paper (arXiv 2407.08608): BF16 causal forward at 4K, head "
                                      "dim 128, 579 TFLOP/s on H100 SXM5 (the H800's SMs); the profile's prefill is "
                                      "dense causal attention over 4K prompts"),
    "attention_backward_tflops": (397, "579 x 1000/1460: FlashMLA README's backward/forward ratio for dense MHA"),
    "memory_tbps": (3.0, "FlashMLA's 3000 GB/s on H800 (90% of 3.35 TB/s)"),
    "kernel_floor_us": (2.0, "assumption: a small kernel inside a CUDA graph takes ~2 us (measure it with "
                             "coscale calibrate)"),
    "gemm_floor_us": (2.0, "assumption: as kernel_floor_us (no published figure; measure it with coscale "
                           "calibrate)"),
    "attention_decode_floor_us": (2.0, "assumption: as kernel_floor_us (no published figure; measure it with "
                                       "coscale calibrate)"),
    "small_kernel_us": (2.0, "assumption: as kernel_floor_us (measure it with coscale calibrate); used only "
                             "where a stack's kernel count per step is given"),
    "host_launch_us": (5.0, "assumption: an eager PyTorch op costs ~5 us of host time (attention-gym: 5.5 us "
                            "per custom-op call); measure it with coscale calibrate"),
    "a2a_scale_out_gbps": (44, f"{_EP}: normal kernels, EP32/EP64 58/51 GB/s counting own-node copies; "
                               "43.5/44.6 GB/s of real InfiniBand traffic"),
    "a2a_low_latency_gbps": (39, f"{_EP}: low-latency kernels, EP128: 192 us dispatch / 369 us combine "
                                 "for 128 tokens (39 GB/s both)"),
    "a2a_scale_up_gbps": (155, f"{_EP}: intranode NVLink 153 (dispatch) / 158 (combine) GB/s"),
    "collective_latency_us": (3.7, "the paper's Table 5: 3.7 us cross-leaf InfiniBand latency"),
    "sms": (132, "H800 SXM5: 132 SMs"),
    "comm_sms": (24, "DeepEP README: Buffer.set_num_sms(24) for the normal (prefill/training) kernels"),
    "sustained_clock_ratio": (1600 / 1830, "FlashMLA deep dive (2025-04-22): under heavy load the H800 throttles "
                                          "to ~1600 MHz (~865 of 989 TFLOP/s BF16); the datasheet peaks and the "
                                          "short kernel benchmarks above run at >= 1830 MHz (DeepGEMM's later "
                                          "1550 TFLOP/s would be 90% of the 1600-MHz FP8 peak): 1600/1830"),
}


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    hbm_gb: float  # HBM capacity per GPU, 10^9 bytes
    hbm_bandwidth_tbps: float  # HBM bandwidth per GPU, 10^12 bytes/s
    bf16_tflops: float  # dense BF16 tensor-core peak, 10^12 FLOP/s
    fp8_tflops: float  # dense FP8 tensor-core peak, 10^12 FLOP/s
    scale_up_bandwidth_gbps: float  # NVLink-class bandwidth per GPU and direction, 10^9 bytes/s
    scale_up_domain: int  # GPUs joined by the scale-up fabric (8 for an HGX node, 72 for NVL72)
    nics_per_gpu: float  # scale-out NICs per GPU
    nic_gbps: float  # line rate of one NIC, 10^9 bits/s
    source: str = ""  # where the numbers come from
    gpus_per_node: int = 8  # GPUs in one server (for tokens/s per node)
    efficiency: Efficiency | None = field(default=None, compare=False)  # None: derived from the H800's

    def __post_init__(self) -> None:
        for name in ("hbm_gb", "hbm_bandwidth_tbps", "bf16_tflops", "fp8_tflops",
                     "scale_up_bandwidth_gbps", "nic_gbps", "nics_per_gpu"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"hardware {self.name!r}: {name} must be a positive finite number, "
                                  f"got {value!r}{_yaml_hint(value)}")
        for name in ("scale_up_domain", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hardware {self.name!r}: {name} must be a positive integer, got {value!r}")

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def scale_out_bandwidth_gbps(self) -> float:
        """Scale-out (InfiniBand / Ethernet) bandwidth per GPU and direction in GB/s."""
        return self.nics_per_gpu * self.nic_gbps / 8

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak in FLOP/s for ``"bf16"`` or ``"fp8"``."""
        if dtype not in ("bf16", "fp8"):
            raise ConfigError(f"compute dtype must be 'bf16' or 'fp8', got {dtype!r}")
        return (self.bf16_tflops if dtype == "bf16" else self.fp8_tflops) * 1e12

    @property
    def achieved(self) -> Efficiency:
        """The achieved rates: the spec's own, or the H800's carried over by peak ratios."""
        return self.efficiency if self.efficiency is not None else derive_efficiency(self)


_HOPPER = dict(bf16_tflops=989.0, fp8_tflops=1979.0, scale_up_domain=8, nics_per_gpu=1, nic_gbps=400)
_BLACKWELL = dict(hbm_bandwidth_tbps=8.0, bf16_tflops=2250.0, fp8_tflops=4500.0,
                  scale_up_bandwidth_gbps=900.0, nics_per_gpu=1, nic_gbps=400)

PRESETS: dict[str, dict[str, Any]] = {
    "h800": dict(
        hbm_gb=80, hbm_bandwidth_tbps=3.35, scale_up_bandwidth_gbps=200.0, **_HOPPER,
        source="H800 SXM: as H100 SXM with NVLink cut to 400 GB/s (both directions); the paper's "
               "cluster has one 400 Gbps ConnectX-7 InfiniBand NIC per GPU",
    ),
    "h100": dict(
        hbm_gb=80, hbm_bandwidth_tbps=3.35, scale_up_bandwidth_gbps=450.0, **_HOPPER,
        source="NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 / 1979 TFLOP/s dense BF16 / FP8, "
               "NVLink 900 GB/s (both directions); DGX H100: 8 x 400 Gbps ConnectX-7",
    ),
    "h200": dict(
        hbm_gb=141, hbm_bandwidth_tbps=4.8, scale_up_bandwidth_gbps=450.0, **_HOPPER,
        source="NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, compute as H100, NVLink 900 GB/s "
               "(both directions)",
    ),
    "b200": dict(
        hbm_gb=180, scale_up_domain=8, **_BLACKWELL,
        source="NVIDIA HGX/DGX B200: 1,440 GB HBM3e for 8 GPUs (180 GB each), 8 TB/s, 2.25 / 4.5 PFLOP/s "
               "dense BF16 / FP8, NVLink 5 1.8 TB/s (both directions); 8 x 400 Gbps ConnectX-7",
    ),
    "gb200-nvl72": dict(
        hbm_gb=186, scale_up_domain=72, gpus_per_node=4, **{**_BLACKWELL, "bf16_tflops": 2500.0,
                                                             "fp8_tflops": 5000.0},
        source="NVIDIA GB200 NVL72: 13.4 TB HBM3e over 72 GPUs (186 GB each), 8 TB/s, 360 / 720 PFLOP/s "
               "sparse BF16 / FP8 per rack (halved for dense), NVLink 5 at 900 GB/s per direction as the "
               "paper uses; one 400 Gbps NIC per GPU assumed; 4 GPUs per compute tray",
    ),
}
_SMS = {"b200": 148, "gb200-nvl72": 148}  # Blackwell B200: 148 SMs; Hopper presets keep the H800's 132


def hardware_names() -> list[str]:
    return list(PRESETS)


def get_hardware(name: str) -> HardwareSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown hardware preset {name!r}; choose one of: {', '.join(PRESETS)}")
    spec = HardwareSpec(name=name, **PRESETS[name])
    return dataclasses.replace(spec, efficiency=derive_efficiency(spec))


def _h800_base() -> HardwareSpec:
    return HardwareSpec(name="h800", **PRESETS["h800"])


def derive_efficiency(spec: HardwareSpec, given: dict[str, tuple[float, str]] | None = None) -> Efficiency:
    """Achieved rates for ``spec``: ``given`` entries as they are, the rest from the H800's published
    figures scaled by the ratio of the peak each one follows (FP8, BF16, HBM, NIC or NVLink)."""
    base = _h800_base()
    ratios = {
        "fp8": spec.fp8_tflops / base.fp8_tflops, "bf16": spec.bf16_tflops / base.bf16_tflops,
        "hbm": spec.hbm_bandwidth_tbps / base.hbm_bandwidth_tbps,
        "scale_out": spec.scale_out_bandwidth_gbps / base.scale_out_bandwidth_gbps,
        "scale_up": spec.scale_up_bandwidth_gbps / base.scale_up_bandwidth_gbps,
    }
    values, sources = {}, {}
    given = dict(given or {})
    for floor in ("gemm_floor_us", "attention_decode_floor_us"):  # files written before these floors
        if floor not in given and "kernel_floor_us" in given:
            value, source = given["kernel_floor_us"]
            given[floor] = (value, f"not given: as kernel_floor_us ({source})")
    for name in EFFICIENCY_FIELDS:
        if name in given:
            values[name], sources[name] = given[name]
            continue
        value, source = H800_EFFICIENCY[name]
        kind = _SCALES_WITH.get(name)
        if name == "sms" and spec.name in _SMS:
            value, source = _SMS[spec.name], f"{spec.name}: {_SMS[spec.name]} SMs"
        elif kind and spec.name != "h800" and ratios[kind] != 1:
            value, source = value * ratios[kind], f"H800 figure x {ratios[kind]:.3g} ({kind} peak ratio; " \
                                                  f"not measured on {spec.name}): {source}"
        elif spec.name != "h800":
            source = f"H800 figure, taken as is for {spec.name}: {source}"
        values[name], sources[name] = value, source
    return Efficiency(**values, sources=sources)


def hardware_from_dict(d: Any, default_name: str = "custom") -> HardwareSpec:
    """Build a spec from a mapping with :class:`HardwareSpec`'s keys; unknown or missing keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"hardware {default_name!r} must be a mapping of field names to values")
    fields = {f.name for f in dataclasses.fields(HardwareSpec)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"hardware {default_name!r}: unknown key(s) {', '.join(unknown)}; "
                          f"expected {', '.join(sorted(fields))}")
    required = fields - {"name", "source", "gpus_per_node", "efficiency"}
    missing = sorted(required - set(d))
    if missing:
        raise ConfigError(f"hardware {default_name!r}: missing key(s) {', '.join(missing)}")
    name = str(d.get("name", default_name))
    kwargs = {**{k: v for k, v in d.items() if k != "efficiency"}, "name": name, "source": str(d.get("source", ""))}
    spec = HardwareSpec(**kwargs)
    return dataclasses.replace(spec, efficiency=derive_efficiency(spec, _efficiency_entries(d.get("efficiency"),
                                                                                            name)))


def _efficiency_entries(raw: Any, name: str) -> dict[str, tuple[float, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"hardware {name!r}: efficiency must be a mapping of rate names to values")
    unknown = sorted(set(raw) - set(EFFICIENCY_FIELDS))
    if unknown:
        raise ConfigError(f"hardware {name!r}: unknown efficiency key(s) {', '.join(unknown)}; "
                          f"expected {', '.join(EFFICIENCY_FIELDS)}")
    out = {}
    for key, entry in raw.items():
        value, source = entry, "given in the hardware file"
        if isinstance(entry, dict):
            if set(entry) - {"value", "source"} or "value" not in entry:
                raise ConfigError(f"hardware {name!r}: efficiency {key} must be a number or "
                                  "{value: ..., source: ...}")
            value, source = entry["value"], str(entry.get("source", source))
        out[key] = (value, source)
    return out


def hardware_to_dict(spec: HardwareSpec) -> dict[str, Any]:
    """The file form of ``spec`` (what :func:`load_hardware` reads back), efficiencies with sources."""
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(HardwareSpec) if f.name != "efficiency"}
    eff = spec.achieved
    d["efficiency"] = {k: {"value": getattr(eff, k), "source": eff.source(k)} for k in EFFICIENCY_FIELDS}
    return d


def hardware_text(spec: HardwareSpec, path: str | os.PathLike) -> str:
    """``spec`` as a JSON (``.json``) or YAML (any other extension) document for ``path``."""
    d = hardware_to_dict(spec)
    if os.fspath(path).endswith(".json"):
        return json.dumps(d, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(d, sort_keys=False, width=120)


def load_hardware(name_or_path: str | os.PathLike | HardwareSpec) -> HardwareSpec:
    """A preset name, or a path to a YAML / JSON file describing one GPU."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    s = os.fspath(name_or_path)
    if s in PRESETS:
        return get_hardware(s)
    if not os.path.isfile(s):
        raise ConfigError(
            f"{s!r} is neither a hardware preset ({', '.join(PRESETS)}) nor an existing YAML/JSON file"
        )
    try:
        with open(s, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{s} is not UTF-8 text (byte {e.start}): a hardware file is YAML or JSON") from None
    stem = os.path.splitext(os.path.basename(s))[0]
    return hardware_from_dict(_parse(text, s), default_name=stem)


def _parse(text: str, path: str) -> Any:
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    import yaml  # JSON is YAML too, so any other extension goes through the YAML parser

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
