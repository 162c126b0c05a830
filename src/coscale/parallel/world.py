"""The world a training loop runs in: one process, or EP x DP ranks under torchrun.

A trainer holds one :class:`World` and calls the same methods whatever it is, so that its setup,
step, evaluation and checkpointing read the same in one process and in many:

==========================  ===============================  =============================================
method                      :class:`SingleProcess`           :class:`Distributed` (coscale.parallel)
==========================  ===============================  =============================================
``agree(fn)``               ``fn()``                         ``fn()`` on every rank; a failure anywhere
                                                             ends every rank with a one-line error
``broadcast(obj)``          ``obj``                          rank 0's ``obj``
``place_model(model)``      ``model.to(device)``             EP swap (this rank's experts), to device,
                                                             replicas made identical
``shard(batch)``            the batch                        this rank's ``1 / world_size`` rows
``sync_gradients(model)``   nothing                          all-reduce (:func:`sync_gradients`)
``grad_norm(model)``        ``torch.nn.utils``'s             the whole model's norm over EP
``sum_router_loads``        nothing                          router loads summed over the world
``mean(t)``                 ``t``                            the world mean
``model_state`` /           ``state_dict()``                 experts and their moments gathered (the
``optimizer_state``                                          single-process format)
==========================  ===============================  =============================================

Collective methods must be called by every rank in the same order. The methods a training step calls
(``shard`` to ``mean``) do not synchronise the host with the device (under NCCL the all-reduces are
queued on the device's stream); ``agree``, ``broadcast`` and ``check_same`` exchange Python objects
and do. Every method
but :meth:`World.agree`, :meth:`World.broadcast` and :meth:`World.check_same` needs the model placed
first: the EP and DP groups are built by :meth:`World.place_model`, so that a bad layout is reported by
the trainer's own checks (which run under :meth:`World.agree`) before the groups exist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from coscale.errors import CheckpointError, ConfigError, CoscaleError
from coscale.parallel.expert_parallel import gathered_experts
from coscale.parallel.groups import ParallelContext, check_same_config, guarded, init_process_group_from_env
from coscale.parallel.training import (
    all_reduce_router_loads,
    full_optimizer_state_dict,
    grad_norm,
    load_optimizer_state_dict,
    setup_for_training,
    shard_batch,
    sync_gradients,
)

T = TypeVar("T")


class World(ABC):
    """What a trainer needs to know about the processes it runs with (see the module docstring)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    @abstractmethod
    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()``; with several ranks, a failure on any of them is raised on all."""

    @abstractmethod
    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""

    @abstractmethod
    def check_same(self, config: Any, what: str) -> None:
        """Every rank was given the same ``config`` (a ConfigError naming ``what`` otherwise)."""

    @abstractmethod
    def place_model(self, model: nn.Module) -> nn.Module:
        """The plain model (same weights on every rank) made ready to train here."""

    @abstractmethod
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global training batch."""

    @abstractmethod
    def eval_rows(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's rows of a held-out batch and their weight in a world sum: its shard (weight 1)
        when the world size divides the batch, else the whole batch (weight 1 / world size)."""

    @abstractmethod
    def sync_gradients(self, model: nn.Module) -> None:
        """Gradients of the global batch's mean loss (call after backward, before clipping)."""

    @abstractmethod
    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The whole model's gradient norm (0-d device tensor; call after :meth:`sync_gradients`)."""

    @abstractmethod
    def sum_router_loads(self, model: nn.Module) -> None:
        """The routers' expert-load counters of the global batch (before the bias update)."""

    @abstractmethod
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The world mean of ``values`` (for logged losses)."""

    @abstractmethod
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain (single-process) model's state_dict."""

    @abstractmethod
    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        """The optimizer state with the plain model's shapes."""

    @abstractmethod
    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                             state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state` returned (at any world size)."""

    def rng_state(self) -> dict[str, Any]:
        """The random-number state a checkpoint keeps (restored by :meth:`set_rng_state`)."""
        return {"cpu_rng": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu_rng"])

    def layout(self) -> dict[str, Any] | None:
        """The parallel layout for records and reports; None for one process."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Leave the world (the process group this object joined)."""

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SingleProcess(World):
    """One process on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def close(self) -> None:
        pass

    def agree(self, fn: Callable[[], T]) -> T:
        return fn()

    def broadcast(self, obj: T) -> T:
        return obj

    def check_same(self, config: Any, what: str) -> None:
        pass

    def place_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def eval_rows(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return input_ids, labels, 1.0

    def sync_gradients(self, model: nn.Module) -> None:
        pass

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

    def sum_router_loads(self, model: nn.Module) -> None:
        pass

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                             state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def rng_state(self) -> dict[str, Any]:
        state = super().rng_state()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        super().set_rng_state(state)
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])


@dataclass
class ExpertParallelLayout:
    """How a :class:`Distributed` world lays out the experts (``setup_for_training``'s arguments)."""

    ep_size: int = 1
    gpus_per_node: int | None = None  # None: the real hosts
    dispatch_codec: str = "bf16"
    combine_codec: str = "bf16"
    two_hop: bool = False


class Distributed(World):
    """One of ``world_size`` ranks started by torchrun: EP x DP through :mod:`coscale.parallel`.

    Creating it joins the default process group (the rendezvous; a no-op when one exists, which it then
    leaves in place on :meth:`close`); the EP and DP groups follow in :meth:`place_model`. The CUDA RNG
    state is not checkpointed (each rank has its own device).
    """

    def __init__(self, backend: str, timeout_s: float, layout: ExpertParallelLayout) -> None:
        self.backend, self.timeout_s, self.expert_layout = backend, timeout_s, layout
        self._owns_group = not dist.is_initialized()
        self.device = init_process_group_from_env(backend, timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._ctx: ParallelContext | None = None

    @property
    def ctx(self) -> ParallelContext:
        if self._ctx is None:
            raise RuntimeError("the EP/DP groups do not exist yet: call place_model first")
        return self._ctx

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank, then agree: if it failed anywhere, every rank raises (one line).

        The failing rank re-raises its own error; the others raise the same class of user error naming
        it, so a bad option, a missing file or an incompatible checkpoint ends every rank with exit
        status 2 instead of leaving some waiting in a collective.
        """
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as e:  # reported to the other ranks, then re-raised here
            error = e
        mine = None if error is None else (isinstance(error, CheckpointError), isinstance(error, CoscaleError),
                                           str(error).splitlines()[0] if str(error) else type(error).__name__)
        outcomes: list[Any] = [None] * self.world_size
        guarded("all_gather_object(outcome)", lambda: dist.all_gather_object(outcomes, mine), self.timeout_s)
        if error is not None:
            raise error
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
        if failed:
            rank, (is_checkpoint, is_user, message) = failed[0]
            kind = CheckpointError if is_checkpoint else ConfigError if is_user else CoscaleError
            raise kind(f"rank {rank} failed: {message}" if is_user else f"rank {rank} failed with an internal "
                       f"error ({message}); see its traceback")
        return result

    def broadcast(self, obj: T) -> T:
        box = [obj]
        guarded("broadcast_object_list", lambda: dist.broadcast_object_list(box, src=0), self.timeout_s)
        return box[0]

    def check_same(self, config: Any, what: str) -> None:
        check_same_config(config, what=what, timeout_s=self.timeout_s)

    def place_model(self, model: nn.Module) -> nn.Module:
        e = self.expert_layout
        model, self._ctx = setup_for_training(model, {
            "ep_size": e.ep_size, "gpus_per_node": e.gpus_per_node, "dispatch_codec": e.dispatch_codec,
            "combine_codec": e.combine_codec, "two_hop": e.two_hop, "dist_timeout": self.timeout_s,
            "backend": self.backend,
        })
        return model

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return shard_batch(batch, self.ctx)

    def eval_rows(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        if input_ids.shape[0] % self.world_size == 0:
            return shard_batch(input_ids, self.ctx), shard_batch(labels, self.ctx), 1.0
        return input_ids, labels, 1.0 / self.world_size

    def sync_gradients(self, model: nn.Module) -> None:
        sync_gradients(model, self.ctx)

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        return grad_norm(model, self.ctx)

    def sum_router_loads(self, model: nn.Module) -> None:
        all_reduce_router_loads(model, self.ctx)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce_mean(values)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with gathered_experts(model):
            return model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        return full_optimizer_state_dict(optimizer, model)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                             state: dict[str, Any]) -> None:
        load_optimizer_state_dict(optimizer, model, state)

    def layout(self) -> dict[str, Any]:
        ctx, e = self.ctx, self.expert_layout
        return {"world_size": ctx.world_size, "ep_size": ctx.ep_size, "dp_size": ctx.dp_size,
                "gpus_per_node": ctx.dims.gpus_per_node, "backend": self.backend,
                "dispatch_codec": e.dispatch_codec, "combine_codec": e.combine_codec, "two_hop": e.two_hop}
