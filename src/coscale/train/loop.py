"""The training loop behind ``coscale train``: :class:`TrainConfig` in, a summary dict out.

    with open_world(cfg) as world:               # one process, or this rank of torchrun's EP x DP world
        plan = plan_run(cfg, world)              # every check and read; nothing written yet
        model, optimizer, sampler = build(...)   # initial or resumed state, placed on the world
        for step ...:
            metrics = train_step(...)            # device tensors, no host sync
            readout.push(step, metrics)          # read a step late: log, check finite
            evaluate / drain + save at their intervals

One step (:mod:`coscale.train.step`): draw a batch of random windows, ``compute_loss`` (next-token +
MTP + sequence-wise balance loss) under BF16 autocast on CUDA (FP32 on CPU, or FP8 through
``coscale.fp8.convert_to_fp8``), backward, clip, AdamW (FP32 master weights, FP32 or BF16 moments),
then the auxiliary-loss-free router bias update from the expert loads the step recorded.

Determinism: the model is initialised from ``seed``, batches come from a generator seeded with
``seed`` whose state is checkpointed with the global RNG state, and the learning rate is a function
of the step. On CPU, ``N`` steps equal ``k`` steps + save + resume + ``N - k`` steps bit for bit.

Several processes (torchrun sets ``WORLD_SIZE`` > 1): expert parallelism (EP) x data parallelism (DP)
through :class:`coscale.parallel.world.Distributed`. Every rank draws the same global batch and trains
on its rows; rank 0 alone prints and writes; checkpoints have the single-process format and resume at
any EP size. Every step before the first write ends on every rank with the same one-line error if it
fails on any rank.

Durability: before a checkpoint is published, every pending step's metrics are read and checked
(a diverged model is never saved) and ``metrics.jsonl`` is flushed and fsync'ed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from coscale.errors import writing
from coscale.fp8 import describe_fp8_layers
from coscale.parallel.world import World
from coscale.train import checkpointing as ckpt
from coscale.train import run_dir
from coscale.train.balance import resolve_bias_update_speed
from coscale.train.config import TrainConfig, with_resolved_lr
from coscale.train.data import eval_batches
from coscale.train.memory import check_state_fits, device_total_bytes, out_of_memory_error, run_state_bytes, state_note
from coscale.train.metrics import MetricsLogger
from coscale.train.readout import StepReadout, TrainingDiverged, check_finite
from coscale.train.report import Progress, describe_evaluation, footer, header, summarise
from coscale.train.schedule import lr_at
from coscale.train.setup import (
    RunPlan,
    Trainee,
    build,
    compat_fields,
    default_out_dir,
    open_world,
    plan_run,
    torch_threads,
    trainer_state,
)
from coscale.train.step import autocast_for, evaluate
from coscale.train.step_runner import StepRunner

__all__ = ["TrainConfig", "TrainingDiverged", "train"]


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (losses, entropy, throughput, paths).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same ``cfg``; each returns the
    same summary, and rank 0 alone logs and writes.
    """
    cfg = with_resolved_lr(cfg)  # every rank the same: from the model config alone
    with open_world(cfg) as world:
        if not cfg.out_dir and not cfg.resume:  # one timestamped directory: rank 0's
            cfg = dataclasses.replace(cfg, out_dir=world.broadcast(default_out_dir()))
        plan = world.agree(lambda: plan_run(cfg, world))
        world.check_same(plan.resolved_config, "training config (options given to coscale train)")
        with torch_threads(cfg.threads):
            trainee = build(cfg, plan, world)
            metrics = world.agree(lambda: _start_run_dir(cfg, plan) if world.is_main else _NoMetrics())
            try:
                return _Run(cfg, plan, world, trainee, metrics, log if world.is_main else _silent).run()
            finally:
                metrics.close()


def _start_run_dir(cfg: TrainConfig, plan: RunPlan) -> MetricsLogger:
    """The first writes of a run: its directory, its config, its metrics file (rank 0)."""
    run_dir.prepare_out_dir(plan.out_dir, plan.resolved_config, clear=cfg.overwrite and not plan.resume_dir)
    return MetricsLogger(plan.out_dir, resume_step=plan.start_step if plan.resume_dir else None,
                         tensorboard=cfg.tensorboard)


def _silent(_message: str) -> None:
    pass


class _NoMetrics:
    """What ranks other than 0 log to."""

    path = tensorboard_dir = None

    def log(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Run:
    """The steps of one run, their metrics, evaluations and checkpoints."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, world: World, trainee: Trainee, metrics, log) -> None:
        self.cfg, self.plan, self.world, self.trainee, self.metrics, self.log = cfg, plan, world, trainee, metrics, log
        self.autocast = autocast_for(plan.precision, world.device)
        self.gamma = resolve_bias_update_speed(cfg, plan.model_cfg)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.val_batches = eval_batches(plan.split.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        self.readout = StepReadout(lag=1)
        self.runner = StepRunner(trainee.model, trainee.optimizer, world, plan.step_mode, gamma=self.gamma,
                                 grad_clip=cfg.grad_clip, autocast=self.autocast)
        self.progress = Progress(cfg, trainee.start_step, log, main=world.is_main)
        self.train_seconds, self.val_loss, self.last_saved = 0.0, None, None

    def run(self) -> dict[str, Any]:
        wall_start = time.perf_counter()
        cfg, plan, layout = self.cfg, self.plan, self.world.layout()
        self.metrics.log({"type": "run", "step": plan.start_step, "resumed_from": plan.resume_dir,
                          "model_name": plan.model_name, "init_from": plan.init_from,
                          "unigram_entropy": plan.entropy, "device": str(self.world.device),
                          "precision": plan.precision, **({"parallel": layout} if layout else {})})
        weights, grads, moments = run_state_bytes(self.trainee.model, self.trainee.optimizer, cfg.adam_moments_dtype)
        total = device_total_bytes(self.world.device)
        self.log(header(cfg, plan, self.world.device, layout, state_note(weights, grads, moments, total)))
        if plan.precision == "fp8":
            self.log(describe_fp8_layers(self.trainee.model, cfg.fp8_layers))
        check_state_fits(weights, grads, moments, total, cfg.adam_moments_dtype)  # (before minutes of compiling)
        step = self.trainee.start_step
        try:
            for step in range(self.trainee.start_step, cfg.steps):
                self._step(step)
                done = step + 1
                if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.steps:
                    self._evaluate(done)
                if cfg.checkpoints and ((cfg.save_interval and done % cfg.save_interval == 0) or done == cfg.steps):
                    self._save(done)
            self._record(self.readout.drain())
        except torch.OutOfMemoryError as exc:  # one message that says what to change, not a traceback
            raise out_of_memory_error(exc, step + 1, self.world.device, cfg.adam_moments_dtype, moments) from exc
        finally:
            self.progress.close()
        self.metrics.sync()
        summary = None
        if self.world.is_main:
            summary = summarise(cfg, plan, self.metrics.path, self.metrics.tensorboard_dir,
                                device=str(self.world.device), layout=layout, val_loss=self.val_loss,
                                train_seconds=self.train_seconds, checkpoint=self.last_saved)
            summary["wall_seconds"] = time.perf_counter() - wall_start
            path = os.path.join(plan.out_dir, run_dir.SUMMARY_FILE)
            with writing(path), open(path, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
            self.log(footer(summary))
        return self.world.broadcast(summary)  # every rank returns rank 0's summary

    def _step(self, step: int) -> None:
        """Launch step ``step + 1`` and log the steps whose metrics have arrived meanwhile."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup, self.cfg.steps, self.cfg.final_lr)
        metrics = self.runner(self.trainee.sampler.next_batch(), lr)
        self.readout.push(step + 1, metrics)
        arrived = self.readout.ready()  # waits for the previous step, not this one
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        self.readout.note(step + 1, lr=lr, seconds=seconds)
        self._record(arrived)

    def _record(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            check_finite(record, self.last_saved or self.plan.resume_dir)
            seconds = record.pop("seconds")
            record["tokens_per_s"] = self.tokens_per_step / seconds
            self.metrics.log(record)
            if self.progress.step(record, self.tokens_per_step, seconds):
                self.metrics.flush()

    def _evaluate(self, step: int) -> None:
        self._record(self.readout.drain())  # the log shows step N's loss before its evaluation
        evaluation = evaluate(self.trainee.model, self.val_batches, self.world, self.autocast)
        self.val_loss = evaluation.loss
        self.metrics.log({"type": "eval", "step": step, **evaluation.record(), "unigram_entropy": self.plan.entropy})
        self.progress.write(f"step {step:>6} | val loss {self.val_loss:.4f} nats "
                            f"(unigram entropy {self.plan.entropy:.4f})" + describe_evaluation(evaluation))

    def _save(self, step: int) -> None:
        """Drain and check every pending step, make the metrics durable, then save (collective: every rank
        gathers its experts and their moments; rank 0 writes the single-process format)."""
        self._record(self.readout.drain())
        self.metrics.sync()
        cfg, plan, world, trainee = self.cfg, self.plan, self.world, self.trainee
        meta = compat_fields(cfg, plan.model_cfg, plan.precision, plan.data_info)  # what a resume checks
        meta |= {"train_config": plan.resolved_config, "model_name": plan.model_name}
        layout = world.layout()
        if layout:
            meta["parallel"] = layout
        model_state = world.model_state(trainee.model)
        optimizer_state = world.optimizer_state(trainee.optimizer, trainee.model)
        for group in optimizer_state["param_groups"]:  # a CUDA-graphed run's device-tensor learning rate
            if torch.is_tensor(group.get("lr")):
                group["lr"] = float(group["lr"])
        trainer = trainer_state(world, trainee.sampler)

        def write() -> str | None:
            if not world.is_main:
                return None
            return ckpt.save_checkpoint(plan.out_dir, step, model_state, optimizer_state, trainer, meta,
                                        keep=cfg.keep_checkpoints)

        self.last_saved = world.broadcast(world.agree(write))
