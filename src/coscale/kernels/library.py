"""coscale's kernels as torch operators (``torch.library``, namespace ``coscale``).

Every kernel that a model calls is reached through an operator, so that ``torch.compile`` traces a
model without a graph break and without reading Triton source, and a CUDA graph captures the launches.
Two kinds, chosen per operator by what its launcher does:

- **transparent** (:func:`torch.library.triton_op`): the launcher allocates its outputs from shapes and
  launches plain ``@triton.jit`` / ``@triton.autotune`` kernels through :func:`launcher` (that is,
  ``torch.library.wrap_triton``). Under torch.compile the operator decomposes into the kernel calls,
  which Inductor schedules itself; the launcher doubles as the fake (shape) kernel. The quantization,
  SwiGLU and permutation kernels are of this kind.
- **opaque** (:func:`torch.library.custom_op` with an explicit fake kernel): launchers that read
  ``data_ptr()`` (TMA descriptors, the 16-byte checks of the TMA store), time configurations on
  first use (``ConfigPicker``), probe cuBLAS, or loop over experts on the host (the CPU references of
  the grouped GEMMs). torch.compile calls them as they are; their fake kernel only says the output's
  shape, dtype and strides. The GEMMs are of this kind.

Every operator takes the caller's ``backend`` string and decides inside (coscale.kernels.backend): on
CPU tensors the PyTorch reference (or Triton's interpreter for an explicit ``"triton"`` under
``TRITON_INTERPRET=1``), on CUDA the kernels. One Python implementation serves every device; under
fake tensors on the CPU (``torch.library.opcheck``, torch.compile on the CPU) the reference runs,
which gives the shapes and strides the kernels give. Differentiable operators carry their backward
through ``register_autograd``; tests/test_custom_ops.py runs ``torch.library.opcheck`` on each.

Registering a transparent operator imports Triton (torch inspects the launcher for its kernels), and
Triton decides between its compiler and its CPU interpreter when triton.language is first imported:
set ``TRITON_INTERPRET=1`` before importing coscale's kernels, not after.

``COSCALE_OPAQUE_OPS=1`` (read at import) registers the transparent operators as opaque ones too:
the escape hatch for a torch whose Inductor cannot analyse a user-defined Triton kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from coscale.kernels.backend import interpreting, select_backend

__all__ = ["NAMESPACE", "OPAQUE_ONLY", "is_fake", "launcher", "operator", "runs_triton"]

NAMESPACE = "coscale"
OPAQUE_ONLY = os.environ.get("COSCALE_OPAQUE_OPS", "0").lower() in ("1", "true", "on", "yes")


def is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (or a functional wrapper of one): shapes without data."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t) or t.device.type == "meta"


def runs_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    """Whether an operator runs its Triton kernels on ``x`` for ``backend`` (else the PyTorch
    reference). Fake CPU tensors (opcheck, torch.compile on the CPU) take the reference: the
    interpreter cannot run them, and the reference gives the shapes and strides the kernels give."""
    if select_backend(backend, x, op=op) != "triton":
        return False
    return x.is_cuda or not is_fake(x)


def launcher(kernel):
    """``kernel`` as a transparent operator launches it: through ``torch.library.wrap_triton`` (a plain
    launch in eager mode, a traceable call under torch.compile), or the interpreted kernel itself under
    ``TRITON_INTERPRET=1`` (older torch refuses to wrap an interpreted kernel)."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


def operator(name: str, *, opaque: bool = False, fake: Callable | None = None, schema: str | None = None):
    """Register the decorated function as the operator ``coscale::<name>`` (see the module docstring).

    Transparent (default): ``torch.library.triton_op``; the function is also its fake kernel. Opaque:
    ``torch.library.custom_op`` with ``fake`` as the fake kernel (the function itself if None, for
    functions whose kernels only run on real tensors). Outputs are fresh tensors (no operator mutates
    or returns its inputs). Returns the ``CustomOpDef`` (call it like the function; ``register_autograd``
    on it)."""
    qualname = f"{NAMESPACE}::{name}"

    def register(fn: Callable) -> torch.library.CustomOpDef:
        if opaque or OPAQUE_ONLY:
            op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)
            op.register_fake(fake or fn)
            return op
        return torch.library.triton_op(qualname, fn, mutates_args=())

    return register
