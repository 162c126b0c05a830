"""Run metrics: a JSONL log, TensorBoard scalars when TensorBoard is installed, a loss-curve PNG (with
a panel of the expert-load balance, MaxVio, for an MoE model).

``metrics.jsonl`` holds one JSON object per line: ``{"type": "train", "step": ..., "loss": ...}``
for training steps, ``{"type": "eval", ...}`` for held-out evaluations, and one ``{"type": "run", ...}``
header per (re)start. Steps are 1-based counts of optimizer steps taken. On resume the lines beyond
the checkpoint's step are dropped, so the file describes the run that the checkpoint continues.

Durability: the trainer calls :meth:`MetricsLogger.sync` (flush and fsync) before it publishes a
checkpoint, so every record up to a checkpoint's step is on disk whenever that checkpoint is; a
process killed later loses at most records that the resume from that checkpoint would drop anyway.
A write that fails (a full disk) is a one-line :class:`coscale.errors.OutputError` naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from coscale.errors import writing

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` and mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: str, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        with writing(self.path):
            if resume_step is not None:
                truncate_after(self.path, resume_step)
            elif os.path.exists(self.path):
                os.remove(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        self.tensorboard_dir = None
        self._writer = None
        if tensorboard:
            self._writer = _summary_writer(os.path.join(run_dir, TENSORBOARD_DIR))
            if self._writer is not None:
                self.tensorboard_dir = os.path.join(run_dir, TENSORBOARD_DIR)

    def log(self, record: dict[str, Any]) -> None:
        with writing(self.path):
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None and "step" in record:
            kind = record.get("type", "train")
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, dict):  # one scalar per entry (per-layer MaxVio: train/maxvio_layers/layer1)
                    for sub, v in value.items():
                        if _is_scalar(v):
                            self._writer.add_scalar(f"{kind}/{key}/{sub}", v, record["step"])
                elif _is_scalar(value):
                    self._writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def flush(self) -> None:
        with writing(self.path):
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def sync(self) -> None:
        """Flush and fsync: every record logged so far is on disk (call before publishing a checkpoint)."""
        self.flush()
        with writing(self.path):
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with writing(self.path):
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=log_dir)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a line cut short by a crash is skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after(path: str, step: int) -> None:
    """Drop records of steps after ``step`` (written after the checkpoint a run resumes from)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recent_mean(records: list[dict[str, Any]], key: str, window: int) -> tuple[float | None, int]:
    """Mean of ``key`` over the last ``window`` training records that have it (not null), and their count."""
    values = [r[key] for r in records if r.get("type") == "train" and r.get(key) is not None]
    recent = values[-window:]
    return (sum(recent) / len(recent) if recent else None), len(recent)


def last_eval(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest evaluation record ({} when there is none)."""
    evals = [r for r in records if r.get("type") == "eval"]
    return evals[-1] if evals else {}


def plot_loss_curve(metrics_path: str, png_path: str, unigram_entropy: float | None = None) -> str:
    """Training and validation loss against step, with the unigram-entropy baseline, and below it, for an
    MoE model, the expert-load balance (MaxVio) against step; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    balance = any(r.get("maxvio") is not None for r in records if r.get("type") == "train")
    fig = Figure(figsize=(7, 7.2 if balance else 4.2), dpi=120)
    FigureCanvasAgg(fig)
    if balance:
        loss_ax, balance_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        _plot_balance(balance_ax, records)
    else:
        loss_ax = fig.add_subplot(1, 1, 1)
    _plot_losses(loss_ax, records, unigram_entropy)
    fig.tight_layout()
    with writing(png_path):
        fig.savefig(png_path)
    return png_path


def _plot_losses(ax, records: list[dict[str, Any]], unigram_entropy: float | None) -> None:
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.8, alpha=0.5, color="tab:blue", label="train loss")
        ax.plot(steps, _moving_average(losses, 25), lw=1.6, color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", ms=3, color="tab:orange", label="validation loss")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, ls="--", color="gray", label=f"unigram entropy ({unigram_entropy:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_balance(ax, records: list[dict[str, Any]]) -> None:
    """MaxVio per training batch (worst MoE layer, raw and smoothed; mean over layers smoothed) and
    MaxVio_global of each evaluation (all held-out tokens, worst layer); 0 is a perfectly even load."""
    worst = [(r["step"], r["maxvio"]) for r in records if r.get("type") == "train" and r.get("maxvio") is not None]
    mean = [(r["step"], r["maxvio_mean"]) for r in records
            if r.get("type") == "train" and r.get("maxvio_mean") is not None]
    val = [(r["step"], r["val_maxvio"]) for r in records if r.get("type") == "eval" and r.get("val_maxvio") is not None]
    steps, values = zip(*worst)
    ax.plot(steps, values, lw=0.8, alpha=0.4, color="tab:red", label="MaxVio_batch, worst layer")
    ax.plot(steps, _moving_average(values, 25), lw=1.6, color="tab:red", label="worst layer (smoothed)")
    if mean:
        steps, values = zip(*mean)
        ax.plot(steps, _moving_average(values, 25), lw=1.2, color="tab:purple", label="mean over layers (smoothed)")
    if val:
        steps, values = zip(*val)
        ax.plot(steps, values, "o-", ms=3, color="tab:green", label="MaxVio_global, held-out, worst layer")
    ax.axhline(0.0, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (max load / mean - 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _moving_average(values: tuple[float, ...], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
