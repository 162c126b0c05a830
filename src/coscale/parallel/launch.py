"""Starting N processes with torch.distributed's environment, for tests and single-host runs.

:func:`spawn` starts ``world_size`` processes (multiprocessing "spawn"), each with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT a free port), runs
``fn(rank, *args)`` in each, and returns the per-rank results. It never waits longer than
``timeout_s``: processes still running then are terminated and reported. Under torchrun, call
``coscale.parallel.init_parallel`` (or ``setup_for_training``) directly instead.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp

from coscale.errors import CoscaleError


@dataclass
class RankOutcome:
    rank: int
    ok: bool
    result: Any = None
    error: str | None = None  # "ExceptionType: message" of an exception raised by fn
    exitcode: int | None = None
    seconds: float = 0.0  # from start until the result (or the exit) was seen


class LaunchError(CoscaleError, RuntimeError):
    """A spawned rank failed or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results: Any,
           threads: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        results.put((rank, True, fn(rank, *args), None))
    except BaseException as e:  # reported to the parent, which decides
        results.put((rank, False, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 60.0,
          raise_on_error: bool = True, threads_per_rank: int = 1) -> list[RankOutcome]:
    """Run ``fn(rank, *args)`` on ``world_size`` fresh processes; ``fn`` must be importable (top level)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    start = time.monotonic()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results, threads_per_rank),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = start + timeout_s
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, result, error = results.get(timeout=0.2)
            outcomes[rank] = RankOutcome(rank, ok, result, error, seconds=time.monotonic() - start)
        except queue.Empty:
            for r, p in enumerate(procs):  # a rank that died without reporting
                if r not in outcomes and p.exitcode is not None and results.empty():
                    outcomes[r] = RankOutcome(r, False, error=f"exited with code {p.exitcode} without a result",
                                              exitcode=p.exitcode, seconds=time.monotonic() - start)
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
        if p.is_alive():
            p.terminate()
            p.join(5)
            if r not in outcomes:
                outcomes[r] = RankOutcome(r, False, error=f"did not finish within {timeout_s:g} s",
                                          seconds=time.monotonic() - start)
        outcomes.setdefault(r, RankOutcome(r, False, error="no result", seconds=time.monotonic() - start))
        outcomes[r].exitcode = p.exitcode
    ordered = [outcomes[r] for r in range(world_size)]
    if raise_on_error and not all(o.ok for o in ordered):
        failed = "\n".join(f"rank {o.rank}: {o.error}" for o in ordered if not o.ok)
        raise LaunchError(f"{sum(not o.ok for o in ordered)} of {world_size} ranks failed:\n{failed}")
    return ordered
