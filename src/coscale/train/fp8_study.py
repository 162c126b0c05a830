"""FP8 vs BF16 accuracy study: the same model, seed and data trained in two precisions.

The DeepSeek-V3 report's claim is that fine-grained FP8 training keeps the loss within 0.25% (relative)
of BF16. This trains a reference run and an FP8 run with identical settings (same initial weights, same
batches: both come from `seed`), then compares the per-step training loss after warm-up. Per-step
losses are noisy, so the headline figure compares moving averages (window `smooth` steps); the raw
per-step difference is reported too, and the held-out loss at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from coscale.train.config import TrainConfig
from coscale.train.loop import train
from coscale.train.metrics import _moving_average, read_metrics
from coscale.train.report import steady_throughput


def compare_curves(reference: list[float], candidate: list[float], skip: int, smooth: int) -> dict[str, float]:
    """Relative differences |candidate - reference| / reference after the first `skip` steps."""
    n = min(len(reference), len(candidate))
    if n <= skip:
        raise ValueError(f"need more than {skip} steps to compare after warm-up, got {n}")
    ref_s, cand_s = _moving_average(reference[:n], smooth), _moving_average(candidate[:n], smooth)
    raw = [abs(c - r) / r for r, c in zip(reference[skip:n], candidate[skip:n])]
    smoothed = [abs(c - r) / r for r, c in zip(ref_s[skip:], cand_s[skip:])]
    signed = [(c - r) / r for r, c in zip(ref_s[skip:], cand_s[skip:])]
    tail = max(1, len(smoothed) // 5)
    return {
        "mean_rel_diff_smoothed": sum(smoothed) / len(smoothed),
        "max_rel_diff_smoothed": max(smoothed),
        "final_rel_diff_smoothed": sum(signed[-tail:]) / tail,  # signed: FP8 above BF16 is positive
        "mean_rel_diff_raw": sum(raw) / len(raw),
        "steps_compared": n - skip,
    }


def run_fp8_study(base: TrainConfig, out_dir: str, reference: str = "bf16", smooth: int = 20,
                  spread_seed: int | None = None, log=print) -> dict[str, Any]:
    """Train `base` in `reference` precision and in fp8 under out_dir/<precision>; compare and plot.
    ``spread_seed``: also train the reference with this seed (other initial weights and batches) and report
    the reference's own seed-to-seed difference beside FP8's (``reference_spread``): the yardstick for
    whether FP8's difference matters."""
    runs: dict[str, dict[str, Any]] = {}
    plan = [(reference, reference, base.seed), ("fp8", "fp8", base.seed)]
    if spread_seed is not None:
        plan.append((f"{reference}_seed{spread_seed}", reference, spread_seed))
    for name, precision, seed in plan:
        # every layer in FP8 (fp8_layers="all"): the study is about FP8's numerics, not its speed (the
        # reference keeps the default: it converts nothing, and a TrainConfig refuses "all" at fp32)
        cfg = dataclasses.replace(base, precision=precision, out_dir=os.path.join(out_dir, name), seed=seed,
                                  overwrite=True, resume=None,
                                  fp8_layers="all" if precision == "fp8" else TrainConfig.fp8_layers)
        log(f"== {name} run -> {cfg.out_dir}")
        summary = train(cfg, log=log)
        records = read_metrics(summary["metrics"])
        losses = [r["loss"] for r in records if r.get("type") == "train"]
        runs[name] = {"summary": summary, "losses": losses}
        _release_run_memory()
    warmup = base.warmup_steps if base.warmup_steps is not None else max(1, base.steps // 10)
    stats = compare_curves(runs[reference]["losses"], runs["fp8"]["losses"], skip=warmup, smooth=smooth)
    val_ref, val_fp8 = runs[reference]["summary"]["final_val_loss"], runs["fp8"]["summary"]["final_val_loss"]
    result = {
        "reference": reference,
        "steps": base.steps,
        "warmup_steps_skipped": warmup,
        "smooth_window": smooth,
        **stats,
        "val_loss": {reference: val_ref, "fp8": val_fp8},
        "val_rel_diff": (val_fp8 - val_ref) / val_ref if val_ref else None,
        "tokens_per_s": {p: runs[p]["summary"]["tokens_per_s"] for p in (reference, "fp8")},
        "steady_tokens_per_s": {p: runs[p]["summary"].get("steady_tokens_per_s") for p in (reference, "fp8")},
        "peak_gib": {p: runs[p]["summary"].get("peak_memory_allocated_gib", runs[p]["summary"].get("peak_rss_gib"))
                     for p in (reference, "fp8")},
        "goal": "relative loss difference < 0.25% (DeepSeek-V3 report)",
    }
    if spread_seed is not None:
        other = runs[f"{reference}_seed{spread_seed}"]
        result["reference_spread"] = {
            "seeds": [base.seed, spread_seed],
            **compare_curves(runs[reference]["losses"], other["losses"], skip=warmup, smooth=smooth),
            "val_loss": other["summary"]["final_val_loss"],
        }
        result["fp8_within_reference_spread"] = (
            result["mean_rel_diff_smoothed"] <= result["reference_spread"]["mean_rel_diff_smoothed"])
    tps = result["tokens_per_s"]
    if tps.get(reference) and tps.get("fp8"):
        result["fp8_speedup"] = tps["fp8"] / tps[reference]
    result["plot"] = plot_study(runs[reference]["losses"], runs["fp8"]["losses"], reference, warmup, smooth,
                                os.path.join(out_dir, "fp8_vs_" + reference + ".png"))
    with open(os.path.join(out_dir, "fp8_study.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def compare_metrics_files(reference: str, fp8: str, spread: str | None = None, skip: int = 30,
                          smooth: int = 20) -> dict[str, Any]:
    """The study's comparison from runs made separately (``coscale train`` metrics.jsonl files, e.g. one
    run per device session): FP8 against the reference over the steps both reached and, with ``spread``
    (the reference precision with another seed), the reference's own seed-to-seed difference over the same
    steps, plus each run's steady tokens/s (steps after ``skip``) and peak memory."""

    def load(path: str) -> list[dict[str, Any]]:
        return [r for r in read_metrics(path) if r.get("type") == "train"]

    runs = {"reference": load(reference), "fp8": load(fp8)}
    if spread is not None:
        runs["spread"] = load(spread)
    steps = min(len(r) for r in runs.values())
    losses = {name: [r["loss"] for r in records[:steps]] for name, records in runs.items()}
    result: dict[str, Any] = {"steps": steps, "fp8": compare_curves(losses["reference"], losses["fp8"], skip, smooth)}
    if spread is not None:
        result["spread"] = compare_curves(losses["reference"], losses["spread"], skip, smooth)
        result["fp8_within_reference_spread"] = (result["fp8"]["mean_rel_diff_smoothed"]
                                                 <= result["spread"]["mean_rel_diff_smoothed"])
    for name, records in runs.items():
        result[f"{name}_steady_tokens_per_s"] = steady_throughput(records, 0, skip).get("steady_tokens_per_s")
        result[f"{name}_peak_gib"] = max((r.get("peak_memory_allocated_gib") or 0 for r in records), default=None)
    return result


def _release_run_memory() -> None:
    """Free what a finished run left on the GPU before the next: torch.compile's caches guard on (and so
    keep alive) the run's model, and its CUDA-graph pool stays reserved; at V3's width one run's
    85 GiB would not leave room for the next."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plot_study(ref: list[float], fp8: list[float], ref_name: str, warmup: int, smooth: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(ref), len(fp8))
    steps = list(range(1, n + 1))
    ref_s, fp8_s = _moving_average(ref[:n], smooth), _moving_average(fp8[:n], smooth)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(steps, ref[:n], color="tab:blue", alpha=0.25, linewidth=0.8)
    ax1.plot(steps, fp8[:n], color="tab:red", alpha=0.25, linewidth=0.8)
    ax1.plot(steps, ref_s, color="tab:blue", label=f"{ref_name} ({smooth}-step average)")
    ax1.plot(steps, fp8_s, color="tab:red", label=f"fp8 ({smooth}-step average)")
    ax1.set_ylabel("training loss (nats)")
    ax1.legend()
    rel = [100 * (f - r) / r for r, f in zip(ref_s, fp8_s)]
    ax2.plot(steps[warmup:], rel[warmup:], color="black")
    ax2.axhline(0.25, color="gray", linestyle="--")
    ax2.axhline(-0.25, color="gray", linestyle="--")
    ax2.set_ylabel("fp8 vs ref (%)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
