"""What coscale's Gluon kernels take from Triton's Gluon for Hopper, under one set of names from Triton 3.6 (the
device's) to 3.9 (which renamed the TMA copies), and whether the installed Triton has it."""

from __future__ import annotations

import functools
from types import SimpleNamespace


@functools.cache
def hopper_api() -> SimpleNamespace:
    """gluon, gl and the Hopper names (mbarrier, tma, tma_load, tma_store, warpgroup_mma, warpgroup_mma_wait,
    fence_async_shared, thread_barrier); ImportError or AttributeError where this Triton lacks them."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper

    tma = hopper.tma
    return SimpleNamespace(
        gluon=gluon, gl=gl, mbarrier=hopper.mbarrier, tma=tma, fence_async_shared=hopper.fence_async_shared,
        thread_barrier=getattr(gl, "thread_barrier", None) or gl.barrier,  # (renamed in Triton 3.9)
        warpgroup_mma=hopper.warpgroup_mma, warpgroup_mma_wait=hopper.warpgroup_mma_wait,
        tma_load=getattr(tma, "async_load", None) or tma.async_copy_global_to_shared,
        tma_store=getattr(tma, "async_store", None) or tma.async_copy_shared_to_global,
    )


def builds(build) -> bool:
    """Whether ``build`` (a module's cached kernel factory) succeeds: this Triton has the Gluon API it uses."""
    try:
        build()
    except (ImportError, AttributeError):
        return False
    return True
