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


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_info(subparsers)


# ---- train ---------------------------------------------------------------------------------------

# (flag, TrainConfig field, argparse kwargs)
_TRAIN_OPTIONS = [
    ("--model", "model", dict(metavar="PRESET|CONFIG", help="model preset or HF config.json (default: tiny)")),
    ("--data", "data", dict(nargs="+", metavar="FILE",
                            help="text file(s) (tokenised as bytes) or pre-tokenised .bin file(s); "
                                 "default: the embedded corpus (Python's pydoc topics)")),
    ("--bin-dtype", "bin_dtype", dict(choices=["uint16", "uint32"], help="token dtype of .bin files "
                                                                         "(default: uint16)")),
    ("--val-fraction", "val_fraction", dict(type=float, help="held-out fraction of the tokens (default: 0.05)")),
    ("--batch-size", "batch_size", dict(type=int, help="sequences per step (default: 16)")),
    ("--seq-len", "seq_len", dict(type=int, help="tokens per sequence (default: 128)")),
    ("--steps", "steps", dict(type=int, help="optimizer steps (default: 200)")),
    ("--lr", "lr", dict(type=float, help="peak learning rate (default: 3e-3)")),
    ("--min-lr", "min_lr", dict(type=float, help="final learning rate of the cosine (default: lr/10)")),
    ("--warmup-steps", "warmup_steps", dict(type=int, help="linear warm-up steps (default: steps/10)")),
    ("--weight-decay", "weight_decay", dict(type=float, help="AdamW weight decay (default: 0.1)")),
    ("--beta1", "beta1", dict(type=float, help="AdamW beta1 (default: 0.9)")),
    ("--beta2", "beta2", dict(type=float, help="AdamW beta2 (default: 0.95)")),
    ("--eps", "eps", dict(type=float, help="AdamW epsilon (default: 1e-8)")),
    ("--grad-clip", "grad_clip", dict(type=float, help="gradient-norm clip, 0 disables (default: 1.0)")),
    ("--adam-moments-dtype", "adam_moments_dtype", dict(choices=["fp32", "bf16"],
                                                         help="storage dtype of AdamW's moments; master "
                                                              "weights stay FP32 (default: fp32)")),
    ("--precision", "precision", dict(choices=["bf16", "fp32", "fp8"],
                                      help="compute precision (default: bf16 autocast on CUDA, fp32 on CPU)")),
    ("--device", "device", dict(help="auto, cpu, cuda or cuda:N (default: auto)")),
    ("--seed", "seed", dict(type=int, help="seed of initialisation and batch sampling (default: 0)")),
    ("--bias-update-speed", "bias_update_speed",
     dict(type=float, metavar="GAMMA", help="router-bias update speed of aux-loss-free balancing "
                                             "(default: the model config's bias_update_speed)")),
    ("--out", "out_dir", dict(metavar="DIR", help="run directory (default: runs/<timestamp>)")),
    ("--resume", "resume", dict(metavar="PATH", help="continue from a run directory (its latest "
                                                     "checkpoint) or a checkpoint directory")),
    ("--eval-interval", "eval_interval", dict(type=int, help="steps between held-out evaluations (default: 50)")),
    ("--eval-batches", "eval_batches", dict(type=int, help="batches per evaluation (default: 8)")),
    ("--log-interval", "log_interval", dict(type=int, help="steps between log lines (default: 10)")),
    ("--save-interval", "save_interval", dict(type=int, help="steps between checkpoints, 0: only at the end "
                                                             "(default: 100)")),
    ("--keep-checkpoints", "keep_checkpoints", dict(type=int, help="checkpoints kept, 0 keeps all (default: 2)")),
    ("--threads", "threads", dict(type=int, help="CPU threads for torch (default: torch's, all cores; "
                                                 "use 1 on a shared machine)")),
    # Several processes (launch with torchrun; see docs/training.md).
    ("--ep-size", "ep_size", dict(type=int, metavar="N", help="expert-parallel size under torchrun: each rank "
                                                               "holds 1/N of the routed experts; the world size "
                                                               "/ N replicas form data parallelism (default: 1)")),
    ("--gpus-per-node", "gpus_per_node", dict(type=int, metavar="G", help="treat ranks [n*G, (n+1)*G) as node n "
                                                                           "(virtual nodes; default: real hosts)")),
    ("--dispatch-codec", "dispatch_codec", dict(choices=["bf16", "fp8", "fp32"],
                                                help="wire format of tokens sent to other ranks' experts "
                                                     "(default: bf16)")),
    ("--combine-codec", "combine_codec", dict(choices=["bf16", "fp32"],
                                              help="wire format of expert outputs and gradients coming back "
                                                   "(default: fp32 with --dispatch-codec fp32, else bf16)")),
    ("--dist-timeout", "dist_timeout", dict(type=float, metavar="SECONDS",
                                            help="timeout of every collective; a dead or stuck rank ends the "
                                                 "others with an error after it (default: 120)")),
]


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
        p.add_argument(flag, dest=dest, default=None, **kwargs)
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the outputs of an existing run directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="print log lines instead of a progress bar")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="do not write TensorBoard logs even when tensorboard is installed")
    p.add_argument("--two-hop", dest="two_hop", action="store_true", default=None,
                   help="node-limited two-hop dispatch: one inter-node copy per (token, node), then NVLink")
    p.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace):
    from coscale.train.loop import TrainConfig, config_from_checkpoint

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
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from coscale.train.loop import train

    cfg = train_config_from_args(args)
    train(cfg)
    return 0


# ---- info ----------------------------------------------------------------------------------------


def _register_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="model config summary and parameter counts",
                              description="Without --model: every preset's parameter counts. With --model: "
                                          "that config's architecture and counts.")
    p.add_argument("--model", metavar="PRESET|CONFIG", help="a preset name or an HF config.json / directory")
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
