"""Peak memory of a run: what the header, the metrics, the summary and the footer report.

On CUDA, the caching allocator's peaks for the run's device (``torch.cuda.max_memory_allocated``: bytes
held by tensors; ``max_memory_reserved``: bytes the allocator took from the driver, what other
processes cannot use). Both are host-side counters: reading them waits for nothing on the device, and
they already count a step's tensors once its kernels are queued (allocation happens at launch).
On the CPU, the process's peak resident set size (``resource.getrusage``: every byte the process ever
held, tensors or not; kilobytes on Linux, bytes on macOS). With several processes each rank measures
its own; the run reports rank 0's.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


def peak_memory(device: torch.device | str) -> dict[str, float]:
    """{"peak_memory_allocated_gib", "peak_memory_reserved_gib"} on CUDA, {"peak_rss_gib"} elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    return {"peak_rss_gib": peak_rss_bytes() / GIB}


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def describe(peak: dict[str, float]) -> str:
    """One phrase for the header and the footer."""
    if "peak_rss_gib" in peak:
        return f"peak RSS {peak['peak_rss_gib']:.2f} GiB (the whole process)"
    return (f"peak {peak['peak_memory_allocated_gib']:.2f} GiB allocated, "
            f"{peak['peak_memory_reserved_gib']:.2f} GiB reserved")
