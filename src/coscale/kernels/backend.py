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

``interpreting()`` reads ``TRITON_INTERPRET`` on every call (as Triton does when it decorates a
kernel), so tests can set it before the first launch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from coscale.errors import CoscaleError

__all__ = ["TRITON_OR_TORCH", "interpreting", "select_backend", "triton_available"]

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
