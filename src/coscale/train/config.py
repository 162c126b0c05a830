"""TrainConfig: everything ``coscale train`` takes, and its checks.

This module does not import torch (nor does anything it imports), so that ``coscale train --steps -1``
or a typo in a config file is reported at once, before the seconds that importing torch takes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from coscale.config import ModelConfig, load_config
from coscale.errors import CheckpointError, ConfigError, CoscaleError
from coscale.train import run_dir

DEFAULT_MODEL = "tiny"
PRECISIONS = ("bf16", "fp32", "fp8")
FP8_LAYERS = ("auto", "all")  # which layers --precision fp8 converts (coscale.fp8.policy)
ADAM_MOMENTS_DTYPES = ("fp32", "bf16")
DISPATCH_CODECS = ("bf16", "fp8", "fp32")  # wire format of tokens sent to experts on other ranks
COMBINE_CODECS = ("bf16", "fp32")  # wire format of expert outputs coming back (and of gradients)
# Fields that describe how a run is launched rather than what it computes: --resume does not take them
# from the checkpoint (a run saved at one EP size resumes at another, or in one process).
# How the step executes (compiled, captured in a CUDA graph) does not change what it computes beyond
# float rounding: these too are the launch's, not the run's.
LAYOUT_FIELDS = ("ep_size", "gpus_per_node", "two_hop", "dist_timeout", "compile", "cuda_graphs")
BIN_DTYPES = ("uint16", "uint32")  # as coscale.train.data (which imports numpy and torch)
SEED_LIMIT = 2**64  # torch's generators take seeds below 2**64 (a larger one is an OverflowError)
THREADS_PER_CORE = 4  # --threads cap: far above any useful value; torch segfaults at 100,000 threads


def max_threads() -> int:
    """The largest --threads taken (``coscale train`` and ``coscale generate``)."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def threads_problem(threads: Any, name: str = "threads") -> str | None:
    """Why ``threads`` is not a thread count torch can take, or None."""
    if not (_is_int(threads) and threads > 0):
        return f"{name} must be a positive integer, got {threads!r}"
    if threads > max_threads():
        return (f"{name} {threads} is more than {THREADS_PER_CORE} x this machine's {os.cpu_count()} CPU cores "
                f"({max_threads()}); more threads than cores only slow torch down")
    return None


def seed_problem(seed: Any, name: str = "seed") -> str | None:
    """Why ``seed`` is not a seed torch's generators take, or None."""
    if not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        return f"{name} must be an integer between 0 and 2**64 - 1, got {seed!r}"
    return None


@dataclass
class TrainConfig:
    """Everything ``coscale train`` takes; the defaults train ``tiny`` on the embedded corpus."""

    # Model: a preset name, a config.json path, a full config dict, or a ModelConfig; then overrides.
    # None: the config of ``init_from`` when given, else the tiny preset.
    model: str | dict | ModelConfig | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Initial weights: an HF-format checkpoint directory (fine-tuning); None: random initialisation.
    init_from: str | None = None
    # Data: text files (read as bytes) or pre-tokenised .bin files; empty means the embedded corpus.
    data: list[str] = field(default_factory=list)
    bin_dtype: str = "uint16"
    # How text files (and the embedded corpus) become ids: a tokenizer.json or a directory holding one;
    # None: UTF-8 bytes (256 ids). .bin files are already ids.
    tokenizer: str | None = None
    val_fraction: float = 0.05
    # Batches and length of the run.
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 200
    # Optimiser and schedule (linear warm-up, cosine to min_lr; min_lr None means lr / 10). lr None: the
    # default for the model's width, default_learning_rate (resolved when the run starts).
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None  # None: a tenth of the steps
    weight_decay: float = 0.1
    # The routers' (Gate.weight) learning rate over the others' (docs/training.md, "Router learning rate").
    router_lr_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    adam_moments_dtype: str = "fp32"
    # Precision: None picks bf16 (autocast) on CUDA and fp32 on CPU. fp8_layers: which layers fp8
    # converts, "auto" (those large enough for FP8 to pay, coscale.fp8.policy) or "all".
    precision: str | None = None
    fp8_layers: str = "auto"
    device: str = "auto"
    # How the step runs (coscale.train.step_runner): torch.compile of the loss, and the whole step
    # (forward, backward, clip, AdamW, bias update) replayed from a CUDA graph. None: both on for one
    # CUDA process, off otherwise.
    compile: bool | None = None
    cuda_graphs: bool | None = None
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
    checkpoints: bool = True  # False: write none (throughput benchmarks); the run cannot be resumed
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

    # ---- construction ------------------------------------------------------------------
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
        cfg.validate_fields()
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
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not a JSON/YAML config: not UTF-8 text (byte {e.start})") from None
        is_yaml = path.endswith((".yaml", ".yml"))
        try:
            if is_yaml:
                import yaml  # only for YAML files: JSON needs no third-party parser

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {first}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # ---- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Every field, then the options the rest of the config would leave unused. :meth:`from_dict` checks
        only the fields: a config file or a checkpoint's config is completed by the command line first."""
        self.validate_fields()
        for message in _unused_option_problems(self):
            raise ConfigError(message)

    def validate_fields(self) -> None:
        for message in _problems(self):
            raise ConfigError(message)

    # ---- derived values ----------------------------------------------------------------
    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    @property
    def resolved_combine_codec(self) -> str:
        if self.combine_codec is not None:
            return self.combine_codec
        return "fp32" if self.dispatch_codec == "fp32" else "bf16"

    @property
    def model_name(self) -> str:
        """What the header calls the model: the preset or path it came from, else 'custom config'."""
        if self.model is None:
            return self.init_from or DEFAULT_MODEL
        return self.model if isinstance(self.model, str) else "custom config"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        return d


def _problems(cfg: TrainConfig):
    """What is wrong with ``cfg``, in field order; :meth:`TrainConfig.validate` raises the first (later
    checks may assume that earlier ones passed)."""
    for name in ("batch_size", "seq_len", "steps", "eval_batches", "log_interval", "ep_size"):
        value = getattr(cfg, name)
        if not (_is_int(value) and value > 0):
            yield f"{name} must be a positive integer, got {value!r}"
    if cfg.seq_len < 2:
        yield f"seq_len must be at least 2 (inputs and next-token labels), got {cfg.seq_len}"
    for name in ("eval_interval", "save_interval", "keep_checkpoints"):
        value = getattr(cfg, name)
        if not (_is_int(value) and value >= 0):
            yield f"{name} must be a non-negative integer, got {value!r}"
    if problem := seed_problem(cfg.seed):
        yield problem
    for name in ("lr", "eps"):
        value = getattr(cfg, name)
        if not ((value is None and name == "lr") or (_is_number(value) and value > 0)):
            yield f"{name} must be a positive number, got {value!r}"
    for name in ("weight_decay", "grad_clip", "router_lr_scale"):
        value = getattr(cfg, name)
        if not (_is_number(value) and value >= 0):
            yield f"{name} must be a number >= 0, got {value!r}"
    for name in ("beta1", "beta2"):
        value = getattr(cfg, name)
        if not (_is_number(value) and 0 <= value < 1):
            yield f"{name} must be in [0, 1), got {value!r}"
    if not (_is_number(cfg.val_fraction) and 0 < cfg.val_fraction < 1):
        yield f"val_fraction must be between 0 and 1, got {cfg.val_fraction!r}"
    if not (cfg.min_lr is None or (_is_number(cfg.min_lr) and 0 <= cfg.min_lr and (
            not _is_number(cfg.lr) or cfg.min_lr <= cfg.lr))):
        yield f"min_lr must be between 0 and lr ({cfg.lr if cfg.lr is not None else 'the default'}), got {cfg.min_lr!r}"
    if not (cfg.warmup_steps is None or (_is_int(cfg.warmup_steps) and 0 <= cfg.warmup_steps <= cfg.steps)):
        yield f"warmup_steps must be an integer between 0 and steps ({cfg.steps}), got {cfg.warmup_steps!r}"
    yield from _choice_problems(cfg)
    if not (cfg.bias_update_speed is None or (_is_number(cfg.bias_update_speed) and cfg.bias_update_speed >= 0)):
        yield f"bias_update_speed must be a number >= 0, got {cfg.bias_update_speed!r}"
    if cfg.threads is not None and (problem := threads_problem(cfg.threads)):
        yield problem
    if not (isinstance(cfg.data, list) and all(isinstance(p, str) for p in cfg.data)):
        yield f"data must be a list of file paths, got {cfg.data!r}"
    if not (cfg.model is None or isinstance(cfg.model, (str, dict, ModelConfig))):
        yield f"model must be a preset name, a config path or a config mapping, got {cfg.model!r}"
    if isinstance(cfg.model, dict) and "model_type" not in cfg.model:  # else read as DeepSeek-V3 (671B)
        yield ("model: a config mapping needs a model_type (deepseek_v3, deepseek_v2, ...); without one it is "
               "not a DeepSeek/HF model config")
    for name in ("tokenizer", "out_dir", "resume"):  # a number here failed deep inside; "" was ignored
        value = getattr(cfg, name)
        if not (value is None or (isinstance(value, str) and value)):
            yield f"{name} must be a path (a non-empty string), got {value!r}"
    if not isinstance(cfg.model_overrides, dict):
        yield f"model_overrides must be a mapping of ModelConfig fields, got {cfg.model_overrides!r}"
    if not (cfg.init_from is None or (isinstance(cfg.init_from, str) and cfg.init_from)):
        yield f"init_from must be the path of an HF-format checkpoint directory, got {cfg.init_from!r}"
    if not (cfg.gpus_per_node is None or (_is_int(cfg.gpus_per_node) and cfg.gpus_per_node > 0)):
        yield f"gpus_per_node must be a positive integer, got {cfg.gpus_per_node!r}"
    # Only true booleans: used as truth values, a YAML string "no" would count as true (and overwrite a run).
    for name in ("overwrite", "tensorboard", "two_hop", "checkpoints", "progress", "compile", "cuda_graphs"):
        value = getattr(cfg, name)
        if not (isinstance(value, bool) or (value is None and name in _NONE_MEANS_AUTO)):
            yield f"{name} must be true or false, got {value!r}"
    if not (_is_number(cfg.dist_timeout) and cfg.dist_timeout > 0):
        yield f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout!r}"


def _choice_problems(cfg: TrainConfig):
    choices = (("bin_dtype", cfg.bin_dtype, BIN_DTYPES, False),
               ("adam_moments_dtype", cfg.adam_moments_dtype, ADAM_MOMENTS_DTYPES, False),
               ("precision", cfg.precision, PRECISIONS, True),
               ("fp8_layers", cfg.fp8_layers, FP8_LAYERS, False),
               ("dispatch_codec", cfg.dispatch_codec, DISPATCH_CODECS, False),
               ("combine_codec", cfg.combine_codec, COMBINE_CODECS, True))
    for name, value, allowed, none_ok in choices:
        if not ((none_ok and value is None) or value in allowed):
            yield f"{name} must be one of {', '.join(allowed)}, got {value!r}"
    # As torch.device would parse it (torch is not imported here), without a negative index: "cuda:abc" and
    # "cuda:-1" gave a traceback when the run started.
    if not (cfg.device in ("auto", "cpu", "cuda") or (isinstance(cfg.device, str)
                                                       and re.fullmatch(r"cuda:[0-9]+", cfg.device))):
        yield f"device must be auto, cpu, cuda or cuda:N (N a GPU index >= 0), got {cfg.device!r}"


_NONE_MEANS_AUTO = ("progress", "compile", "cuda_graphs")  # boolean fields whose None picks for the run


def _unused_option_problems(cfg: TrainConfig):
    """Options that the rest of ``cfg`` leaves without effect, when they differ from their default (a value
    equal to the default cannot be told from one not given)."""
    default = TrainConfig()
    # bf16 is FP8's reference: benchmarks/run_gpu.sh (studyrun) and bench_train.py give the BF16 run the FP8
    # run's --fp8-layers; the header notes that it is unused there.
    if cfg.fp8_layers != default.fp8_layers and cfg.precision not in ("fp8", "bf16"):
        yield (f"fp8_layers {cfg.fp8_layers!r} picks the layers that precision fp8 converts; precision is "
               f"{cfg.precision or 'not given (bf16 on CUDA, fp32 on CPU)'}: add --precision fp8 or drop --fp8-layers")
    if not cfg.checkpoints:
        # save_interval 0 ("only at the end") says no periodic checkpoint too; benchmarks/run_gpu.sh gives both
        for name in ("save_interval", "keep_checkpoints"):
            value = getattr(cfg, name)
            if value != getattr(default, name) and not (name == "save_interval" and value == 0):
                yield (f"{name} {value} means nothing with checkpoints off (--no-checkpoints writes none): "
                       f"drop one of them")
    if cfg.bin_dtype != default.bin_dtype and not any(p.endswith(".bin") for p in cfg.data):
        yield (f"bin_dtype {cfg.bin_dtype} is the token dtype of .bin data files, and the data has none "
               f"({', '.join(cfg.data) if cfg.data else 'the embedded corpus'})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The default peak learning rate: 3e-3 at hidden size 256 (tiny), scaled down in proportion to the width.
# With Adam every weight moves by about lr a step, so a gradient that all tokens share moves a router's
# logits by about lr x hidden size at once; at 3e-3 and hidden 1,024 (and proxy-v3's 7,168 at 5e-4) the gate
# inputs of all tokens became nearly collinear and every token went to one expert, which no router bias can
# undo (docs/training.md, "When balancing cannot work"; tools/router_collapse.py). With lr x hidden held at
# tiny's 0.77 a 1,024-wide model kept its routing balanced (MaxVio_global 0.58 against 2.44) and reached a
# lower validation loss (2.206 against 2.245 nats, 100 steps, CPU). DeepSeek-V2-Lite's width gets 3.75e-4
# (its report: 4.2e-4), DeepSeek-V3's 1.07e-4 (2.2e-4).
BASE_LR, BASE_LR_WIDTH = 3e-3, 256


def default_learning_rate(hidden_size: int) -> float:
    """The peak learning rate a run gets without --lr: BASE_LR x BASE_LR_WIDTH / hidden_size, at most BASE_LR."""
    return BASE_LR * min(1.0, BASE_LR_WIDTH / hidden_size)


def with_resolved_lr(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its learning rate set: as given, else the default for the model's width (validated)."""
    if cfg.lr is not None:
        return cfg
    try:
        width = resolve_model_config(cfg).hidden_size
    except CoscaleError:  # left to the run's own checks, which say what is wrong in the order users expect
        return cfg
    resolved = dataclasses.replace(cfg, lr=default_learning_rate(width))
    resolved.validate()  # a min_lr above the default comes out here
    return resolved


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig a run trains: ``model`` (or ``init_from``'s config.json), then the overrides."""
    if isinstance(cfg.model, ModelConfig):
        model_cfg = cfg.model
    elif isinstance(cfg.model, dict):
        model_cfg = ModelConfig.from_dict(cfg.model)
    else:
        model_cfg = load_config(cfg.model or cfg.init_from or DEFAULT_MODEL)
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
    meta = run_dir.read_meta(run_dir.resolve_checkpoint(path), verify=False)  # train() verifies the files
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} records no training config")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(LAYOUT_FIELDS)
    return TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
