"""How the training step executes: eagerly, compiled, and/or replayed from one CUDA graph.

The step (:func:`coscale.train.step.train_step`) waits for nothing on the host: the MoE layers size
their buffers statically, route, count and balance on the device, and the metrics come back a step
late. Two things then take the host out of the loop on CUDA:

- ``compile``: ``torch.compile`` of the model's loss (forward, and through AOTAutograd the backward).
  Inductor fuses the elementwise work between the GEMMs (norms, RoPE, SwiGLU, the router, the loss),
  which is most of a small model's kernels. The first call compiles (about a minute for ``small``).
- ``cuda_graphs``: the whole step (forward, backward, gradient clip, AdamW, the router-bias update)
  captured once in a CUDA graph and replayed: one launch per step instead of thousands, so the GPU
  never waits for Python. Requirements, all met by construction: static shapes (a fixed batch; the
  permuted MoE buffer has its worst-case size), no host synchronisation, fixed addresses (the batch is
  copied into static input buffers, the learning rate lives in a device tensor that the optimizer
  reads, the optimizer is capturable), and warm-up before capture (compilation, Triton autotuning and
  the optimizer's state all happen in the first, ordinary steps).

Every step is a real training step: the warm-up steps run as usual (on a side stream, as capture
requires), the capture records a step without running it, and the replay that follows runs it. The
graph is replayed until the run ends; evaluation and checkpoints happen between replays and see the
live parameters, which the replays update in place.

FP8 layers (``FP8Linear``, experts in FP8) stay out of the compiled graph: each is a graph break that
runs its own kernels eagerly (its quantization and GEMM operators and its backward), while everything
between them is compiled as usual. Compiling through them failed on the H200 (torch 2.11, triton 3.6:
Inductor's analysis of the Triton quantization kernels; BENCHMARKS.md, run 4) and bought nothing: they
are already a few large kernels each. The CUDA graph still captures them with the rest of the step.

Default (``None``): both on for one CUDA process, both off otherwise. Expert parallelism over several
processes sizes its all-to-all on the host, so it cannot be captured; compile can still be asked for.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from coscale.errors import ConfigError
from coscale.fp8.linear import FP8Linear
from coscale.parallel.world import World
from coscale.train.optim import AdamW, adamw_update_
from coscale.train.step import train_step

# Ordinary steps before capture: the first compiles (and autotunes Triton kernels), the second runs the
# compiled code with the optimizer's state in place; capturing on the third records steady-state work.
WARMUP_STEPS = 2


@dataclass(frozen=True)
class StepMode:
    compile: bool
    cuda_graphs: bool

    def describe(self) -> str:
        if self.compile and self.cuda_graphs:
            return ("compiled (torch.compile) and replayed from a CUDA graph; the first steps compile and "
                    "capture")
        if self.compile:
            return "compiled (torch.compile); the first step compiles"
        if self.cuda_graphs:
            return "eager kernels replayed from a CUDA graph"
        return "eager"


def resolve_step_mode(compile: bool | None, cuda_graphs: bool | None, world: World) -> StepMode:
    """The mode a run uses: what was asked for, else the fastest correct one for this world. A model with
    FP8 layers gets the same default: they are graph breaks in the compiled step (module docstring), which
    ran on the H200 (torch 2.11, proxy-v3: 1.05x the BF16 step; BENCHMARKS.md, run 6)."""
    auto = world.device.type == "cuda" and world.world_size == 1
    use_compile = auto if compile is None else compile
    use_graphs = auto if cuda_graphs is None else cuda_graphs
    if use_graphs and world.device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device; this run is on {world.device}")
    if use_graphs and world.world_size > 1:
        raise ConfigError("--cuda-graphs works in one process only: expert-parallel dispatch sizes its "
                          "all-to-all on the host; pass --no-cuda-graphs")
    return StepMode(use_compile, use_graphs)


def capturable(optimizer: torch.optim.Optimizer) -> None:
    """Make the learning rate a device tensor that the optimizer reads (a captured step must not bake in a
    Python number), and the optimizer's own state safe to capture."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group:
            group["capturable"] = True


class StepRunner:
    """Runs one training step per call in the given :class:`StepMode`; returns the step's metrics (0-d
    device tensors, overwritten by the next call in graph mode: read or copy them before it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, mode: StepMode, *,
                 gamma: float, grad_clip: float, autocast: Callable[[], contextlib.AbstractContextManager],
                 compile_backend: str = "inductor") -> None:
        self.model, self.optimizer, self.world, self.mode = model, optimizer, world, mode
        self.gamma, self.grad_clip, self.autocast = gamma, grad_clip, autocast
        self.loss_fn = model.compute_loss
        if mode.compile:
            keep_fp8_layers_eager(model)
            self.loss_fn = torch.compile(model.compute_loss, backend=compile_backend)
            if isinstance(optimizer, AdamW):  # BF16 moments: fuse each parameter's update into one kernel
                optimizer.update_fn = torch.compile(adamw_update_, backend=compile_backend, fullgraph=True,
                                                    dynamic=True)
        if mode.cuda_graphs:
            capturable(optimizer)
        self.steps_run = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._static_metrics: dict[str, torch.Tensor] | None = None

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
        set_learning_rate(self.optimizer, lr)
        self.steps_run += 1
        if not self.mode.cuda_graphs:
            return self._eager(batch)
        # the graph reads the batch from contiguous buffers: warm up (and compile) with that layout too, or
        # a strided batch (a view such as ids[:, :-1]) makes torch.compile recompile inside the capture
        batch = tuple(t.contiguous() for t in batch)
        if self._graph is None and self.steps_run <= WARMUP_STEPS:
            return self._on_side_stream(lambda: self._eager(batch))
        if self._graph is None:
            self._capture(batch)
        static_ids, static_labels = self._static_batch
        static_ids.copy_(batch[0], non_blocking=True)
        static_labels.copy_(batch[1], non_blocking=True)
        self._graph.replay()
        return self._static_metrics

    def _eager(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return train_step(self.model, self.optimizer, self.world, batch, gamma=self.gamma,
                          grad_clip=self.grad_clip, autocast=self.autocast, loss_fn=self.loss_fn)

    @staticmethod
    def _on_side_stream(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Record one step into a CUDA graph (the capture itself computes nothing)."""
        device = self.world.device
        self._static_batch = tuple(torch.empty(t.shape, dtype=t.dtype, device=device) for t in batch)
        # Gradients are allocated inside the graph's memory pool by the captured backward.
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_metrics = self._eager(self._static_batch)


def runs_fp8(module: nn.Module) -> bool:
    """Whether ``module`` is one of the FP8 layers: an FP8Linear or experts whose precision is FP8."""
    return isinstance(module, FP8Linear) or getattr(module, "precision", None) == "fp8"


def keep_fp8_layers_eager(model: nn.Module) -> int:
    """Make every FP8 layer of ``model`` a region that torch.compile leaves to eager execution (see the
    module docstring); returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if runs_fp8(module) and not getattr(module, "_eager_under_compile", False):
            # bound through types.MethodType: a deep copy of the model rebinds it to the copy (a stored
            # bound method would keep calling the original module, with the original's weights). A layer
            # with run_kernels leaves only that eager: its forward's casts stay in the compiled graph.
            name = "run_kernels" if hasattr(type(module), "run_kernels") else "forward"
            setattr(module, name, types.MethodType(torch.compiler.disable(getattr(type(module), name)), module))
            module._eager_under_compile = True
            count += 1
    return count


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate, ``lr`` times the group's ``lr_scale`` (coscale.train.optim.param_groups);
    written into the device tensor when the optimizer holds one."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
