"""Load-balancing study: auxiliary-loss-free balancing against the auxiliary-loss baseline (CPU).

    PYTHONPATH=src python3 benchmarks/balance_study.py --quick --jobs 2    # about 1.5 minutes on 2 cores
    PYTHONPATH=src python3 benchmarks/balance_study.py --jobs 2            # the full study (about 1.5 hours)

The DeepSeek-V3 report's ablation (section 4.5.2, after Wang et al. 2024) trains the same model with
auxiliary-loss-free balancing and with an auxiliary balance loss and finds the former better balanced
(lower MaxVio) at equal or lower validation loss. This script repeats that comparison on the ``tiny``
preset with the embedded corpus, the same seeds and batches for every method:

- ``none``: no balancing (bias updates off, no balance loss);
- ``aux-free``: auxiliary-loss-free balancing with coscale's default bias update speed (scaled with the
  run, ``coscale.train.balance.default_bias_update_speed``); ``aux-free-g0.001`` the fixed gamma of the
  paper (which suits 10^5 steps, not a few hundred);
- ``seq-aux-a<alpha>``: the sequence-wise balance loss (the model's ``aux_loss_alpha``), bias updates
  off; ``batch-aux-a<alpha>``: the same loss over the whole batch, bias updates off. Several alphas:
  the baseline is the best-tuned one.

Every method trains with the DeepSeek-V3 recipe otherwise (MTP, AdamW, warm-up + cosine); aux-free
runs carry no balance loss at all (``aux_loss_alpha`` 0), so they compare a bias against a loss.

Reported per method (mean over seeds, and the spread): validation loss over fixed held-out batches;
MaxVio_batch (per-layer MaxVio of each training batch, averaged over layers, then over all steps and
over the last fifth of the run); MaxVio_batch of the held-out batches; MaxVio_global over the whole
held-out set (the paper's measure); the worst layer's MaxVio_global. Prints a table and appends one line
(the conditions, the table, every run's per-step figures) to ``benchmarks/results/balance_study.jsonl``
(results_log.py), saved after every finished run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass

import torch

from coscale.config import get_preset
from coscale.model import DeepseekForCausalLM, update_router_biases
from coscale.model.moe import sequence_balance_loss
from coscale.train.balance import counting_expert_loads, default_bias_update_speed, max_violation, moe_gates
from coscale.train.data import BatchSampler, eval_batches, load_tokens, split_tokens
from coscale.train.optim import build_optimizer
from coscale.train.schedule import lr_at
from results_log import ResultsLog


@dataclass(frozen=True)
class Run:
    """The shape of one training run (every method and seed trains with it)."""

    model: str = "tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    eval_batches: int = 8

    @property
    def warmup(self) -> int:
        return self.steps // 10


@dataclass(frozen=True)
class Method:
    """A balancing method: bias update speed (None: coscale's default), balance-loss weight and kind."""

    name: str
    gamma: float | None = 0.0
    alpha: float = 0.0
    loss: str = "none"  # "none", "sequence" (the model's own loss), "batch" (one sequence per batch)


def parse_method(name: str) -> Method:
    """``none``, ``aux-free``, ``aux-free-g<gamma>``, ``seq-aux-a<alpha>``, ``batch-aux-a<alpha>``."""
    if name == "none":
        return Method(name)
    if name == "aux-free":
        return Method(name, gamma=None)
    for prefix, field, loss in (("aux-free-g", "gamma", "none"), ("seq-aux-a", "alpha", "sequence"),
                                ("batch-aux-a", "alpha", "batch")):
        if name.startswith(prefix):
            try:
                value = float(name[len(prefix):])
            except ValueError:
                break
            return Method(name, loss=loss, **{field: value})
    raise SystemExit(f"balance_study.py: error: unknown method {name!r} (none, aux-free, aux-free-g<gamma>, "
                     "seq-aux-a<alpha>, batch-aux-a<alpha>)")


QUICK_METHODS = ("none", "aux-free", "aux-free-g0.001", "seq-aux-a0.01", "batch-aux-a0.01")
FULL_METHODS = ("none", "aux-free", "aux-free-g0.001", "seq-aux-a0.001", "seq-aux-a0.01", "seq-aux-a0.1",
                "batch-aux-a0.01", "batch-aux-a0.1")


# ---- one run ---------------------------------------------------------------------------------------


class BatchBalanceLoss:
    """The balance loss over the whole batch (Wang et al.'s f_i P_i with every token of the batch as one
    sequence), collected from the routers' outputs by forward hooks; alpha times its sum over layers."""

    def __init__(self, model: torch.nn.Module, alpha: float, top_k: int) -> None:
        self.alpha, self.top_k, self.terms = alpha, top_k, []
        self.handles = [gate.register_forward_hook(self._hook) for _, gate in moe_gates(model)]

    def _hook(self, _gate, _inputs, outputs) -> None:
        topk_idx, _weights, scores = outputs
        self.terms.append(sequence_balance_loss(scores, topk_idx, 1, self.top_k))

    def take(self) -> torch.Tensor:
        loss, self.terms = self.alpha * torch.stack(self.terms).sum(), []
        return loss


def say(message: str) -> None:
    print(message, flush=True)


def train_one(run: Run, method: Method, seed: int, tokens, log=say) -> dict:
    """Train ``run`` with ``method`` from ``seed``; the per-step MaxVio_batch and the held-out results."""
    alpha_seq = method.alpha if method.loss == "sequence" else 0.0
    cfg = get_preset(run.model, aux_loss_alpha=alpha_seq, seq_aux=alpha_seq > 0)
    gamma = default_bias_update_speed(run.steps, run.warmup) if method.gamma is None else method.gamma
    split = split_tokens(tokens, 0.05, run.seq_len)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg).train()
    optimizer = build_optimizer(model, lr=run.lr)
    sampler = BatchSampler(split.train, run.batch_size, run.seq_len, seed)
    batch_loss = BatchBalanceLoss(model, method.alpha, cfg.num_experts_per_tok) if method.loss == "batch" else None
    maxvio_steps, losses, t0 = [], [], time.perf_counter()
    for step in range(run.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, run.lr, run.warmup, run.steps, run.lr / 10)
        input_ids, labels = sampler.next_batch()
        with counting_expert_loads(model) as loads:
            out = model.compute_loss(input_ids, labels)
        loss = out.loss + batch_loss.take() if batch_loss else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_router_biases(model, gamma)
        maxvio_steps.append(max_violation(loads).tolist())
        losses.append(out.main_loss.item())
        if (step + 1) % max(1, run.steps // 4) == 0:
            log(f"  {method.name} seed {seed}: step {step + 1}/{run.steps} loss {losses[-1]:.3f} "
                f"MaxVio_batch {statistics.fmean(maxvio_steps[-1]):.2f} ({time.perf_counter() - t0:.0f} s)")
    held_out = evaluate(model, eval_batches(split.val, run.batch_size, run.seq_len, run.eval_batches))
    return {"method": method.name, "seed": seed, "gamma": gamma, "alpha": method.alpha, "loss_kind": method.loss,
            "train_loss": losses, "maxvio_batch_steps": maxvio_steps, "seconds": time.perf_counter() - t0,
            **held_out}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> dict:
    """Validation loss; MaxVio_batch of each held-out batch and MaxVio_global over all of them (per layer)."""
    model.eval()
    total, count, per_batch = 0.0, 0, []
    with counting_expert_loads(model) as loads:
        for input_ids, labels in batches:
            before = loads.clone()
            logits = model(input_ids)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += labels.numel()
            per_batch.append(max_violation(loads - before).tolist())
    model.train()
    ran = (loads.sum(1) > 0).tolist()  # the MTP module does not run in evaluation: its router saw nothing
    return {"val_loss": total / count, "val_maxvio_batch": [[v for v, r in zip(row, ran) if r] for row in per_batch],
            "val_maxvio_global": [v for v, r in zip(max_violation(loads).tolist(), ran) if r],
            "val_layers": [label for (label, _), r in zip(moe_gates(model), ran) if r],
            "train_layers": [label for label, _ in moe_gates(model)]}


# ---- summary ---------------------------------------------------------------------------------------


def summarise(record: dict) -> dict:
    """One run's figures: MaxVio averaged over layers unless it says worst layer."""
    steps = [statistics.fmean(row) for row in record["maxvio_batch_steps"]]
    tail = steps[-max(1, len(steps) // 5):]
    return {"val_loss": record["val_loss"],
            "maxvio_batch_train": statistics.fmean(steps), "maxvio_batch_train_last_fifth": statistics.fmean(tail),
            "maxvio_batch_val": statistics.fmean(statistics.fmean(row) for row in record["val_maxvio_batch"]),
            "maxvio_global_val": statistics.fmean(record["val_maxvio_global"]),
            "maxvio_global_val_worst_layer": max(record["val_maxvio_global"])}


COLUMNS = (("val_loss", "val loss", 4), ("maxvio_batch_train", "MaxVio_batch train", 3),
           ("maxvio_batch_train_last_fifth", "last fifth", 3), ("maxvio_batch_val", "MaxVio_batch held-out", 3),
           ("maxvio_global_val", "MaxVio_global held-out", 3),
           ("maxvio_global_val_worst_layer", "worst layer", 3))


def table(records: list[dict], methods: list[str]) -> tuple[str, dict]:
    """A markdown table of the mean (and the min-max over seeds) of each figure per method."""
    rows, by_method = [], {}
    head = "| method | gamma | alpha | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rows += [head, "|" + "---|" * (3 + len(COLUMNS))]
    for name in methods:
        runs = [r for r in records if r["method"] == name]
        if not runs:
            continue
        figures = [summarise(r) for r in runs]
        stats = {key: {"mean": statistics.fmean(f[key] for f in figures),
                       "min": min(f[key] for f in figures), "max": max(f[key] for f in figures)}
                 for key, _, _ in COLUMNS}
        by_method[name] = stats
        cells = []
        for key, _, digits in COLUMNS:
            s = stats[key]
            spread = f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})" if len(runs) > 1 else ""
            cells.append(f"{s['mean']:.{digits}f}{spread}")
        rows.append(f"| {name} | {runs[0]['gamma']:g} | {runs[0]['alpha']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows), by_method


def verdict(by_method: dict) -> str:
    """Does aux-loss-free balancing beat the aux-loss baselines on MaxVio_global at equal or lower loss?
    Against the best-loss baseline (the tuned alpha) and the best-balanced one. Losses count as equal
    when their means differ by less than the larger seed-to-seed range of the two (one seed: strictly)."""
    free = by_method.get("aux-free")
    baselines = {k: v for k, v in by_method.items() if "-aux-" in k}
    if not free or not baselines:
        return "no verdict: needs aux-free and at least one aux-loss method"
    lines = []
    for what, key in (("best-loss", "val_loss"), ("best-balanced", "maxvio_global_val")):
        name = min(baselines, key=lambda k: baselines[k][key]["mean"])
        b = baselines[name]
        tolerance = max(s["val_loss"]["max"] - s["val_loss"]["min"] for s in (free, b))
        diff = free["val_loss"]["mean"] - b["val_loss"]["mean"]
        loss = "lower" if diff < -tolerance else "higher" if diff > tolerance else "equal"
        lower_vio = free["maxvio_global_val"]["mean"] < b["maxvio_global_val"]["mean"]
        lines.append(
            f"vs the {what} aux-loss baseline {name}: MaxVio_global {free['maxvio_global_val']['mean']:.3f} vs "
            f"{b['maxvio_global_val']['mean']:.3f} ({'lower' if lower_vio else 'not lower'}), val loss "
            f"{free['val_loss']['mean']:.4f} vs {b['val_loss']['mean']:.4f} ({loss}: difference {diff:+.4f}, seed "
            f"range {tolerance:.4f}) -> aux-free {'wins' if lower_vio and loss != 'higher' else 'does not win'}")
    return "\n".join(lines)


# ---- the study -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 steps of 8 x 64 tokens, 1 seed, 5 methods")
    p.add_argument("--methods", nargs="+", help="override the method list")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 (quick) or 0 1 2")
    p.add_argument("--steps", type=int)
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a shared machine)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    p.add_argument("--out", help="folder of balance_study.jsonl (default: benchmarks/results)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = ResultsLog("balance_study", a.out)  # the run's conditions (commit, date, versions) are taken now
    run = Run(model=a.model, steps=60, batch_size=8, seq_len=64) if a.quick else Run(model=a.model)
    if a.steps:
        run = Run(**{**run.__dict__, "steps": a.steps})
    methods = list(a.methods or (QUICK_METHODS if a.quick else FULL_METHODS))
    parsed = [parse_method(m) for m in methods]
    seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    tokens = load_tokens(None, get_preset(run.model).vocab_size)
    say(f"{run}; seeds {seeds}; default gamma for this run {default_bias_update_speed(run.steps, run.warmup):g}")
    meta = {"mode": "quick" if a.quick else "full", "device": f"CPU ({os.cpu_count()} cores), {a.threads} torch "
            f"thread(s) per run, {a.jobs} run(s) at once", "shape": run.__dict__, "methods": methods, "seeds": seeds}
    jobs = [(run, method, seed, tokens) for method in parsed for seed in seeds]
    records = []
    with _runner(a.jobs, a.threads) as starmap:
        for record in starmap(train_one, jobs):  # in job order, each saved as it arrives
            records.append(record)
            log.save(**meta, records=records)
    text, by_method = table(records, methods)
    result = {**meta, "summary": by_method, "verdict": verdict(by_method), "table": text, "records": records}
    say(f"{text}\n{result['verdict']}\nappended to {log.save(**result)}")
    return result


@contextlib.contextmanager
def _runner(jobs: int, threads: int):
    """An ordered lazy starmap: in this process, or over ``jobs`` processes (spawned: no fork of a process
    that holds torch's threads), each with ``threads`` torch threads."""
    if jobs <= 1:
        yield lambda fn, args: (fn(*a) for a in args)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=torch.set_num_threads,
                                                   initargs=(threads,)) as pool:
        yield lambda fn, args: pool.imap(_call, [(fn, a) for a in args])


def _call(fn_args):
    fn, args = fn_args
    return fn(*args)


if __name__ == "__main__":
    main()
