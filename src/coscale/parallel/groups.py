"""Process groups for expert parallelism (EP) x data parallelism (DP), built from torchrun's environment.

Rank layout: ``rank = dp_rank * ep_size + ep_rank``. The EP ranks of one replica are consecutive, so
with ``ep_size <= gpus_per_node`` an EP group stays inside one node (NVLink only) and with a larger
``ep_size`` it spans ``ep_size / gpus_per_node`` whole nodes. Expert weights are sharded over the EP
group and replicated over the DP group (the ranks with the same ``ep_rank``); every other parameter is
replicated over the whole world.

Nodes come from the real host names (all-gathered once) or from ``gpus_per_node``: ranks
``[n*g, (n+1)*g)`` form virtual node n, so two-hop routing can be exercised on one host, even on CPU.

Inside an EP group spanning several nodes, two sub-groups per rank serve the two-hop path of
node-limited routing: ``cross_node_group`` (the EP ranks with this rank's local index on every node:
inter-node traffic, InfiniBand) and ``intra_node_group`` (the EP ranks of this rank's node: NVLink).

Every process group gets a timeout (``timeout_s``) so that a dead peer turns into an error on the
survivors instead of a hang; communication errors are re-raised as :class:`CommunicationError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from coscale.errors import ConfigError, CoscaleError

DEFAULT_TIMEOUT_S = 120.0
T = TypeVar("T")


class CommunicationError(CoscaleError, RuntimeError):
    """A collective failed: a peer died, timed out or disagrees on the protocol."""


def guarded(what: str, fn: Callable[[], T], timeout_s: float | None = None) -> T:
    """Run one collective; turn the backend's error into a one-line :class:`CommunicationError`."""
    try:
        return fn()
    except CoscaleError:
        raise
    except (RuntimeError, dist.DistBackendError) as e:  # gloo/NCCL errors, timeouts, closed sockets
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        limit = f" (timeout {timeout_s:g} s)" if timeout_s else ""
        raise CommunicationError(
            f"rank {rank}: collective '{what}' failed{limit}: {first} (a peer rank that exited, hung "
            "or disagrees on the protocol shows up here)"
        ) from e


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks split into EP x DP, and into (possibly virtual) nodes."""

    world_size: int
    ep_size: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        for name in ("world_size", "ep_size", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size % self.ep_size:
            raise ConfigError(
                f"expert-parallel size {self.ep_size} must divide the world size {self.world_size}"
            )
        if self.world_size % self.gpus_per_node:
            raise ConfigError(
                f"gpus_per_node {self.gpus_per_node} must divide the world size {self.world_size}"
            )
        g = self.gpus_per_node
        if self.ep_size > g and self.ep_size % g:
            raise ConfigError(
                f"an EP group larger than a node must cover whole nodes: ep_size {self.ep_size} is not "
                f"a multiple of gpus_per_node {g}"
            )
        if self.ep_size < g and g % self.ep_size:
            raise ConfigError(f"ep_size {self.ep_size} must divide gpus_per_node {g}")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_ranks_per_node(self) -> int:
        """EP ranks of one EP group that share a node (G in docs/parallel.md)."""
        return min(self.ep_size, self.gpus_per_node)

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans."""
        return self.ep_size // self.ep_ranks_per_node

    def ep_group_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.ep_size + i for i in range(self.ep_size)]

    def dp_group_ranks(self, ep_rank: int) -> list[int]:
        return [d * self.ep_size + ep_rank for d in range(self.dp_size)]

    def check_divides_experts(self, n_experts: int) -> None:
        if n_experts % self.ep_size:
            raise ConfigError(
                f"expert-parallel size {self.ep_size} does not divide the {n_experts} routed experts; "
                "choose an EP size that divides n_routed_experts"
            )


@dataclass
class ParallelContext:
    """Everything the EP/DP code needs about this process; built by :func:`init_parallel`."""

    dims: ParallelDims
    rank: int
    node_of_rank: tuple[int, ...]
    device: torch.device
    world_group: Any
    ep_group: Any
    dp_group: Any
    intra_node_group: Any  # EP ranks of this node (the second hop)
    cross_node_group: Any  # EP ranks with this local index, one per node (the first hop)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def ep_size(self) -> int:
        return self.dims.ep_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.dims.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.ep_size

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    def all_reduce_mean(self, value: torch.Tensor | float, group: Any = None) -> torch.Tensor:
        """Mean over the world (or ``group``) of a scalar or tensor, e.g. the loss for logging."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        guarded("all_reduce(mean)", lambda: dist.all_reduce(t, group=group or self.world_group),
                self.timeout_s)
        return t / dist.get_world_size(group or self.world_group)

    def all_reduce_sum_(self, tensors: list[torch.Tensor], group: Any = None) -> None:
        """In-place sum over the world (or ``group``), e.g. the router loads before a bias update."""
        for t in tensors:
            guarded("all_reduce(sum)", lambda t=t: dist.all_reduce(t, group=group or self.world_group),
                    self.timeout_s)


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(
                f"environment variable {name} is not set: launch with torchrun (or coscale.parallel.launch)"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def node_map_from_hosts(hosts: list[str]) -> tuple[int, ...]:
    """Rank -> node index from each rank's host name; nodes must hold consecutive, equal rank blocks."""
    order: dict[str, int] = {}
    nodes = tuple(order.setdefault(h, len(order)) for h in hosts)
    per_node = len(hosts) // len(order)
    expected = tuple(r // per_node for r in range(len(hosts)))
    if len(hosts) % len(order) or nodes != expected:
        raise ConfigError(
            f"ranks are not laid out in equal consecutive blocks per host ({hosts}); "
            "launch torchrun with the same --nproc-per-node on every node"
        )
    return nodes


def init_process_group_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """The default process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a no-op when it exists. Returns this rank's device: ``cuda:LOCAL_RANK`` for NCCL
    (made current), else the CPU. ``backend`` None: NCCL with CUDA, else gloo. A rendezvous that does
    not complete within ``timeout_s`` is a :class:`CommunicationError`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a lone process (no torchrun): any free local port
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        timeout = datetime.timedelta(seconds=timeout_s)
        guarded("init_process_group",
                lambda: dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout),
                timeout_s)
    return device


def init_parallel(
    ep_size: int,
    gpus_per_node: int | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelContext:
    """Initialise torch.distributed from torchrun's environment and build the world/EP/DP groups.

    ``gpus_per_node`` None: nodes are the real hosts. ``backend`` None: NCCL with CUDA, else gloo.
    """
    device = init_process_group_from_env(backend, timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    if gpus_per_node is None:
        hosts: list[Any] = [None] * world_size
        guarded("all_gather_object(hostname)",
                lambda: dist.all_gather_object(hosts, socket.gethostname()), timeout_s)
        node_of_rank = node_map_from_hosts(hosts)
        gpus_per_node = world_size // (max(node_of_rank) + 1)
    else:
        node_of_rank = tuple(r // gpus_per_node for r in range(world_size))
    dims = ParallelDims(world_size, ep_size, gpus_per_node)
    groups = _build_groups(dims, rank, timeout)
    return ParallelContext(dims, rank, node_of_rank, device, dist.group.WORLD, *groups, timeout_s=timeout_s)


def _build_groups(dims: ParallelDims, rank: int, timeout: datetime.timedelta) -> tuple[Any, ...]:
    """Every rank creates every group in the same order (new_group is collective); keeps its own."""
    ep_rank, dp_rank = rank % dims.ep_size, rank // dims.ep_size
    g = dims.ep_ranks_per_node

    def make(ranks: list[int]) -> Any:
        return dist.new_group(sorted(ranks), timeout=timeout)

    ep = [make(dims.ep_group_ranks(d)) for d in range(dims.dp_size)][dp_rank]
    dp = [make(dims.dp_group_ranks(e)) for e in range(dims.ep_size)][ep_rank]
    intra = cross = None
    for d in range(dims.dp_size):
        base = d * dims.ep_size
        for n in range(dims.ep_nodes):
            group = make([base + n * g + i for i in range(g)])
            if d == dp_rank and n == ep_rank // g:
                intra = group
        for i in range(g):
            group = make([base + n * g + i for n in range(dims.ep_nodes)])
            if d == dp_rank and i == ep_rank % g:
                cross = group
    return ep, dp, intra, cross


def config_fingerprint(config: Any) -> str:
    """A short hash of a config (dataclass with ``to_dict``, dict, or anything JSON-serialisable)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config: Any, group: Any = None, what: str = "model config",
                      timeout_s: float | None = None) -> str:
    """All-gather the config hash; raise ConfigError naming the ranks that disagree with rank 0."""
    mine = config_fingerprint(config)
    hashes: list[Any] = [None] * dist.get_world_size(group)
    guarded(f"all_gather_object({what} hash)", lambda: dist.all_gather_object(hashes, mine, group=group),
            timeout_s)
    differ = [i for i, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise ConfigError(
            f"the {what} differs across ranks: ranks {differ} disagree with rank 0 "
            f"(hashes {sorted(set(hashes))}); start every rank with the same configuration"
        )
    return mine
