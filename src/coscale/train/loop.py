"""The training loop behind ``coscale train``: :class:`TrainConfig` in, a summary dict out.

One step: draw a batch of random windows, ``compute_loss`` (next-token + MTP + sequence-wise balance
loss) under BF16 autocast on CUDA (FP32 on CPU, or FP8 through ``coscale.fp8.convert_to_fp8``),
backward, clip, AdamW (FP32 master weights, FP32 or BF16 moments), then the auxiliary-loss-free router
bias update ``update_router_biases(model, gamma)`` from the expert loads the step recorded.

Order of work in :func:`train`, chosen so that bad input changes nothing on disk: validate the
config, read the data, read and verify the checkpoint to resume from (config compatibility, file
hashes), build the model and load the state; only then create or touch the run directory.

Determinism: the model is initialised from ``seed``, batches come from a generator seeded with
``seed`` whose state is checkpointed with the global RNG state, and the learning rate is a function
of the step. On CPU, ``N`` steps equal ``k`` steps + save + resume + ``N - k`` steps bit for bit.

Several processes (torchrun sets ``WORLD_SIZE`` > 1, or ``ep_size`` > 1): expert parallelism (EP) x
data parallelism (DP) through :mod:`coscale.parallel`. Every rank builds the plain model from ``seed``
and loads the checkpoint to resume (plain format), then ``setup_for_training`` keeps its experts and
moves it to ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo). Each step every rank draws the same global
batch and trains on its ``1 / world_size`` rows; gradients are all-reduced (``sync_gradients``), the
clip uses the whole model's norm, router loads are summed over the world before the bias update, and
logged losses are world means. Rank 0 alone prints and writes; checkpoints gather the experts and
their AdamW moments, so they have the single-process format and resume at any EP size. Every step
before the first write (validation, data, checkpoint reading) ends on every rank with the same
one-line error if it fails on any rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from coscale.config import ModelConfig, load_config
from coscale.errors import CheckpointError, ConfigError, CoscaleError
from coscale.train import checkpointing as ckpt
from coscale.train.data import (
    BatchSampler,
    data_fingerprint,
    eval_batches,
    load_tokens,
    nats_to_bits,
    split_tokens,
    unigram_entropy,
)
from coscale.train.metrics import PLOT_FILE, TENSORBOARD_DIR, MetricsLogger, plot_loss_curve
from coscale.train.optim import MOMENT_DTYPES, build_optimizer
from coscale.train.schedule import lr_at

PRECISIONS = ("bf16", "fp32", "fp8")
DISPATCH_CODECS = ("bf16", "fp8", "fp32")  # wire format of tokens sent to experts on other ranks
COMBINE_CODECS = ("bf16", "fp32")  # wire format of expert outputs coming back (and of gradients)
# Fields that describe how a run is launched rather than what it computes: --resume does not take them
# from the checkpoint (a run saved at one EP size resumes at another, or in one process).
LAYOUT_FIELDS = ("ep_size", "gpus_per_node", "two_hop", "dist_timeout")
_FINAL_LOSS_WINDOW = 20  # steps averaged into the reported final training loss
RUN_CONFIG = "train_config.json"
# Entries a run directory owns; --overwrite removes exactly these.
_RUN_ENTRIES = (ckpt.CHECKPOINTS, "metrics.jsonl", PLOT_FILE, TENSORBOARD_DIR, RUN_CONFIG, "summary.json")


@dataclass
class TrainConfig:
    """Everything ``coscale train`` takes; the defaults train ``tiny`` on the embedded corpus."""

    # Model: a preset name, a config.json path, a full config dict, or a ModelConfig; then overrides.
    model: str | dict | ModelConfig = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Data: text files (read as bytes) or pre-tokenised .bin files; empty means the embedded corpus.
    data: list[str] = field(default_factory=list)
    bin_dtype: str = "uint16"
    val_fraction: float = 0.05
    # Batches and length of the run.
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 200
    # Optimiser and schedule (linear warm-up, cosine to min_lr; min_lr None means lr / 10).
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int | None = None  # None: a tenth of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    adam_moments_dtype: str = "fp32"
    # Precision: None picks bf16 (autocast) on CUDA and fp32 on CPU.
    precision: str | None = None
    device: str = "auto"
    seed: int = 0
    # gamma of auxiliary-loss-free balancing; None takes the model config's bias_update_speed.
    bias_update_speed: float | None = None
    # Output.
    out_dir: str | None = None
    overwrite: bool = False
    resume: str | None = None
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    save_interval: int = 100
    keep_checkpoints: int = 2
    threads: int | None = None  # None: torch's default (all cores); see docs/training.md
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    tensorboard: bool = True
    # Several processes (torchrun): expert-parallel size (1: experts replicated, pure data parallelism),
    # virtual nodes of gpus_per_node ranks (None: the real hosts), EP wire formats, the two-hop route,
    # and the timeout of every collective (seconds).
    ep_size: int = 1
    gpus_per_node: int | None = None
    dispatch_codec: str = "bf16"
    combine_codec: str | None = None  # None: fp32 when dispatch_codec is fp32, else bf16
    two_hop: bool = False
    dist_timeout: float = 120.0

    # ---- construction and checks ------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError("a training config must be a JSON/YAML object (a mapping)")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown training config field {unknown[0]!r}; valid fields: {', '.join(names)}"
            )
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str) -> TrainConfig:
        """A JSON (or YAML, by extension) file of TrainConfig fields."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                              f"{first}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("batch_size", "seq_len", "steps", "eval_batches", "log_interval", "ep_size"):
            value = getattr(self, name)
            check(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        check(self.seq_len >= 2, f"seq_len must be at least 2 (inputs and next-token labels), got {self.seq_len}")
        for name in ("eval_interval", "save_interval", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            check(_is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            check(_is_number(value) and value > 0, f"{name} must be a positive number, got {value!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            check(_is_number(value) and value >= 0, f"{name} must be a number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(_is_number(value) and 0 <= value < 1, f"{name} must be in [0, 1), got {value!r}")
        check(_is_number(self.val_fraction) and 0 < self.val_fraction < 1,
              f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        check(self.min_lr is None or (_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr),
              f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr!r}")
        check(self.warmup_steps is None or (_is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps),
              f"warmup_steps must be an integer between 0 and steps ({self.steps}), got {self.warmup_steps!r}")
        check(self.adam_moments_dtype in MOMENT_DTYPES,
              f"adam_moments_dtype must be one of {', '.join(MOMENT_DTYPES)}, got {self.adam_moments_dtype!r}")
        check(self.precision is None or self.precision in PRECISIONS,
              f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
              f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.bias_update_speed is None or (_is_number(self.bias_update_speed) and self.bias_update_speed >= 0),
              f"bias_update_speed must be a number >= 0, got {self.bias_update_speed!r}")
        check(self.threads is None or (_is_int(self.threads) and self.threads > 0),
              f"threads must be a positive integer, got {self.threads!r}")
        check(isinstance(self.data, list) and all(isinstance(p, str) for p in self.data),
              f"data must be a list of file paths, got {self.data!r}")
        check(isinstance(self.model, (str, dict, ModelConfig)),
              f"model must be a preset name, a config path or a config mapping, got {self.model!r}")
        check(isinstance(self.model_overrides, dict),
              f"model_overrides must be a mapping of ModelConfig fields, got {self.model_overrides!r}")
        check(self.gpus_per_node is None or (_is_int(self.gpus_per_node) and self.gpus_per_node > 0),
              f"gpus_per_node must be a positive integer, got {self.gpus_per_node!r}")
        check(self.dispatch_codec in DISPATCH_CODECS,
              f"dispatch_codec must be one of {', '.join(DISPATCH_CODECS)}, got {self.dispatch_codec!r}")
        check(self.combine_codec is None or self.combine_codec in COMBINE_CODECS,
              f"combine_codec must be one of {', '.join(COMBINE_CODECS)}, got {self.combine_codec!r}")
        check(isinstance(self.two_hop, bool), f"two_hop must be true or false, got {self.two_hop!r}")
        check(_is_number(self.dist_timeout) and self.dist_timeout > 0,
              f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def resolved_combine_codec(self) -> str:
        if self.combine_codec is not None:
            return self.combine_codec
        return "fp32" if self.dispatch_codec == "fp32" else "bf16"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        return d


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    if isinstance(cfg.model, ModelConfig):
        model_cfg = cfg.model
    elif isinstance(cfg.model, dict):
        model_cfg = ModelConfig.from_dict(cfg.model)
    else:
        model_cfg = load_config(cfg.model)
    if cfg.model_overrides:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(cfg.model_overrides) - names)
        if unknown:
            raise ConfigError(f"unknown model config field {unknown[0]!r} in model_overrides")
        try:
            model_cfg = model_cfg.replace(**cfg.model_overrides)
        except TypeError as e:
            raise ConfigError(f"invalid model_overrides: {e}") from None
    return model_cfg


def config_from_checkpoint(path: str) -> TrainConfig:
    """The training config a run was started with, read from its newest checkpoint (for --resume)."""
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(path), verify=False)  # train() verifies the files
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} records no training config")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(LAYOUT_FIELDS)
    return TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})


# ---- the run ---------------------------------------------------------------------------------------


class TrainingDiverged(CoscaleError, RuntimeError):
    """The training loss became NaN or infinite (the run stops; earlier checkpoints are intact)."""


@dataclass
class _Setup:
    """Everything validated and built before the first write to disk."""

    model_cfg: ModelConfig
    device: torch.device
    precision: str
    out_dir: str
    split: Any
    data_info: dict
    entropy: float
    resume_dir: str | None
    resume_meta: dict | None
    resolved_config: dict  # the config with defaults filled in, as run directory and checkpoints record it
    world_size: int = 1
    ctx: Any = None  # coscale.parallel.ParallelContext when several processes train together

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.rank == 0


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (losses, entropy, throughput, paths).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same ``cfg``; each returns the
    same summary, and rank 0 alone logs and writes.
    """
    world_size = _env_world_size()
    if world_size > 1 or (_is_int(cfg.ep_size) and cfg.ep_size > 1):
        if world_size == 1:
            cfg.validate()
            raise ConfigError(
                f"ep_size {cfg.ep_size} needs {cfg.ep_size} processes (or a multiple), but this is a single "
                f"process: launch with torchrun --nproc-per-node {cfg.ep_size} -m coscale train ..., or pass "
                "--ep-size 1"
            )
        return _train_distributed(cfg, log, world_size)
    setup = _prepare(cfg)
    return _train_prepared(cfg, setup, log)


def _train_prepared(cfg: TrainConfig, setup: _Setup, log) -> dict[str, Any]:
    threads_before = torch.get_num_threads()
    threads = cfg.threads
    if threads:
        torch.set_num_threads(threads)
    try:
        model, optimizer, sampler, start_step = _build(cfg, setup)
        # rank 0 writes; every rank learns of a failure
        _agreed(setup.ctx, lambda: _prepare_out_dir(cfg, setup) if setup.is_main else None)
        metrics: Any = _NullMetrics()
        if setup.is_main:
            metrics = MetricsLogger(setup.out_dir, resume_step=start_step if setup.resume_dir else None,
                                    tensorboard=cfg.tensorboard)
        try:
            return _run(cfg, setup, model, optimizer, sampler, start_step, metrics,
                        log if setup.is_main else _silent)
        finally:
            metrics.close()
    finally:
        torch.set_num_threads(threads_before)


def _silent(_message: str) -> None:
    pass


class _NullMetrics:
    """What ranks other than 0 log to."""

    path = None
    tensorboard_dir = None

    def log(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def _train_distributed(cfg: TrainConfig, log, world_size: int) -> dict[str, Any]:
    """The run on one of ``world_size`` ranks (torchrun's environment)."""
    import torch.distributed as dist

    from coscale.parallel.groups import DEFAULT_TIMEOUT_S, check_same_config, init_process_group_from_env

    # Nothing before the process group may fail on one rank only (the others would wait for it), so
    # the backend comes from the environment alone and every check runs after the rendezvous.
    timeout = float(cfg.dist_timeout) if _is_number(cfg.dist_timeout) and cfg.dist_timeout > 0 \
        else DEFAULT_TIMEOUT_S
    backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
    owns_group = not dist.is_initialized()
    device = init_process_group_from_env(backend, timeout)
    try:
        bootstrap = _Bootstrap(dist.get_rank(), dist.get_world_size(), timeout)
        if cfg.out_dir is None and not cfg.resume:  # one timestamped directory: rank 0's
            cfg = dataclasses.replace(cfg, out_dir=_broadcast_object(bootstrap, _default_out_dir()))
        setup = _agreed(bootstrap, lambda: _prepare(cfg, world_size=bootstrap.world_size, device=device))
        check_same_config(setup.resolved_config, what="training config (options given to coscale train)",
                          timeout_s=timeout)
        return _train_prepared(cfg, setup, log)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Bootstrap:
    """The part of a ParallelContext that :func:`_agreed` needs, before the EP/DP groups exist."""

    rank: int
    world_size: int
    timeout_s: float


def _agreed(ctx, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank, then agree: if it failed anywhere, every rank raises (one line).

    The failing rank re-raises its own error; the others raise the same class of user error naming
    it, so a bad option, a missing file or an incompatible checkpoint ends every rank with exit
    status 2 instead of leaving some waiting in a collective. Without a process group (``ctx`` None)
    this is ``fn()``.
    """
    if ctx is None:
        return fn()
    import torch.distributed as dist

    from coscale.parallel.groups import guarded

    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # reported to the other ranks, then re-raised here
        error = e
    mine = None if error is None else (isinstance(error, CheckpointError), isinstance(error, CoscaleError),
                                       str(error).splitlines()[0] if str(error) else type(error).__name__)
    outcomes: list[Any] = [None] * ctx.world_size
    guarded("all_gather_object(outcome)", lambda: dist.all_gather_object(outcomes, mine), ctx.timeout_s)
    if error is not None:
        raise error
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (is_checkpoint, is_user, message) = failed[0]
        kind = CheckpointError if is_checkpoint else ConfigError if is_user else CoscaleError
        raise kind(f"rank {rank} failed: {message}" if is_user else f"rank {rank} failed with an internal "
                   f"error ({message}); see its traceback")
    return result


def _prepare(cfg: TrainConfig, world_size: int = 1, device: torch.device | None = None) -> _Setup:
    cfg.validate()
    resume_dir = resume_meta = None
    if cfg.resume:
        resume_dir = ckpt.resolve_checkpoint(cfg.resume)
        resume_meta = ckpt.read_meta(resume_dir)
    model_cfg = resolve_model_config(cfg)
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}"
        )
    _check_layout(cfg, model_cfg, world_size)
    device = _resolve_device(cfg.device, distributed=world_size > 1, rank_device=device)
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    tokens = load_tokens(cfg.data, model_cfg.vocab_size, cfg.bin_dtype)
    split = split_tokens(tokens, cfg.val_fraction, cfg.seq_len)
    data_info = data_fingerprint(cfg.data, tokens)
    out_dir = cfg.out_dir or (ckpt.run_dir_of(resume_dir) if resume_dir else _default_out_dir())
    if resume_meta is not None:
        ckpt.check_compatible(resume_dir, resume_meta, _compat_fields(cfg, model_cfg, precision, data_info))
        if resume_meta["step"] >= cfg.steps:
            raise ConfigError(
                f"the checkpoint is at step {resume_meta['step']}, which already reaches steps={cfg.steps}; "
                "pass a larger --steps to train further"
            )
    if not _same_dir(out_dir, ckpt.run_dir_of(resume_dir) if resume_dir else None):
        _check_out_dir_free(out_dir, cfg.overwrite)
    entropy = unigram_entropy(split.train, model_cfg.vocab_size)
    resolved = cfg.to_dict() | {
        "model": model_cfg.to_dict(), "model_overrides": {}, "precision": precision, "resume": None,
        "overwrite": False, "data": [os.path.abspath(p) for p in cfg.data],
    }
    return _Setup(model_cfg, device, precision, out_dir, split, data_info, entropy, resume_dir,
                  resume_meta, resolved, world_size=world_size)


def _check_layout(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> None:
    """EP x DP sizes against the model, the batch and the number of processes."""
    ep = cfg.ep_size
    if ep > 1:
        if not model_cfg.is_moe:
            raise ConfigError(f"ep_size {ep} needs a model with routed experts; this model is dense")
        if model_cfg.n_routed_experts % ep:
            raise ConfigError(
                f"ep_size {ep} does not divide the model's {model_cfg.n_routed_experts} routed experts; "
                "choose an EP size that divides n_routed_experts"
            )
    if world_size % ep:
        raise ConfigError(f"ep_size {ep} must divide the number of processes ({world_size})")
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) must be divisible by the number of processes "
            f"({world_size}): every rank trains on batch_size / {world_size} sequences"
        )


def _compat_fields(cfg: TrainConfig, model_cfg: ModelConfig, precision: str, data_info: dict) -> dict:
    """What a resumed run must share with its checkpoint (steps, lr, intervals may change)."""
    return {
        "model_config": model_cfg.to_dict(),
        "precision": precision,
        "adam_moments_dtype": cfg.adam_moments_dtype,
        "data": data_info,
        "val_fraction": cfg.val_fraction,
    }


def _resolve_device(name: str, distributed: bool = False, rank_device: torch.device | None = None) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if distributed:
        if name.startswith("cuda:"):
            raise ConfigError(f"device {name!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device "
                              "cuda (or auto)")
        return rank_device if rank_device is not None else torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _default_out_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _same_dir(a: str, b: str | None) -> bool:
    return b is not None and os.path.abspath(a) == os.path.abspath(b)


def _check_out_dir_free(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output path {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(
            f"run directory {out_dir} exists and is not empty; pass --resume {out_dir} to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


def _build(cfg: TrainConfig, setup: _Setup):
    """Model (with the checkpoint's weights), optimizer, sampler and the step to start from."""
    from coscale.model import DeepseekForCausalLM

    torch.manual_seed(cfg.seed)
    model = DeepseekForCausalLM(setup.model_cfg)
    if setup.world_size > 1:
        model, state = _build_distributed(cfg, setup, model)
    else:
        model = model.to(setup.device)
        if setup.precision == "fp8":
            model = _convert_to_fp8(model)
        state = ckpt.load_checkpoint(setup.resume_dir, setup.resume_meta) if setup.resume_dir else None
        if state is not None:
            with _restoring(setup):
                model.load_state_dict(state.model)
    model.train()
    optimizer = build_optimizer(
        model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, moments_dtype=cfg.adam_moments_dtype,
    )
    sampler = BatchSampler(setup.split.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    if state is None:
        return model, optimizer, sampler, 0
    _agreed(setup.ctx, lambda: _restore_trainer(setup, model, optimizer, sampler, state))
    return model, optimizer, sampler, int(setup.resume_meta["step"])


def _build_distributed(cfg: TrainConfig, setup: _Setup, model):
    """The plain model (same seed everywhere) with the checkpoint loaded, then EP swap and replica sync."""
    import torch.distributed as dist

    from coscale.parallel import setup_for_training

    if setup.precision == "fp8":
        model = _convert_to_fp8(model)
    state = None
    if setup.resume_dir:  # full (plain-model) tensors: loaded before the EP swap keeps this rank's experts
        def load():
            loaded = ckpt.load_checkpoint(setup.resume_dir, setup.resume_meta)
            with _restoring(setup):
                model.load_state_dict(loaded.model)
            return loaded
        state = _agreed(_Bootstrap(dist.get_rank(), dist.get_world_size(), cfg.dist_timeout), load)
    model, setup.ctx = setup_for_training(model, {
        "ep_size": cfg.ep_size, "gpus_per_node": cfg.gpus_per_node, "dispatch_codec": cfg.dispatch_codec,
        "combine_codec": cfg.resolved_combine_codec, "two_hop": cfg.two_hop, "dist_timeout": cfg.dist_timeout,
        "backend": _backend(setup),
    })
    return model, state


def _restore_trainer(setup: _Setup, model, optimizer, sampler, state: ckpt.TrainingState) -> None:
    """Optimizer state, data position and RNG states of the checkpoint (weights are already loaded)."""
    with _restoring(setup):
        if setup.ctx is None:
            optimizer.load_state_dict(state.optimizer)
        else:  # full (plain-model) moments: this rank keeps its experts' rows
            from coscale.parallel import load_optimizer_state_dict

            load_optimizer_state_dict(optimizer, model, state.optimizer)
        sampler.load_state_dict(state.trainer["sampler"])
        torch.set_rng_state(state.trainer["cpu_rng"])
        if setup.ctx is None and setup.device.type == "cuda" and state.trainer.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state.trainer["cuda_rng"])


@contextlib.contextmanager
def _restoring(setup: _Setup):
    """Turn the errors of loading a state that does not fit into a one-line CheckpointError."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"cannot restore {setup.resume_dir}: {first}") from None


def _backend(setup: _Setup) -> str:
    return "nccl" if setup.device.type == "cuda" else "gloo"


def _convert_to_fp8(model):
    try:
        from coscale.fp8 import convert_to_fp8
    except ImportError as e:
        raise ConfigError(f"--precision fp8 needs coscale.fp8.convert_to_fp8, which is unavailable ({e})") from None
    converted = convert_to_fp8(model)
    return converted if converted is not None else model


def _prepare_out_dir(cfg: TrainConfig, setup: _Setup) -> None:
    os.makedirs(setup.out_dir, exist_ok=True)
    if cfg.overwrite and not setup.resume_dir:
        for name in _RUN_ENTRIES:
            path = os.path.join(setup.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    with open(os.path.join(setup.out_dir, RUN_CONFIG), "w", encoding="utf-8") as f:
        json.dump(setup.resolved_config, f, indent=2, sort_keys=True)
        f.write("\n")


def _parallel_info(cfg: TrainConfig, setup: _Setup) -> dict:
    ctx = setup.ctx
    return {"world_size": ctx.world_size, "ep_size": ctx.ep_size, "dp_size": ctx.dp_size,
            "gpus_per_node": ctx.dims.gpus_per_node, "backend": _backend(setup),
            "dispatch_codec": cfg.dispatch_codec, "combine_codec": cfg.resolved_combine_codec,
            "two_hop": cfg.two_hop}


def _run(cfg, setup: _Setup, model, optimizer, sampler, start_step, metrics, log) -> dict:
    wall_start = time.perf_counter()
    autocast = _autocast(setup)
    gamma = cfg.bias_update_speed if cfg.bias_update_speed is not None else setup.model_cfg.bias_update_speed
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    val_batches = eval_batches(setup.split.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    run_record = {"type": "run", "step": start_step, "resumed_from": setup.resume_dir,
                  "unigram_entropy": setup.entropy, "device": str(setup.device), "precision": setup.precision}
    if setup.ctx is not None:
        run_record["parallel"] = _parallel_info(cfg, setup)
    metrics.log(run_record)
    log(_header(cfg, setup, start_step))
    bar = _progress_bar(cfg, start_step) if setup.is_main else None
    recent: list[float] = []
    train_time, val_loss, last_saved = 0.0, None, None
    window_tokens, window_time = 0, 0.0
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, min_lr)
        t0 = time.perf_counter()
        record = _train_step(cfg, setup, model, optimizer, sampler, lr, gamma, autocast)
        dt = time.perf_counter() - t0
        done = step + 1
        _check_finite(record, done, last_saved or setup.resume_dir)
        train_time, window_time, window_tokens = train_time + dt, window_time + dt, window_tokens + tokens_per_step
        recent = (recent + [record["loss"]])[-_FINAL_LOSS_WINDOW:]
        record |= {"type": "train", "step": done, "lr": lr, "tokens_per_s": tokens_per_step / dt}
        metrics.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{window_tokens / window_time:.0f}", refresh=False)
        if done % cfg.log_interval == 0 or done == cfg.steps:
            if bar is None:
                window_loss = recent[-cfg.log_interval:]
                log(f"step {done:>6}/{cfg.steps} | loss {sum(window_loss) / len(window_loss):.4f}"
                    f" | lr {lr:.2e} | {window_tokens / window_time:,.0f} tok/s")
            window_tokens, window_time = 0, 0.0
            metrics.flush()
        if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.steps:
            val_loss = evaluate(model, val_batches, setup.device, autocast, ctx=setup.ctx)
            metrics.log({"type": "eval", "step": done, "val_loss": val_loss,
                         "unigram_entropy": setup.entropy})
            _write(bar, log, f"step {done:>6} | val loss {val_loss:.4f} nats "
                             f"(unigram entropy {setup.entropy:.4f})")
        if (cfg.save_interval and done % cfg.save_interval == 0) or done == cfg.steps:
            last_saved = _save(cfg, setup, model, optimizer, sampler, done)
    if bar is not None:
        bar.close()
    metrics.flush()
    summary = None
    if setup.is_main:
        summary = _summarise(cfg, setup, metrics, start_step, recent, val_loss, train_time, last_saved)
        summary["wall_seconds"] = time.perf_counter() - wall_start
        with open(os.path.join(setup.out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        log(_footer(summary))
    if setup.ctx is not None:  # every rank returns rank 0's summary
        summary = _broadcast_object(setup.ctx, summary)
    return summary


def _broadcast_object(ctx, obj: Any) -> Any:
    import torch.distributed as dist

    from coscale.parallel.groups import guarded

    box = [obj]
    guarded("broadcast_object_list(summary)", lambda: dist.broadcast_object_list(box, src=0), ctx.timeout_s)
    return box[0]


def _check_finite(record: dict, step: int, last_checkpoint: str | None) -> None:
    """Stop at the first NaN/inf main or total loss (every rank sees the same world-mean values)."""
    for name, label in (("loss", "training loss"), ("total_loss", "total loss (main + MTP + balance)")):
        value = record.get(name)
        if value is None or not math.isfinite(value):
            where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
            raise TrainingDiverged(
                f"the {label} is {'nan' if value is None else value} at step {step}; stopping (lower --lr, "
                f"raise --warmup-steps or --grad-clip, or check the data){where}"
            )


def _summarise(cfg, setup, metrics, start_step, recent, val_loss, train_time, last_saved) -> dict:
    plot = plot_loss_curve(metrics.path, os.path.join(setup.out_dir, PLOT_FILE), setup.entropy)
    steps_run = cfg.steps - start_step
    tokens_per_step = cfg.batch_size * cfg.seq_len
    summary = {
        "steps": cfg.steps,
        "steps_this_run": steps_run,
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "final_train_loss_steps": len(recent),
        "final_val_loss": val_loss,
        "unigram_entropy_nats": setup.entropy,
        "unigram_entropy_bits": nats_to_bits(setup.entropy),
        "tokens_per_s": steps_run * tokens_per_step / train_time if train_time else None,
        "train_seconds": train_time,
        "device": str(setup.device),
        "precision": setup.precision,
        "out_dir": setup.out_dir,
        "metrics": metrics.path,
        "plot": plot,
        "checkpoint": last_saved,
        "tensorboard": metrics.tensorboard_dir,
    }
    if setup.ctx is not None:
        summary["parallel"] = _parallel_info(cfg, setup)
    return summary


def _autocast(setup: _Setup):
    """BF16 autocast for bf16 (any device) and fp8 (CUDA: the layers FP8 leaves out run in BF16)."""
    if setup.precision == "bf16" or (setup.precision == "fp8" and setup.device.type == "cuda"):
        return lambda: torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _train_step(cfg, setup, model, optimizer, sampler, lr, gamma, autocast) -> dict:
    from coscale.model.moe import update_router_biases

    ctx = setup.ctx
    for group in optimizer.param_groups:
        group["lr"] = lr
    input_ids, labels = sampler.next_batch()  # the global batch: the same on every rank
    if ctx is not None:
        from coscale.parallel import shard_batch

        input_ids, labels = shard_batch(input_ids, ctx), shard_batch(labels, ctx)
    input_ids = input_ids.to(setup.device, non_blocking=True)
    labels = labels.to(setup.device, non_blocking=True)
    with autocast():
        out = model.compute_loss(input_ids, labels)
    out.loss.backward()
    if ctx is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    else:
        from coscale.parallel import all_reduce_router_loads, clip_grad_norm_, sync_gradients

        sync_gradients(model, ctx)
        grad_norm = clip_grad_norm_(model, cfg.grad_clip, ctx) if cfg.grad_clip else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ctx is not None:  # global loads: the logged balance statistics and every rank's bias update
        all_reduce_router_loads(model, ctx)
    balance = _load_balance(model)  # read before update_router_biases resets the counters
    update_router_biases(model, gamma=gamma)
    nan = torch.tensor(float("nan"), device=setup.device)
    values = torch.stack([
        out.main_loss.detach().float(),
        out.loss.detach().float(),
        out.mtp_loss.detach().float() if out.mtp_loss is not None else nan,
        out.aux_loss.detach().float() if out.aux_loss is not None else nan,
        grad_norm.float() if grad_norm is not None else nan,
    ])
    if ctx is not None:  # world means (the grad norm is already global: its mean is itself)
        values = ctx.all_reduce_mean(values)
    if balance is not None:
        values = torch.cat([values, balance.to(values.dtype)])
    values = values.tolist()  # one device sync per step
    record = dict(zip(("loss", "total_loss", "mtp_loss", "aux_loss", "grad_norm"), values[:5]))
    record = {k: (None if math.isnan(v) else v) for k, v in record.items()}
    return record | _load_record(values[5:])


def _load_balance(model) -> torch.Tensor | None:
    """Expert-load balance of the last step, worst layer, on the device (no host sync).

    Reads the routers' ``expert_load`` counters (tokens routed since the last bias update), so it must
    run before ``update_router_biases`` resets them; None for a dense model. With several processes the
    trainer sums the counters over the world first, so these are the global batch's statistics. Returns
    [max/mean, max/min, 1 if every expert got a token else 0, 1 if any token was routed else 0].
    """
    loads = [m.expert_load for m in model.modules() if hasattr(m, "expert_load") and m.expert_load.numel()]
    if not loads:
        return None
    stacked = torch.stack([load.float() for load in loads])  # (layers, E)
    max_mean = (stacked.amax(1) / stacked.mean(1).clamp_min(1e-9)).amax()
    mins = stacked.amin(1)
    max_min = (stacked.amax(1) / mins.clamp_min(1e-9)).amax()
    return torch.stack([max_mean, max_min, (mins > 0).all().float(), (stacked.sum() > 0).float()])


def _load_record(balance: list[float]) -> dict[str, float | None]:
    """The metrics of :func:`_load_balance`'s values: empty for a dense model or no routed token."""
    if not balance or not balance[3]:
        return {}
    max_mean, max_min, all_loaded, _ = balance
    return {"moe_load_max_over_mean": max_mean, "moe_load_max_over_min": max_min if all_loaded else None}


@torch.no_grad()
def evaluate(model, batches, device, autocast=contextlib.nullcontext, ctx=None) -> float:
    """Mean next-token loss (nats) of the main model over fixed held-out batches.

    With ``ctx`` (several processes; every rank must call it) each rank takes its rows of a batch whose
    size the world size divides, and the whole batch otherwise (weighted 1 / world size); the sums are
    all-reduced, so every rank returns the same value.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for input_ids, labels in batches:
        weight = 1.0
        if ctx is not None:
            if input_ids.shape[0] % ctx.world_size == 0:
                from coscale.parallel import shard_batch

                input_ids, labels = shard_batch(input_ids, ctx), shard_batch(labels, ctx)
            else:
                weight = 1.0 / ctx.world_size
        with autocast():
            logits = model(input_ids.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), reduction="sum")
        total += weight * loss.item()
        count += weight * labels.numel()
    model.train(was_training)
    if ctx is not None:
        sums = ctx.all_reduce_mean(torch.tensor([total, count], dtype=torch.float64))
        total, count = float(sums[0]), float(sums[1])
    return total / count


def _save(cfg, setup, model, optimizer, sampler, step: int) -> str:
    trainer = {"sampler": sampler.state_dict(), "cpu_rng": torch.get_rng_state()}
    if setup.device.type == "cuda" and setup.ctx is None:
        trainer["cuda_rng"] = torch.cuda.get_rng_state_all()
    # what a resume checks (_compat_fields), and the config to resume with
    meta = _compat_fields(cfg, setup.model_cfg, setup.precision, setup.data_info)
    meta["train_config"] = setup.resolved_config
    if setup.ctx is None:
        return ckpt.save_checkpoint(setup.out_dir, step, model.state_dict(), optimizer.state_dict(),
                                    trainer, meta, keep=cfg.keep_checkpoints)
    from coscale.parallel import full_optimizer_state_dict, gathered_experts

    # Collective: every rank gathers the experts and their moments; rank 0 writes the plain format.
    meta["parallel"] = _parallel_info(cfg, setup)
    with gathered_experts(model):
        model_state = model.state_dict()
    optimizer_state = full_optimizer_state_dict(optimizer, model)

    def write():
        if not setup.is_main:
            return None
        return ckpt.save_checkpoint(setup.out_dir, step, model_state, optimizer_state, trainer, meta,
                                    keep=cfg.keep_checkpoints)

    path = _agreed(setup.ctx, write)
    return _broadcast_object(setup.ctx, path)


# ---- printing ------------------------------------------------------------------------------------


def _progress_bar(cfg: TrainConfig, start_step: int):
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


def _write(bar, log, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        log(message)


def _header(cfg: TrainConfig, setup: _Setup, start_step: int) -> str:
    from coscale.param_count import count_params

    counts = count_params(setup.model_cfg)
    n_train, n_val = setup.split.train.size, setup.split.val.size
    data = ", ".join(cfg.data) if cfg.data else "embedded corpus (Python's pydoc topics)"
    lines = [
        f"model: {_model_name(cfg)} ({counts.total / 1e6:.2f}M params, {counts.activated / 1e6:.2f}M activated"
        f", +{counts.mtp_unique / 1e6:.2f}M MTP) on {setup.device}, precision {setup.precision}",
        f"data: {data}: {n_train:,} train / {n_val:,} val tokens; unigram entropy "
        f"{setup.entropy:.4f} nats = {nats_to_bits(setup.entropy):.3f} bits per token",
        f"run: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr:g} "
        f"(warm-up {cfg.warmup}, cosine), AdamW moments {cfg.adam_moments_dtype}, "
        f"{torch.get_num_threads()} CPU thread(s); output {setup.out_dir}",
    ]
    note = _fp8_speed_note(setup)
    if note:
        lines.append(note)
    if setup.ctx is not None:
        p = _parallel_info(cfg, setup)
        lines.append(
            f"parallel: {p['world_size']} ranks = EP {p['ep_size']} x DP {p['dp_size']} ({p['backend']}, "
            f"{p['gpus_per_node']} rank(s) per node), dispatch {p['dispatch_codec']}, combine "
            f"{p['combine_codec']}{', two-hop' if p['two_hop'] else ''}; {cfg.batch_size // p['world_size']} "
            "sequences per rank per step"
        )
    if start_step:
        lines.append(f"resuming from {setup.resume_dir} at step {start_step}")
    return "\n".join(lines)


# FP8Linear beats BF16 from about this width on (BENCHMARKS.md, H100): below it a layer is too small
# for FP8's GEMMs to repay its quantization passes and launches
FP8_PAYS_FROM_HIDDEN = 4096


def _fp8_speed_note(setup: _Setup) -> str | None:
    """What a user choosing fp8 should expect of its speed, when it is not a speed-up."""
    if setup.precision != "fp8":
        return None
    if setup.device.type != "cuda":
        return ("note: fp8 on CPU runs the recipe's PyTorch reference (quantize, dequantize, matmul): it "
                "checks the numerics and is slower than fp32")
    hidden = setup.model_cfg.hidden_size
    if hidden < FP8_PAYS_FROM_HIDDEN:
        return (f"note: at hidden size {hidden} fp8 is expected to train more slowly than bf16 (about 0.5x "
                f"for the small preset on an H100: launch-bound); it speeds up linear layers from about "
                f"{FP8_PAYS_FROM_HIDDEN} wide (docs/fp8.md, 'When FP8 pays')")
    return None


def _model_name(cfg: TrainConfig) -> str:
    return cfg.model if isinstance(cfg.model, str) else "custom config"


def _footer(s: dict) -> str:
    val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "n/a"
    train_loss = f"{s['final_train_loss']:.4f}" if s["final_train_loss"] is not None else "n/a"
    lines = [
        f"done: {s['steps']} steps; train loss {train_loss} (mean of the last {s['final_train_loss_steps']} "
        f"steps), val loss {val} nats vs unigram entropy {s['unigram_entropy_nats']:.4f} nats",
        f"throughput: {s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.1f} s of training steps "
        f"({s['wall_seconds']:.1f} s with evaluation and checkpoints)"
        if s["tokens_per_s"] else "throughput: n/a",
        f"metrics: {s['metrics']}",
        f"loss curve: {s['plot']}",
        f"checkpoint: {s['checkpoint']}",
    ]
    if s["tensorboard"]:
        lines.append(f"tensorboard: {s['tensorboard']}")
    return "\n".join(lines)
