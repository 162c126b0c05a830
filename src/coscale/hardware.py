"""Accelerator descriptions for the co-design analysis: presets and user YAML/JSON files.

Units are in the field names. Decimal prefixes throughout (GB = 10^9 bytes, TB/s = 10^12 bytes/s),
as datasheets and the paper use them. FLOP/s are dense (no 2:4 sparsity). Bandwidths are per GPU and
per direction: NVIDIA quotes NVLink bandwidth as the sum of both directions ("900 GB/s" for H100), so
the presets store half of it; the paper's "900 GB/s unidirectional" for GB200 NVL72 is the NVLink-5
figure of 1.8 TB/s halved. Scale-out bandwidth is ``nics_per_gpu x nic_gbps / 8`` (400 Gbps -> 50 GB/s,
the paper's InfiniBand figure).

A user file holds the same keys as :class:`HardwareSpec` (``name`` optional)::

    name: my-gpu
    hbm_gb: 96
    hbm_bandwidth_tbps: 4.0
    bf16_tflops: 1000
    fp8_tflops: 2000
    scale_up_bandwidth_gbps: 450      # GB/s per direction
    scale_up_domain: 8                # GPUs joined by the scale-up fabric
    nics_per_gpu: 1
    nic_gbps: 400                     # Gbit/s per NIC

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from coscale.errors import ConfigError


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

    def __post_init__(self) -> None:
        for name in ("hbm_gb", "hbm_bandwidth_tbps", "bf16_tflops", "fp8_tflops",
                     "scale_up_bandwidth_gbps", "nic_gbps", "nics_per_gpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"hardware {self.name!r}: {name} must be a positive number, got {value!r}")
        if isinstance(self.scale_up_domain, bool) or not isinstance(self.scale_up_domain, int) \
                or self.scale_up_domain < 1:
            raise ConfigError(
                f"hardware {self.name!r}: scale_up_domain must be a positive integer, "
                f"got {self.scale_up_domain!r}"
            )

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
        hbm_gb=186, scale_up_domain=72, **{**_BLACKWELL, "bf16_tflops": 2500.0, "fp8_tflops": 5000.0},
        source="NVIDIA GB200 NVL72: 13.4 TB HBM3e over 72 GPUs (186 GB each), 8 TB/s, 360 / 720 PFLOP/s "
               "sparse BF16 / FP8 per rack (halved for dense), NVLink 5 at 900 GB/s per direction as the "
               "paper uses; one 400 Gbps NIC per GPU assumed",
    ),
}


def hardware_names() -> list[str]:
    return list(PRESETS)


def get_hardware(name: str) -> HardwareSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown hardware preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return HardwareSpec(name=name, **PRESETS[name])


def hardware_from_dict(d: Any, default_name: str = "custom") -> HardwareSpec:
    """Build a spec from a mapping with :class:`HardwareSpec`'s keys; unknown or missing keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"hardware {default_name!r} must be a mapping of field names to values")
    fields = {f.name for f in dataclasses.fields(HardwareSpec)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"hardware {default_name!r}: unknown key(s) {', '.join(unknown)}; "
                          f"expected {', '.join(sorted(fields))}")
    required = fields - {"name", "source"}
    missing = sorted(required - set(d))
    if missing:
        raise ConfigError(f"hardware {default_name!r}: missing key(s) {', '.join(missing)}")
    kwargs = {**d, "name": str(d.get("name", default_name)), "source": str(d.get("source", ""))}
    return HardwareSpec(**kwargs)


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
    with open(s, encoding="utf-8") as f:
        text = f.read()
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
