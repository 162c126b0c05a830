"""What a run prints and reports: the header, the progress (a bar or log lines), the summary and its footer.

The final training loss in the summary is the mean of the last ``FINAL_LOSS_WINDOW`` steps recorded in
``metrics.jsonl``, so it is the same number whether those steps ran in this process or before a resume;
so is the final MaxVio_batch (the expert-load balance of a training batch, worst MoE layer). The final
MaxVio_global is the last evaluation's (all held-out tokens). Peak memory is this process's (rank 0's):
the header's after the model is built, the footer's over the whole run (:mod:`coscale.train.memory`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from coscale.config import ModelConfig
from coscale.param_count import count_params
from coscale.train.balance import BIAS_TRAVEL, bias_horizon, resolve_bias_update_speed
from coscale.train.config import BASE_LR, BASE_LR_WIDTH, TrainConfig, default_learning_rate
from coscale.train.data import nats_to_bits
from coscale.train.memory import describe, peak_memory
from coscale.train.metrics import last_eval, plot_loss_curve, read_metrics, recent_mean
from coscale.train.run_dir import PLOT_FILE
from coscale.train.setup import RunPlan
from coscale.train.step import Evaluation
from coscale.train.step_runner import WARMUP_STEPS

FINAL_LOSS_WINDOW = 20  # steps averaged into the reported final training loss
# FP8Linear beats BF16 from about this width on (BENCHMARKS.md, H100): below it a layer is too small
# for FP8's GEMMs to repay its quantization passes and launches
FP8_PAYS_FROM_HIDDEN = 4096


# ---- the header --------------------------------------------------------------------------------


def header(cfg: TrainConfig, plan: RunPlan, device: torch.device, layout: dict | None, state: str = "") -> str:
    """The run's first lines; ``state``: coscale.train.memory.state_note's phrase (what the run holds before
    activations)."""
    counts = count_params(plan.model_cfg)
    n_train, n_val = plan.split.train.size, plan.split.val.size
    data = ", ".join(cfg.data) if cfg.data else "embedded corpus (Python's pydoc topics)"
    lines = [
        f"model: {plan.model_name} ({counts.total / 1e6:.2f}M params, {counts.activated / 1e6:.2f}M activated"
        f", +{counts.mtp_unique / 1e6:.2f}M MTP) on {device}, precision {plan.precision}",
        f"data: {data}: {n_train:,} train / {n_val:,} val tokens; unigram entropy "
        f"{plan.entropy:.4f} nats = {nats_to_bits(plan.entropy):.3f} bits per token",
        f"run: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr:g}{_lr_note(cfg, plan)} "
        f"(warm-up {cfg.warmup}, cosine), AdamW moments {cfg.adam_moments_dtype}, "
        f"{torch.get_num_threads()} CPU thread(s); output {plan.out_dir}",
        f"step: {plan.step_mode.describe()} (--compile/--no-compile, --cuda-graphs/--no-cuda-graphs)",
    ]
    balancing = balancing_note(cfg, plan.model_cfg)
    if balancing:
        lines.append(balancing)
    state = state or "AdamW's moments come at the first step"
    lines.append(f"memory: {describe(peak_memory(device))} with the model built; {state} (the footer gives the "
                 f"run's peak)")
    lines += [note for note in (_weights_note(plan), fp8_speed_note(plan.precision, device,
                                                                          plan.model_cfg.hidden_size),
                                _fp8_layers_note(cfg, plan)) if note]
    if layout is not None:
        lines.append(
            f"parallel: {layout['world_size']} ranks = EP {layout['ep_size']} x DP {layout['dp_size']} "
            f"({layout['backend']}, {layout['gpus_per_node']} rank(s) per node), dispatch {layout['dispatch_codec']}"
            f", combine {layout['combine_codec']}{', two-hop' if layout['two_hop'] else ''}; "
            f"{cfg.batch_size // layout['world_size']} sequences per rank per step"
        )
    if plan.resume_dir:
        lines.append(f"resuming from {plan.resume_dir} at step {plan.start_step}")
    return "\n".join(lines)


def _lr_note(cfg: TrainConfig, plan: RunPlan) -> str:
    width = plan.model_cfg.hidden_size
    if cfg.lr != default_learning_rate(width) or width <= BASE_LR_WIDTH:
        return ""
    return f" (the default for hidden size {width}: {BASE_LR:g} x {BASE_LR_WIDTH} / {width}; --lr to change)"


def balancing_note(cfg: TrainConfig, model_cfg: ModelConfig) -> str | None:
    """How the run balances its experts (None for a dense model)."""
    if not model_cfg.is_moe:
        return None
    alpha = model_cfg.aux_loss_alpha if model_cfg.seq_aux else 0.0
    loss = f"; sequence-wise balance loss alpha {alpha:g}" if alpha else ""
    if model_cfg.topk_method != "noaux_tc":
        return f"balancing: no router bias ({model_cfg.topk_method} routing){loss}"
    gamma = resolve_bias_update_speed(cfg, model_cfg)
    why = "--bias-update-speed" if cfg.bias_update_speed is not None else \
        f"scaled with the run: {BIAS_TRAVEL:g} over {bias_horizon(cfg.steps, cfg.warmup)} steps"
    return f"balancing: auxiliary-loss-free, bias update speed {gamma:g} ({why}){loss}"


def _weights_note(plan: RunPlan) -> str | None:
    if plan.init_from:
        return f"init: weights from {plan.init_from} (fine-tuning)"
    if plan.ignored_weights:
        return (f"note: training starts from scratch (random weights): only the config.json of "
                f"{plan.ignored_weights} is used; pass --init-from {plan.ignored_weights} to fine-tune its weights")
    return None


def _fp8_layers_note(cfg: TrainConfig, plan: RunPlan) -> str | None:
    """A BF16 run may take an FP8 run's --fp8-layers (TrainConfig: FP8's reference); say that it is unused."""
    if plan.precision == "fp8" or cfg.fp8_layers == TrainConfig.fp8_layers:
        return None
    return f"note: --fp8-layers {cfg.fp8_layers} is unused at precision {plan.precision} (no layer runs in FP8)"


def fp8_speed_note(precision: str, device: torch.device, hidden_size: int) -> str | None:
    """What a user choosing fp8 should expect of its speed, when it is not a speed-up."""
    if precision != "fp8":
        return None
    if device.type != "cuda":
        return ("note: fp8 on CPU runs the recipe's PyTorch reference (quantize, dequantize, matmul): it "
                "checks the numerics and is slower than fp32")
    if hidden_size < FP8_PAYS_FROM_HIDDEN:
        return (f"note: at hidden size {hidden_size} FP8 GEMMs do not beat BF16; with --fp8-layers auto only "
                f"layers about {FP8_PAYS_FROM_HIDDEN} wide or more run in FP8 (the list follows), so this run "
                "trains at about BF16's speed (docs/fp8.md, 'When FP8 pays')")
    return None


# ---- progress ----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when ``cfg.progress`` (default: stderr is a terminal), else a log line every
    ``log_interval`` steps with the mean loss, the mean MaxVio_batch of an MoE model (worst layer of each
    step's batch) and the tokens/s since the previous line."""

    def __init__(self, cfg: TrainConfig, start_step: int, log: Callable[[str], None], main: bool) -> None:
        self.cfg, self.log = cfg, log
        self.bar = _progress_bar(cfg, start_step) if main else None
        self.losses: list[float] = []
        self.maxvio: list[float] = []
        self.tokens, self.seconds = 0, 0.0

    def step(self, record: dict[str, Any], tokens: int, seconds: float) -> bool:
        """Show one training record; True when a log interval ends (a good moment to flush files)."""
        self.losses.append(record["loss"])
        if record.get("maxvio") is not None:
            self.maxvio.append(record["maxvio"])
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        tokens_per_s = self.tokens / self.seconds if self.seconds else 0.0
        if self.bar is not None:
            self.bar.update(1)
            balance = {"maxvio": f"{record['maxvio']:.2f}"} if record.get("maxvio") is not None else {}
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **balance, lr=f"{record['lr']:.2e}",
                                 tok_s=f"{tokens_per_s:.0f}", refresh=False)
        step = record["step"]
        if step % self.cfg.log_interval and step != self.cfg.steps:
            return False
        if self.bar is None:
            window = self.losses[-self.cfg.log_interval:]
            balance = f" | MaxVio {sum(self.maxvio) / len(self.maxvio):.2f}" if self.maxvio else ""
            self.log(f"step {step:>6}/{self.cfg.steps} | loss {sum(window) / len(window):.4f}{balance}"
                     f" | lr {record['lr']:.2e} | {tokens_per_s:,.0f} tok/s")
        self.losses, self.maxvio, self.tokens, self.seconds = [], [], 0, 0.0
        return True

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_evaluation(evaluation: Evaluation) -> str:
    """The balance part of an evaluation's progress line ('' for a dense model)."""
    if evaluation.maxvio is None:
        return ""
    return f" | MaxVio_global {evaluation.maxvio:.2f} (worst layer; mean {evaluation.maxvio_mean:.2f})"


def _progress_bar(cfg: TrainConfig, start_step: int) -> tqdm | None:
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    return tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


# ---- the end -----------------------------------------------------------------------------------


def summarise(cfg: TrainConfig, plan: RunPlan, metrics_path: str, tensorboard_dir: str | None, *, device: str,
              layout: dict | None, val_loss: float | None, train_seconds: float, checkpoint: str | None) -> dict:
    """The summary ``summary.json`` holds and the footer prints (rank 0: it reads ``metrics.jsonl``)."""
    plot = plot_loss_curve(metrics_path, os.path.join(plan.out_dir, PLOT_FILE), plan.entropy)
    records = read_metrics(metrics_path)
    final_loss, final_steps = recent_mean(records, "loss", FINAL_LOSS_WINDOW)
    steps_run = cfg.steps - plan.start_step
    summary = {
        "steps": cfg.steps,
        "steps_this_run": steps_run,
        "final_train_loss": final_loss,
        "final_train_loss_steps": final_steps,
        "final_val_loss": val_loss,
        "unigram_entropy_nats": plan.entropy,
        "unigram_entropy_bits": nats_to_bits(plan.entropy),
        "tokens_per_s": steps_run * cfg.batch_size * cfg.seq_len / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        **steady_throughput(records, plan.start_step, WARMUP_STEPS + 1 if plan.step_mode.compile or
                            plan.step_mode.cuda_graphs else 1),
        "device": device,
        "precision": plan.precision,
        "out_dir": plan.out_dir,
        "metrics": metrics_path,
        "plot": plot,
        "checkpoint": checkpoint,
        "tensorboard": tensorboard_dir,
        **({"bias_update_speed": resolve_bias_update_speed(cfg, plan.model_cfg)} if plan.model_cfg.is_moe else {}),
        **balance_summary(records),
        **peak_memory(device),
    }
    if layout is not None:
        summary["parallel"] = layout
    return summary


def steady_throughput(records: list[dict[str, Any]], start_step: int, skip: int) -> dict[str, Any]:
    """tokens/s of this run's steps after its first ``skip`` (which compile, capture a CUDA graph or warm
    the caches): what the run sustains. {} when too few steps ran."""
    steps = [r for r in records if r.get("type") == "train" and r["step"] > start_step + skip
             and r.get("tokens_per_s")]
    if not steps:
        return {}
    seconds = sum(1 / r["tokens_per_s"] for r in steps)  # seconds per token, summed: steps share a size
    return {"steady_tokens_per_s": len(steps) / seconds, "steady_from_step": steps[0]["step"]}


def balance_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The expert-load balance at the end of a run ({} for a dense model): MaxVio_batch (worst layer, and
    the mean over layers) averaged over the last FINAL_LOSS_WINDOW steps, and the last evaluation's
    MaxVio_global (all held-out tokens; worst layer and mean over layers)."""
    worst, steps = recent_mean(records, "maxvio", FINAL_LOSS_WINDOW)
    if worst is None:
        return {}
    evaluation = last_eval(records)
    return {"final_maxvio_batch": worst, "final_maxvio_batch_mean": recent_mean(records, "maxvio_mean",
                                                                                 FINAL_LOSS_WINDOW)[0],
            "final_maxvio_batch_steps": steps, "final_val_maxvio_global": evaluation.get("val_maxvio"),
            "final_val_maxvio_global_mean": evaluation.get("val_maxvio_mean")}


def _throughput_line(s: dict) -> str:
    if not s["tokens_per_s"]:
        return "throughput: n/a"
    overall = (f"{s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.1f} s of training steps "
               f"({s['wall_seconds']:.1f} s with evaluation and checkpoints)")
    if "steady_tokens_per_s" not in s:
        return f"throughput: {overall}"
    return (f"throughput: {s['steady_tokens_per_s']:,.0f} tokens/s from step {s['steady_from_step']} on; "
            f"{overall}, the first steps included")


def footer(s: dict) -> str:
    val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "n/a"
    train_loss = f"{s['final_train_loss']:.4f}" if s["final_train_loss"] is not None else "n/a"
    lines = [
        f"done: {s['steps']} steps; train loss {train_loss} (mean of the last {s['final_train_loss_steps']} "
        f"steps), val loss {val} nats vs unigram entropy {s['unigram_entropy_nats']:.4f} nats",
        _throughput_line(s),
        *_balance_lines(s),
        f"memory: {describe(s)}",
        f"metrics: {s['metrics']}",
        f"loss curve: {s['plot']}",
        f"checkpoint: {s['checkpoint'] or 'none written (--no-checkpoints)'}",
    ]
    if s["tensorboard"]:
        lines.append(f"tensorboard: {s['tensorboard']}")
    return "\n".join(lines)


def _balance_lines(s: dict) -> list[str]:
    if s.get("final_maxvio_batch") is None:
        return []
    val = s.get("final_val_maxvio_global")
    held_out = f"; MaxVio_global {val:.3f} over the held-out tokens" if val is not None else ""
    return [f"expert load: MaxVio_batch {s['final_maxvio_batch']:.3f} (worst MoE layer; mean over layers "
            f"{s['final_maxvio_batch_mean']:.3f}; last {s['final_maxvio_batch_steps']} steps){held_out}; "
            f"0 = every expert equally loaded"]
