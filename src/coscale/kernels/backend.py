"""Which implementation runs a kernel: the one place that decides "Triton, a vendor library, or PyTorch?".

Every kernel wrapper takes a ``backend`` string and calls :func:`select_backend` with the tensors it is
about to touch. The rules, the same for every kernel:

- ``"auto"``: on CUDA tensors, a vendor library when the kernel says it applies to these operands
  (``preferred``: cuBLAS for the block-scaled FP8 GEMM, ``torch._grouped_mm`` for the BF16 grouped
  GEMM), else Triton when it imports, else the PyTorch reference; on any other device the reference.
- ``"triton"``: Triton, which must import; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, what the CPU tests use).
- any other name in ``allowed`` (the reference, or a vendor library the caller checks itself) as
  given.
A name outside ``allowed`` and an impossible Triton request are a CoscaleError saying what to pass
instead; nothing falls back silently from an explicit request.

The kernels run as torch operators (coscale.kernels.library), which select inside, on the device of
their inputs. The Python wrappers call :func:`check_backend` first, so that a bad request fails with
the wrapper's name before any operator runs.

``interpreting()`` reads ``TRITON_INTERPRET`` on every call (as Triton does when it decorates a
kernel), so tests can set it before the first launch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from coscale.errors import CoscaleError

__all__ = ["TRITON_OR_TORCH", "check_backend", "interpreting", "select_backend", "to_autocast_dtype",
           "triton_available"]

TRITON_OR_TORCH = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (looked up once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def select_backend(
    requested: str,
    *tensors: torch.Tensor,
    allowed: tuple[str, ...] = TRITON_OR_TORCH,
    reference: str = "torch",
    preferred: Callable[[], str | None] | None = None,
    op: str = "this kernel",
) -> str:
    """The backend that runs ``op`` on ``tensors`` (the first one's device decides), as a name in
    ``allowed``. ``reference``: the name of the PyTorch reference (the CPU path); ``preferred``: called
    only for ``"auto"`` on CUDA, returns a vendor backend that takes these operands, or None."""
    if requested not in allowed:
        raise CoscaleError(f"{op}: backend must be one of {', '.join(map(repr, allowed))}; got {requested!r}")
    on_cuda = bool(tensors) and tensors[0].is_cuda
    if requested == "auto":
        if not on_cuda:
            return reference
        vendor = preferred() if preferred is not None else None
        if vendor is not None:
            return vendor
        return "triton" if triton_available() else reference
    if requested == "triton":
        if not triton_available():
            raise CoscaleError(f"{op}: backend 'triton' needs the triton package (pip install triton)")
        if not on_cuda and not interpreting():
            raise CoscaleError(
                f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1; use backend 'auto' or "
                f"{reference!r}"
            )
    return requested


def check_backend(
    requested: str,
    *tensors: torch.Tensor,
    op: str,
    allowed: tuple[str, ...] = TRITON_OR_TORCH,
    reference: str = "torch",
) -> None:
    """Raise :func:`select_backend`'s CoscaleError now for a request that cannot run on ``tensors``
    (a wrapper calls it before its operator). Under torch.compile tracing only the name is checked: the
    operator selects again when it runs."""
    if requested not in allowed:
        raise CoscaleError(f"{op}: backend must be one of {', '.join(map(repr, allowed))}; got {requested!r}")
    if not torch.compiler.is_compiling():
        select_backend(requested, *tensors, allowed=allowed, reference=reference, op=op)


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype where autocast is on for its device, as nn.Linear casts its input.
    Autocast does not reach coscale's own GEMMs (custom operators and autograd functions), and a
    model's FP32 residual stream would otherwise reach them in FP32: an FP32 output, an FP32 gradient,
    and a conversion copy after each GEMM, whose kernels write BF16."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


def autocast_off(method):
    """An autograd Function's forward or backward run with autocast off (its first argument after ctx names
    the device). An FP8 layer sets every dtype itself (FP8 operands, FP32 accumulation, outputs in the
    input's dtype); autocast, on in a BF16 forward and in a backward called inside it, would run the PyTorch
    reference's float32 products in BF16 (other bits than the same call without autocast) and, on the CPU,
    promote torch.cat's float8 inputs, which it cannot ("Unexpected floating ScalarType")."""

    @functools.wraps(method)
    def run(ctx, tensor, *args):
        with torch.autocast(tensor.device.type, enabled=False):
            return method(ctx, tensor, *args)

    return run
