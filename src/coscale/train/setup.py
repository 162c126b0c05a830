"""Before the first step: the world, the checks, the data, the model and its state.

Order, chosen so that bad input changes nothing on disk: :func:`plan_run` validates the config, reads
the checkpoint to resume from (config compatibility, file hashes) and the data, and checks the output
directory; :func:`build` makes the model (initial weights from ``init_from``, or the checkpoint's),
the optimizer and the sampler. Only then does the trainer create or touch the run directory. With
several processes every one of these runs under :meth:`World.agree`, so a failure on any rank ends
every rank with the same one-line error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coscale import checkpoint as hf_checkpoint
from coscale.config import ModelConfig
from coscale.errors import CheckpointError, ConfigError
from coscale.fp8 import convert_to_fp8
from coscale.model import DeepseekForCausalLM
from coscale.parallel.groups import DEFAULT_TIMEOUT_S
from coscale.parallel.world import Distributed, ExpertParallelLayout, SingleProcess, World
from coscale.train import checkpointing as ckpt
from coscale.train import run_dir
from coscale.train.config import TrainConfig, resolve_model_config
from coscale.train.data import BatchSampler, Split, data_fingerprint, load_tokens, split_tokens, unigram_entropy
from coscale.train.optim import build_optimizer
from coscale.train.step_runner import StepMode, resolve_step_mode


def open_world(cfg: TrainConfig) -> World:
    """One process, or this rank of torchrun's ``WORLD_SIZE`` (joins the process group)."""
    world_size = _env_world_size()
    if world_size == 1:
        cfg.validate()
        if cfg.ep_size > 1:
            raise ConfigError(
                f"ep_size {cfg.ep_size} needs {cfg.ep_size} processes (or a multiple), but this is a single "
                f"process: launch with torchrun --nproc-per-node {cfg.ep_size} -m coscale train ..., or pass "
                "--ep-size 1"
            )
        if cfg.device == "auto":
            return SingleProcess(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return SingleProcess(torch.device(cfg.device))
    # Nothing before the rendezvous may fail on one rank only (the others would wait for it), so the
    # backend and timeout come from what cannot fail; every check runs afterwards, under World.agree.
    timeout = cfg.dist_timeout if isinstance(cfg.dist_timeout, (int, float)) and cfg.dist_timeout > 0 \
        else DEFAULT_TIMEOUT_S
    backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
    layout = ExpertParallelLayout(ep_size=cfg.ep_size, gpus_per_node=cfg.gpus_per_node,
                                  dispatch_codec=cfg.dispatch_codec, combine_codec=cfg.resolved_combine_codec,
                                  two_hop=cfg.two_hop)
    return Distributed(backend, float(timeout), layout)


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def default_out_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


# ---- the plan: everything checked and read before anything is built or written ----------------------


@dataclass
class RunPlan:
    model_cfg: ModelConfig
    model_name: str  # the preset or path the run was started with, for the header
    precision: str
    out_dir: str
    split: Split
    data_info: dict
    entropy: float
    resume_dir: str | None
    resume_meta: dict | None
    resolved_config: dict  # the config with defaults filled in, as run directory and checkpoints record it
    step_mode: StepMode  # eager, compiled, CUDA-graphed
    init_from: str | None = None  # the HF checkpoint whose weights a new run starts from (None on resume)
    ignored_weights: str | None = None  # a --model directory whose weights this run does not load

    @property
    def start_step(self) -> int:
        return int(self.resume_meta["step"]) if self.resume_meta else 0


def plan_run(cfg: TrainConfig, world: World) -> RunPlan:
    cfg.validate()
    resume_dir = ckpt.resolve_checkpoint(cfg.resume) if cfg.resume else None
    resume_meta = ckpt.read_meta(resume_dir) if resume_dir else None
    init_from = None if resume_dir else cfg.init_from  # a resumed run has its own weights
    if init_from and not os.path.isdir(init_from):
        raise CheckpointError(f"--init-from {init_from}: no such checkpoint directory")
    model_cfg = resolve_model_config(cfg)
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    _check_layout(cfg, model_cfg, world.world_size)
    _check_device(cfg.device, world.world_size)
    precision = cfg.precision or ("bf16" if world.device.type == "cuda" else "fp32")
    step_mode = resolve_step_mode(cfg.compile, cfg.cuda_graphs, world)
    tokens = load_tokens(cfg.data, model_cfg.vocab_size, cfg.bin_dtype, cfg.tokenizer)
    split = split_tokens(tokens, cfg.val_fraction, cfg.seq_len)
    data_info = data_fingerprint(cfg.data, tokens)
    if resume_meta is not None:
        _check_resumable(cfg, resume_dir, resume_meta, compat_fields(cfg, model_cfg, precision, data_info))
    out_dir = cfg.out_dir or (ckpt.run_dir_of(resume_dir) if resume_dir else default_out_dir())
    if world.is_main:  # the one rank that writes
        _check_output(out_dir, cfg.overwrite, resume_dir)
    return RunPlan(
        model_cfg=model_cfg, model_name=_model_name(cfg, resume_meta), precision=precision, out_dir=out_dir,
        split=split, data_info=data_info, entropy=unigram_entropy(split.train, model_cfg.vocab_size),
        resume_dir=resume_dir, resume_meta=resume_meta,
        resolved_config=_resolved_config(cfg, model_cfg, precision), step_mode=step_mode, init_from=init_from,
        ignored_weights=None if (cfg.init_from or resume_dir) else _weights_beside(cfg.model),
    )


def _check_resumable(cfg: TrainConfig, resume_dir: str, resume_meta: dict, expected: dict) -> None:
    ckpt.check_compatible(resume_dir, resume_meta, expected)
    if resume_meta["step"] >= cfg.steps:
        raise ConfigError(f"the checkpoint is at step {resume_meta['step']}, which already reaches "
                          f"steps={cfg.steps}; pass a larger --steps to train further")


def _check_output(out_dir: str, overwrite: bool, resume_dir: str | None) -> None:
    """Continuing in the checkpoint's own run directory needs it writable; any other must be free."""
    if resume_dir and os.path.abspath(out_dir) == os.path.abspath(ckpt.run_dir_of(resume_dir)):
        run_dir.check_writable(out_dir, f"run directory {out_dir}")
    else:
        run_dir.check_out_dir(out_dir, overwrite)


def _resolved_config(cfg: TrainConfig, model_cfg: ModelConfig, precision: str) -> dict[str, Any]:
    """The config with every default filled in: what train_config.json and the checkpoints record."""
    return cfg.to_dict() | {
        "model": model_cfg.to_dict(), "model_overrides": {}, "precision": precision, "resume": None,
        "overwrite": False, "data": [os.path.abspath(p) for p in cfg.data],
        "tokenizer": (os.path.abspath(cfg.tokenizer) if cfg.tokenizer and os.path.exists(cfg.tokenizer)
                      else cfg.tokenizer),
        "init_from": os.path.abspath(cfg.init_from) if cfg.init_from else None,
    }


def _model_name(cfg: TrainConfig, resume_meta: dict | None) -> str:
    if resume_meta and not isinstance(cfg.model, str):  # resumed from the full config: the name it had
        return resume_meta.get("model_name", cfg.model_name)
    return cfg.model_name


def _check_layout(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> None:
    """EP x DP sizes against the model, the batch and the number of processes."""
    ep = cfg.ep_size
    if ep > 1:
        if not model_cfg.is_moe:
            raise ConfigError(f"ep_size {ep} needs a model with routed experts; this model is dense")
        if model_cfg.n_routed_experts % ep:
            raise ConfigError(f"ep_size {ep} does not divide the model's {model_cfg.n_routed_experts} routed "
                              "experts; choose an EP size that divides n_routed_experts")
    if world_size % ep:
        raise ConfigError(f"ep_size {ep} must divide the number of processes ({world_size})")
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the number of "
                          f"processes ({world_size}): every rank trains on batch_size / {world_size} sequences")


def _check_device(name: str, world_size: int) -> None:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if world_size > 1 and name.startswith("cuda:"):
        raise ConfigError(f"device {name!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                          "(or auto)")
    index = torch.device(name).index if name.startswith("cuda:") else None  # TrainConfig checked the form
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def compat_fields(cfg: TrainConfig, model_cfg: ModelConfig, precision: str, data_info: dict) -> dict:
    """What a resumed run must share with its checkpoint (steps, lr, intervals may change). The routers'
    learning-rate scale only where it is not 1, so that checkpoints from before it resume."""
    fields = {"model_config": model_cfg.to_dict(), "precision": precision,
              "adam_moments_dtype": cfg.adam_moments_dtype, "data": data_info, "val_fraction": cfg.val_fraction}
    if cfg.router_lr_scale != 1.0:
        fields["router_lr_scale"] = cfg.router_lr_scale
    return fields


def _weights_beside(model: Any) -> str | None:
    """The directory of a ``--model`` config path when it also holds safetensors weights."""
    if not isinstance(model, str) or not os.path.exists(model):
        return None
    directory = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    return directory if glob.glob(os.path.join(directory, "*.safetensors")) else None


# ---- building: model (with its initial or resumed state), optimizer, sampler ---------------------------


@dataclass
class Trainee:
    """What the loop trains, and the step it starts from."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    start_step: int


def build(cfg: TrainConfig, plan: RunPlan, world: World) -> Trainee:
    """Every rank builds the plain model from ``seed`` and loads the initial or resumed weights (full
    tensors), then :meth:`World.place_model` keeps its experts and moves it to its device."""
    torch.manual_seed(cfg.seed)
    model = DeepseekForCausalLM(plan.model_cfg)
    if plan.init_from:
        world.agree(lambda: _load_initial_weights(model, plan.init_from))
    if plan.precision == "fp8":
        model = convert_to_fp8(model, policy=cfg.fp8_layers) or model
    state = world.agree(lambda: _load_resumed_weights(model, plan)) if plan.resume_dir else None
    model = world.place_model(model)
    model.train()
    optimizer = build_optimizer(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, moments_dtype=cfg.adam_moments_dtype,
                                router_lr_scale=cfg.router_lr_scale)
    sampler = BatchSampler(plan.split.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    if state is not None:
        world.agree(lambda: _restore_trainer(plan.resume_dir, world, model, optimizer, sampler, state))
    return Trainee(model, optimizer, sampler, plan.start_step)


def _load_initial_weights(model: nn.Module, path: str) -> None:
    """Fine-tuning: the weights of an HF-format checkpoint, into the plain model (any dtype, FP8 included)."""
    try:
        hf_checkpoint.load_checkpoint(model, path)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from None


def _load_resumed_weights(model: nn.Module, plan: RunPlan) -> ckpt.TrainingState:
    state = ckpt.load_checkpoint(plan.resume_dir, plan.resume_meta)
    with _restoring(plan.resume_dir):
        model.load_state_dict(state.model)
    return state


def _restore_trainer(resume_dir: str, world: World, model: nn.Module, optimizer: torch.optim.Optimizer,
                     sampler: BatchSampler, state: ckpt.TrainingState) -> None:
    """Optimizer state, data position and RNG states of the checkpoint (weights are already loaded)."""
    # How this run's optimizer executes (fused, capturable, a float or device-tensor learning rate) is this
    # launch's choice, not the checkpoint's: keep it over what load_state_dict brings back.
    execution = [{k: g[k] for k in ("lr", "lr_scale", "fused", "foreach", "capturable") if k in g}
                 for g in optimizer.param_groups]
    with _restoring(resume_dir):
        world.load_optimizer_state(optimizer, model, state.optimizer)
    for group, keys in zip(optimizer.param_groups, execution):
        group.update(keys)
    with _restoring(resume_dir):
        sampler.load_state_dict(state.trainer["sampler"])
        world.set_rng_state(state.trainer)


def trainer_state(world: World, sampler: BatchSampler) -> dict[str, Any]:
    """What a checkpoint keeps beside the model and optimizer (restored by :func:`_restore_trainer`)."""
    return {"sampler": sampler.state_dict(), **world.rng_state()}


@contextlib.contextmanager
def _restoring(resume_dir: str) -> Iterator[None]:
    """Turn the errors of loading a state that does not fit into a one-line CheckpointError."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0]
        if "parameter groups" in first:  # coscale.train.optim.param_groups: the routers' group comes and goes
            first += (" (was --router-lr-scale changed? 1 keeps the routers with the other weights, any other "
                      "value gives them a group of their own)")
        raise CheckpointError(f"cannot restore {resume_dir}: {first}") from None


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: leave torch's default)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
