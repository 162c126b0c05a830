"""PNG charts for the report. matplotlib is imported inside each function (Agg backend), so the rest
of the analysis package stays fast to import."""

from __future__ import annotations

import io
import os

from coscale.analysis.ep_limit import tpot_sweep
from coscale.analysis.kv_cache import kv_cache_bytes_per_token
from coscale.analysis.models import Model, as_view
from coscale.analysis.network import TOPOLOGIES, CostModel, build
from coscale.analysis.output import write_file
from coscale.errors import ConfigError

SWEEP_BANDWIDTHS_GBPS = [12.5, 25, 50, 100, 200, 400, 900, 1800, 3600]
SWEEP_RADICES = [16, 24, 32, 48, 64, 96, 128]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("charts need matplotlib, which is not installed: pip install matplotlib "
                          "(or leave the chart out: report --no-charts, inference-limit without --plot)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail early, in one line, when matplotlib is missing (before any file is written)."""
    _pyplot()


def kv_cache_chart(models: list[Model], path: str | os.PathLike, dtype_bytes: float = 2) -> str:
    """Bar chart of KV-cache KB (1000 bytes) per token."""
    plt = _pyplot()
    views = [as_view(m) for m in models]
    values = [kv_cache_bytes_per_token(v, dtype_bytes) / 1000 for v in views]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar([f"{v.name}\n({v.attention})" for v in views], values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("KV cache per token [KB]")
    ax.set_title(f"KV cache per token ({dtype_bytes:g} bytes per number)")
    return _save(fig, plt, path)


def tpot_chart(path: str | os.PathLike, bandwidths_gbps: list[float] | None = None, **kwargs) -> str:
    """TPOT of the EP communication bound (and the compute / memory bounds) against link bandwidth."""
    plt = _pyplot()
    bandwidths = bandwidths_gbps or SWEEP_BANDWIDTHS_GBPS
    results = tpot_sweep(bandwidths, **kwargs)
    hw = results[0].hardware
    fig, ax = plt.subplots(figsize=(6, 4.3))
    ax.plot(bandwidths, [r.tpot_s * 1e3 for r in results], "o-", label="EP communication (any GPU)")
    ax.plot(bandwidths, [r.compute_tpot_s * 1e3 for r in results], "--", label=f"compute bound ({hw})")
    ax.plot(bandwidths, [r.memory_tpot_s * 1e3 for r in results], ":", label=f"HBM bound ({hw})")
    for bw, label in ((50, "400G IB link"), (900, "NVL72 link")):  # link speeds only, not those GPUs' bounds
        ax.axvline(bw, color="grey", lw=0.8)
        ax.text(bw, ax.get_ylim()[1] * 0.6, f" {label}", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("EP link bandwidth per GPU [GB/s]")
    ax.set_ylabel("TPOT [ms]")
    ax.set_title(f"Decoding time per output token, {results[0].model}\n"
                 f"compute/HBM lines: {hw} at every bandwidth; grey lines mark link speeds only", fontsize=9)
    ax.legend()
    return _save(fig, plt, path)


def cost_chart(path: str | os.PathLike, radices: list[int] | None = None, prices: CostModel | None = None,
               planes: int = 8) -> str:
    """Cost per endpoint against the number of endpoints, one line per topology over switch radices."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for topology in TOPOLOGIES:
        if topology == "MRFT":  # same counts as FT2
            continue
        nets = [build(topology, k, planes) for k in radices or SWEEP_RADICES]
        ax.plot([n.endpoints for n in nets], [n.cost_per_endpoint(prices) / 1e3 for n in nets], "o-",
                label=topology)
    ax.set_xscale("log")
    ax.set_xlabel("endpoints (switch radix 16 ... 128)")
    ax.set_ylabel("cost per endpoint [k$]")
    ax.set_title("Network cost per endpoint against cluster size")
    ax.legend()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> str:
    """Render to memory, then write the PNG whole (a one-line error names an unwritable path)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_file(path, buffer.getvalue())
