"""``coscale train`` and ``coscale info``: parse, build a TrainConfig or ModelConfig, call the library.

Precedence for ``train``: the defaults of :class:`TrainConfig`, then ``--config FILE`` (or, with
``--resume`` and no ``--config``, the config the run was started with), then the options given on the
command line. Options default to ``None`` here so that only those actually given override. The
parallel layout (``--ep-size``, ``--gpus-per-node``, ``--two-hop``, ``--dist-timeout``) belongs to a
launch, not to a run: ``--resume`` does not take it from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from coscale.config import preset_names
from coscale.errors import ConfigError
from coscale.train.config import TrainConfig, config_from_checkpoint  # torch-free: errors come at once


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_info(subparsers)


# ---- train ---------------------------------------------------------------------------------------

# (flag, TrainConfig field, argparse kwargs). "(default: ...)" is added from TrainConfig's defaults where
# the help text does not say it.
_TRAIN_OPTIONS = [
    ("--model", "model", dict(metavar="PRESET|CONFIG",
                              help=f"model preset ({', '.join(preset_names())}), or an HF config.json or "
                                   "checkpoint directory (its config only: see --init-from) (default: tiny, or "
                                   "the config of --init-from)")),
    ("--init-from", "init_from", dict(metavar="DIR", help="start from the weights of an HF-format checkpoint "
                                                          "directory (fine-tuning) instead of a random "
                                                          "initialisation")),
    ("--data", "data", dict(nargs="+", metavar="FILE",
                            help="text file(s) (tokenised as bytes) or pre-tokenised .bin file(s) "
                                 "(default: the embedded corpus, Python's pydoc topics)")),
    ("--tokenizer", "tokenizer", dict(metavar="PATH", help="tokenizer.json (or a directory holding one) for text "
                                                            "data (default: UTF-8 bytes, 256 ids)")),
    ("--bin-dtype", "bin_dtype", dict(choices=["uint16", "uint32"], help="token dtype of .bin files")),
    ("--val-fraction", "val_fraction", dict(type=float, metavar="F", help="held-out fraction of the tokens")),
    ("--batch-size", "batch_size", dict(type=int, metavar="N", help="sequences per step (the global batch)")),
    ("--seq-len", "seq_len", dict(type=int, metavar="N", help="tokens per sequence")),
    ("--steps", "steps", dict(type=int, metavar="N", help="optimizer steps")),
    ("--lr", "lr", dict(type=float, help="peak learning rate (default: 3e-3 x 256 / the model's hidden "
                                         "size, at most 3e-3: docs/training.md)")),
    ("--min-lr", "min_lr", dict(type=float, metavar="LR", help="final learning rate of the cosine "
                                                               "(default: lr/10)")),
    ("--warmup-steps", "warmup_steps", dict(type=int, metavar="N", help="linear warm-up steps "
                                                                         "(default: steps/10)")),
    ("--weight-decay", "weight_decay", dict(type=float, metavar="X", help="AdamW weight decay")),
    ("--router-lr-scale", "router_lr_scale", dict(type=float, metavar="X",
                                                  help="the routers' learning rate over --lr's (default 1)")),
    ("--beta1", "beta1", dict(type=float, metavar="X", help="AdamW beta1")),
    ("--beta2", "beta2", dict(type=float, metavar="X", help="AdamW beta2")),
    ("--eps", "eps", dict(type=float, metavar="X", help="AdamW epsilon")),
    ("--grad-clip", "grad_clip", dict(type=float, metavar="X", help="gradient-norm clip, 0 disables")),
    ("--adam-moments-dtype", "adam_moments_dtype", dict(choices=["fp32", "bf16"],
                                                         help="storage dtype of AdamW's moments; master "
                                                              "weights stay FP32")),
    ("--precision", "precision", dict(choices=["bf16", "fp32", "fp8"],
                                      help="compute precision (default: bf16 autocast on CUDA, fp32 on CPU)")),
    ("--fp8-layers", "fp8_layers", dict(choices=["auto", "all"],
                                        help="with --precision fp8: the layers large enough for FP8 to pay "
                                             "(auto) or every linear layer and the experts (all)")),
    ("--device", "device", dict(metavar="DEVICE", help="auto, cpu, cuda or cuda:N")),
    ("--seed", "seed", dict(type=int, metavar="N", help="seed of initialisation and batch sampling")),
    ("--bias-update-speed", "bias_update_speed",
     dict(type=float, metavar="GAMMA", help="router-bias update speed of aux-loss-free balancing; 0 freezes "
                                             "the biases (default: scaled with the run, 0.2 / warm-up steps, "
                                             "at least the model config's bias_update_speed)")),
    ("--out", "out_dir", dict(metavar="DIR", help="run directory (default: runs/<timestamp>)")),
    ("--resume", "resume", dict(metavar="PATH", help="continue from a run directory (its latest "
                                                     "checkpoint) or a checkpoint directory")),
    ("--eval-interval", "eval_interval", dict(type=int, metavar="N", help="steps between held-out "
                                                                           "evaluations, 0: only at the end")),
    ("--eval-batches", "eval_batches", dict(type=int, metavar="N", help="batches per evaluation")),
    ("--log-interval", "log_interval", dict(type=int, metavar="N", help="steps between log lines")),
    ("--save-interval", "save_interval", dict(type=int, metavar="N", help="steps between checkpoints, 0: only "
                                                                           "at the end")),
    ("--keep-checkpoints", "keep_checkpoints", dict(type=int, metavar="N", help="checkpoints kept, 0 keeps all")),
    ("--threads", "threads", dict(type=int, metavar="N", help="CPU threads for torch (default: torch's, all "
                                                              "cores; use 1 on a shared machine)")),
    # Several processes (launch with torchrun; see docs/training.md).
    ("--ep-size", "ep_size", dict(type=int, metavar="N", help="expert-parallel size under torchrun: each rank "
                                                               "holds 1/N of the routed experts; the world size "
                                                               "/ N replicas form data parallelism")),
    ("--gpus-per-node", "gpus_per_node", dict(type=int, metavar="G", help="treat ranks [n*G, (n+1)*G) as node n "
                                                                           "(virtual nodes; default: real hosts)")),
    ("--dispatch-codec", "dispatch_codec", dict(choices=["bf16", "fp8", "fp32"],
                                                help="wire format of tokens sent to other ranks' experts")),
    ("--combine-codec", "combine_codec", dict(choices=["bf16", "fp32"],
                                              help="wire format of expert outputs and gradients coming back "
                                                   "(default: fp32 with --dispatch-codec fp32, else bf16)")),
    ("--dist-timeout", "dist_timeout", dict(type=float, metavar="SECONDS",
                                            help="timeout of every collective; a dead or stuck rank ends the "
                                                 "others with an error after it")),
]


def _with_default(field: str, text: str) -> str:
    """``text`` plus "(default: X)" from TrainConfig, unless the text already names its default."""
    default = getattr(TrainConfig, field, None)
    if "default:" in text or default is None:
        return text
    return f"{text} (default: {default:g})" if isinstance(default, float) else f"{text} (default: {default})"


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (default: tiny on the embedded corpus, a few minutes on a CPU)",
        description="Train a DeepSeek-V3-style model. With no arguments: the tiny preset on an embedded "
                    "corpus with a byte tokenizer, nothing to download.",
    )
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of training settings "
                                                     "(TrainConfig fields); options given here override it")
    for flag, dest, kwargs in _TRAIN_OPTIONS:
        kwargs = kwargs | {"help": _with_default(dest, kwargs["help"])}
        p.add_argument(flag, dest=dest, default=None, **kwargs)
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the outputs of an existing run directory (only the files a run writes)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="print log lines instead of a progress bar (the default when stderr is not a terminal)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="do not write TensorBoard logs even when tensorboard is installed")
    p.add_argument("--no-checkpoints", dest="checkpoints", action="store_false", default=None,
                   help="write no checkpoint, not even at the end (throughput benchmarks; the run cannot be "
                        "resumed)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward and backward pass (default: on for one CUDA process; the "
                        "first step then takes about a minute to compile)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the whole step (forward, backward, clip, AdamW, bias update) from a CUDA graph, "
                        "so the host issues one launch per step (default: on for one CUDA process)")
    p.add_argument("--two-hop", dest="two_hop", action="store_true", default=None,
                   help="node-limited two-hop dispatch: one inter-node copy per (token, node), then NVLink")
    p.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of a command line, validated (torch is not imported: errors come at once)."""
    if args.resume and args.init_from:
        raise ConfigError("--init-from starts a new run from a checkpoint's weights; --resume continues a run "
                          "from its own checkpoint: pass one of them")
    if args.config:
        cfg = TrainConfig.from_file(args.config)
    elif args.resume:
        cfg = config_from_checkpoint(args.resume)
        cfg.out_dir = None  # the run directory of the checkpoint, unless --out says otherwise
    else:
        cfg = TrainConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if "model" in given:
        given["model_overrides"] = {}  # a config file's overrides were meant for its own model
    cfg = dataclasses.replace(cfg, **given)
    cfg.validate()
    _refuse_layout_in_one_process(cfg, given)
    return cfg


# The options of expert parallelism over several processes, by field. Only those given on the command line
# are refused in one process: a config file may be shared by a one-process run and a torchrun one (as
# tests/test_parallel_train.py's equivalence runs share dispatch_codec fp32).
_LAYOUT_FLAGS = {"gpus_per_node": "--gpus-per-node", "dispatch_codec": "--dispatch-codec",
                 "combine_codec": "--combine-codec", "two_hop": "--two-hop", "dist_timeout": "--dist-timeout"}


def _refuse_layout_in_one_process(cfg: TrainConfig, given: dict) -> None:
    """EP layout options given to a single process (no torchrun), where nothing uses them."""
    if os.environ.get("WORLD_SIZE", "1").strip() != "1" or cfg.ep_size > 1:
        return  # several processes; or one with --ep-size N, which setup refuses with a torchrun hint
    default = TrainConfig()
    defaults = {name: getattr(default, name) for name in _LAYOUT_FLAGS} | {
        "combine_codec": default.resolved_combine_codec}
    unused = [_as_given(flag, given[name]) for name, flag in _LAYOUT_FLAGS.items()
              if name in given and given[name] != defaults[name]]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: only expert parallelism over several processes uses "
                          f"{'this' if len(unused) == 1 else 'these'}, and this is a single process; launch with "
                          "torchrun --nproc-per-node N -m coscale train --ep-size N ..., or drop "
                          f"{'it' if len(unused) == 1 else 'them'}")


def _as_given(flag: str, value) -> str:
    """The option as typed: a switch alone, a value after its flag."""
    if isinstance(value, bool):
        return flag
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def run_train(args: argparse.Namespace) -> int:
    cfg = train_config_from_args(args)
    from coscale.train.loop import train  # imports torch: only once the command line is known to be valid

    train(cfg)
    return 0


# ---- info ----------------------------------------------------------------------------------------


def _register_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="model config summary and parameter counts",
                              description="Without --model: every preset's parameter counts. With --model: "
                                          "that config's architecture and counts.")
    p.add_argument("--model", metavar="PRESET|CONFIG",
                   help=f"a preset name ({', '.join(preset_names())}) or an HF config.json / directory")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from coscale.config import get_preset, load_config, preset_names

    if args.model:
        print(describe_model(load_config(args.model), args.model))
        return 0
    print(f"{'preset':<18}{'total':>10}{'activated':>12}{'MTP':>10}{'layers':>8}{'hidden':>8}{'experts':>10}")
    for name in preset_names():
        cfg = get_preset(name)
        c = _counts(cfg)
        experts = f"{cfg.num_experts_per_tok}/{cfg.n_routed_experts}" if cfg.is_moe else "dense"
        print(f"{name:<18}{_human(c.total):>10}{_human(c.activated):>12}{_human(c.mtp_unique):>10}"
              f"{cfg.num_hidden_layers:>8}{cfg.hidden_size:>8}{experts:>10}")
    return 0


def _counts(cfg):
    from coscale.param_count import count_params

    return count_params(cfg)


def describe_model(cfg, name: str) -> str:
    """A few lines: architecture and total / activated parameter counts (with their convention)."""
    from coscale.param_count import ACTIVATED_CONVENTION

    c = _counts(cfg)
    q = f"q_lora_rank {cfg.q_lora_rank}" if cfg.q_lora_rank else "queries unprojected"
    lines = [
        f"model: {name} ({cfg.model_type})",
        f"  trunk: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"max positions {cfg.max_position_embeddings}",
        f"  MLA: {cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, {q}, "
        f"qk dims {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} (nope+rope), v dim {cfg.v_head_dim}",
    ]
    if cfg.is_moe:
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        lines.append(
            f"  MoE: {n_moe} MoE layers (first {cfg.first_k_dense_replace} dense), {cfg.n_routed_experts} routed "
            f"+ {cfg.n_shared_experts or 0} shared experts, top-{cfg.num_experts_per_tok} "
            f"({cfg.topk_method}, {cfg.scoring_func}, {cfg.n_group or 1} groups, top {cfg.topk_group or 1}), "
            f"expert FFN {cfg.moe_intermediate_size}"
        )
    else:
        lines.append(f"  FFN: dense, intermediate {cfg.intermediate_size}")
    lines += [
        f"  MTP: depth {cfg.num_nextn_predict_layers}, loss weight {cfg.mtp_loss_weight}",
        f"  parameters: total {_human(c.total)} ({c.total:,}), activated per token {_human(c.activated)} "
        f"({c.activated:,})",
        f"    activated: {ACTIVATED_CONVENTION}; with the embedding table {_human(c.activated_with_embedding)} "
        f"({c.activated_with_embedding:,})",
        f"  MTP modules: {_human(c.mtp)} as stored ({_human(c.mtp_unique)} without shared embedding/head); "
        f"routed experts {_human(c.routed_experts)}",
    ]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
