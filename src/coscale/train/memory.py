"""Peak memory of a run: what the header, the metrics, the summary and the footer report.

On CUDA, the caching allocator's peaks for the run's device (``torch.cuda.max_memory_allocated``: bytes
held by tensors; ``max_memory_reserved``: bytes the allocator took from the driver, what other
processes cannot use). Both are host-side counters: reading them waits for nothing on the device, and
they already count a step's tensors once its kernels are queued (allocation happens at launch).
On the CPU, the process's peak resident set size (``resource.getrusage``: every byte the process ever
held, tensors or not; kilobytes on Linux, bytes on macOS). With several processes each rank measures
its own; the run reports rank 0's.

What a run must fit (``run_state_bytes``): after the model is built, the first step adds a gradient for every
trainable parameter (in the parameter's dtype: the FP32 master weights get FP32 gradients) and AdamW's two
moments (FP32 or BF16, ``--adam-moments-dtype``); activations come on top and depend on the batch. The header
says both, a run whose weights, gradients and moments alone exceed the GPU stops before its first step, and an
out-of-memory error during the steps becomes one message that says what to change (``out_of_memory_error``),
not a traceback.
"""

from __future__ import annotations

import resource
import sys

import torch

from coscale.errors import CoscaleError
from coscale.train.optim import MOMENT_DTYPES

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


def run_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    moments_dtype: str) -> tuple[int, int, int]:
    """(weight bytes, gradient bytes, AdamW moment bytes) of this rank: the model's parameters and buffers as built,
    then what the first step allocates: one gradient per trainable parameter in its own dtype, two moments per
    parameter element in ``moments_dtype``."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in params)
    return weights, grads, 2 * MOMENT_DTYPES[moments_dtype].itemsize * sum(p.numel() for p in params)


def device_total_bytes(device: torch.device | str) -> int | None:
    """The GPU's memory in bytes (None on the CPU)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def state_note(weights: int, grads: int, moments: int, total: int | None) -> str:
    """The header's phrase on what the run holds before activations."""
    where = f", of this GPU's {total / GIB:.1f} GiB" if total else ""
    return (f"weights {weights / GIB:.2f} GiB, gradients {grads / GIB:.2f} and AdamW's moments {moments / GIB:.2f} "
            f"(from the first step): {(weights + grads + moments) / GIB:.2f} GiB before activations{where}")


def _ways_to_fit(moments_dtype: str, moments: int, activations: bool) -> str:
    ways = []
    if activations:
        ways.append("a smaller --batch-size or --seq-len")
    if moments_dtype == "fp32":
        ways.append(f"--adam-moments-dtype bf16 (saves {moments / 2 / GIB:.2f} GiB)")
    ways.append("a smaller model, or its experts spread over more GPUs (torchrun ... --ep-size N)")
    ways.append("a GPU with more memory")
    return "; ".join(ways)


def check_state_fits(weights: int, grads: int, moments: int, total: int | None, moments_dtype: str) -> None:
    """Refuse, before any step runs, a run whose weights, gradients and moments alone exceed the GPU."""
    if total is None or weights + grads + moments <= total:
        return
    raise CoscaleError(f"the model's weights ({weights / GIB:.2f} GiB), their gradients ({grads / GIB:.2f} "
                       f"GiB) and AdamW's moments ({moments / GIB:.2f} GiB) need "
                       f"{(weights + grads + moments) / GIB:.2f} GiB before any activation, more than this GPU's "
                       f"{total / GIB:.1f} GiB. To fit: {_ways_to_fit(moments_dtype, moments, False)}")


def oom_detail(exc: BaseException) -> str:
    """The first two sentences of torch's out-of-memory message: "CUDA out of memory. Tried to allocate 896.00 MiB"
    (the rest, the allocator's state, is for debugging)."""
    return ". ".join(str(exc).strip().split(". ")[:2]).rstrip(".")


def out_of_memory_error(exc: BaseException, step: int, device: torch.device | str, moments_dtype: str,
                        moments: int) -> CoscaleError:
    """torch's out-of-memory error during step ``step`` as one message: what ran out, the peak, what to change."""
    device = torch.device(device)
    peak = ""
    if device.type == "cuda":
        total = device_total_bytes(device)
        peak = (f"; peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB allocated of this GPU's "
                f"{total / GIB:.1f} GiB")
    return CoscaleError(f"out of memory at step {step} ({oom_detail(exc)}{peak}). To fit: "
                        f"{_ways_to_fit(moments_dtype, moments, True)}")
