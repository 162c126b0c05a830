"""Accuracy per byte of the combine's wire formats: BF16, E4M3, E5M2, LogFMT-8, LogFMT-10 (issue 16).

    PYTHONPATH=src python3 benchmarks/codec_study.py --quick     # tiny model on the CPU, a few minutes
    PYTHONPATH=src python3 benchmarks/codec_study.py --model small --steps 300 --device cuda

1. Capture: train the model a few steps with an exact (fp32) combine, then record, on one more batch,
   what the combine sends: the gate-weighted expert outputs (forward) and the gradients that travel
   back through it (backward). The routed experts run as coscale.parallel.ExpertParallelExperts on a
   single process (ep=None), whose combine encodes and decodes with the chosen codec exactly as on the
   wire, so the captured rows are the real ones.
2. Per codec: bytes per element on the wire (codes + scales / tile numbers, H = the model's hidden size)
   and the relative L2 error ||decode(encode(x)) - x|| / ||x|| of the captured activations and gradients
   (and the mean over rows of the per-row relative error).
3. Per codec: train the same run (same seed, batches and initial weights) with that codec on the combine
   (forward and backward; the dispatch stays fp32) and report the final training loss (mean of the last
   10 %) and the validation loss, against the fp32 run.
4. The noise floor: ``--noise-runs`` more fp32 runs, identical in every input. On a GPU they still differ
   (atomic adds in the scatter and index kernels sum in a varying order) and a few hundred steps
   amplify that, so a codec's loss difference means something only where it exceeds the spread of the
   fp32 runs (on the CPU they repeat exactly).

Prints the error table after the capture, one line per training run as it ends (a run cut short by a
time limit keeps what finished), the whole table last, and appends one line to
benchmarks/results/codec_study.jsonl (results_log.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.model import DeepseekForCausalLM
from coscale.parallel import apply_expert_parallel, get_codec
from coscale.train.data import BatchSampler, eval_batches, load_tokens, split_tokens
from coscale.train.optim import build_optimizer
from coscale.train.schedule import lr_at
from results_log import ResultsLog

CODECS = ("bf16", "fp8", "fp8_e5m2", "logfmt8", "logfmt10")


class Recorder:
    """A codec that records the rows it encodes (under ``phase``) and passes them on exactly (fp32)."""

    name = "recorder"

    def __init__(self):
        self.inner = get_codec("fp32")
        self.phase = None
        self.rows: dict[str, list[torch.Tensor]] = {"activations": [], "gradients": []}

    def bytes_per_row(self, hidden):
        return self.inner.bytes_per_row(hidden)

    def encode(self, x):
        if self.phase is not None:
            self.rows[self.phase].append(x.detach().float().flatten(1).cpu())
        return self.inner.encode(x)

    def decode(self, payload, hidden, dtype):
        return self.inner.decode(payload, hidden, dtype)


def build(args, combine_codec, device):
    cfg = get_preset(args.model)
    torch.manual_seed(args.seed)
    model = DeepseekForCausalLM(cfg).to(device).train()
    apply_expert_parallel(model, None, dispatch_codec="fp32", combine_codec=combine_codec)
    return model, build_optimizer(model, lr=args.lr)


def train(args, combine_codec, split, device, steps, log=None):
    model, optimizer = build(args, combine_codec, device)
    sampler = BatchSampler(split.train, args.batch_size, args.seq_len, args.seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, max(1, args.steps // 10), args.steps, args.lr / 10)
        input_ids, labels = (t.to(device) for t in sampler.next_batch())
        out = model.compute_loss(input_ids, labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.main_loss.detach())  # read at the end: no host synchronisation per step
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"  {getattr(combine_codec, 'name', combine_codec)}: step {step + 1}/{steps} loss "
                f"{losses[-1].item():.4f}")
    return model, sampler, torch.stack(losses).tolist() if losses else []


@torch.no_grad()
def val_loss(model, batches, device):
    model.eval()
    total, count = 0.0, 0
    for input_ids, labels in batches:
        logits = model(input_ids.to(device))
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(),
                                                   reduction="sum").item()
        count += labels.numel()
    model.train()
    return total / count


def capture(args, split, device):
    """(activations [N, H], gradients [N, H]) the combine carries, after args.capture_steps fp32 steps."""
    rec = Recorder()
    model, sampler, _ = train(args, rec, split, device, args.capture_steps)
    input_ids, labels = (t.to(device) for t in sampler.next_batch())
    rec.phase = "activations"
    out = model.compute_loss(input_ids, labels)
    rec.phase = "gradients"
    out.loss.backward()
    return {k: torch.cat(v) for k, v in rec.rows.items()}


def codec_error(codec, x):
    y = codec.decode(codec.encode(x), x.shape[1], torch.float32)
    err = (y.double() - x.double())
    per_row = err.norm(dim=1) / x.double().norm(dim=1).clamp_min(1e-300)
    nz = x.double().norm(dim=1) > 0
    return (err.norm() / x.double().norm()).item(), per_row[nz].mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps of 8 x 64 tokens (about 5 CPU minutes)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, help="default 300 (--quick: 30)")
    p.add_argument("--capture-steps", type=int, help="default 20 (--quick: 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codecs", nargs="+", default=list(CODECS))
    p.add_argument("--noise-runs", type=int, default=1,
                   help="extra fp32 runs, the spread a codec's loss difference is measured against (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seq_len = "tiny", 8, 64
    if args.steps is None:
        args.steps = 30 if args.quick else 300
    if args.capture_steps is None:
        args.capture_steps = 5 if args.quick else 20
    for name in ("steps", "capture_steps", "batch_size", "seq_len", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.noise_runs < 0:
        p.error("--noise-runs must be 0 or more")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        codecs = {name: get_codec(name) for name in args.codecs if name != "fp32"}  # fp32: the baseline, always run
    except ConfigError as exc:
        p.error(str(exc))
    cfg = get_preset(args.model)
    split = split_tokens(load_tokens(None, cfg.vocab_size), 0.05, args.seq_len)
    val = eval_batches(split.val, args.batch_size, args.seq_len, 4)
    t0 = time.perf_counter()
    print(f"capturing the combine's rows after {args.capture_steps} fp32 steps of {args.model} ...", flush=True)
    rows = capture(args, split, device)
    h = cfg.hidden_size
    print(f"captured {rows['activations'].shape[0]} activation and {rows['gradients'].shape[0]} gradient rows, "
          f"H = {h}", flush=True)
    print("| combine codec | bytes/element | act. rel L2 | act. row rel | grad rel L2 | grad row rel |")
    print("|---|---|---|---|---|---|")
    table = {}
    for name, codec in codecs.items():
        table[name] = {"bytes_per_element": codec.bytes_per_row(h) / h}
        for kind, x in rows.items():
            table[name][f"{kind}_rel_l2"], table[name][f"{kind}_row_rel"] = codec_error(codec, x)
        t = table[name]
        print(f"| {name} | {t['bytes_per_element']:.3f} | {t['activations_rel_l2']:.2e} | "
              f"{t['activations_row_rel']:.2e} | {t['gradients_rel_l2']:.2e} | {t['gradients_row_rel']:.2e} |",
              flush=True)
    plan = [("fp32", "fp32")] + [(f"fp32 (repeat {i + 1})", "fp32") for i in range(args.noise_runs)]
    runs = {}
    for label, name in plan + [(name, name) for name in codecs]:
        model, _, losses = train(args, get_codec(name), split, device, args.steps,
                                 log=lambda m: print(m, flush=True))
        tail = losses[-max(1, len(losses) // 10):]
        runs[label] = {"final_train_loss": statistics.fmean(tail), "val_loss": val_loss(model, val, device),
                       "train_loss": losses}
        print(f"  {label}: final train loss {runs[label]['final_train_loss']:.4f}, val loss "
              f"{runs[label]['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = runs["fp32"]
    noise = [abs(runs[label]["val_loss"] - base["val_loss"]) for label, _ in plan[1:]]
    print(f"\n{args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, H = {h}, device "
          f"{device} ({time.perf_counter() - t0:.0f} s)")
    if noise:
        print(f"noise floor: the {len(noise)} repeated fp32 run(s) differ from the first by up to {max(noise):.4f} "
              f"in validation loss")
    print("| combine codec | bytes/element | act. rel L2 | act. row rel | grad rel L2 | grad row rel | "
          "final train loss | val loss | val loss - fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _ in plan:
        r = runs[label]
        print(f"| {label} | 4.000 | 0 | 0 | 0 | 0 | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | "
              f"{r['val_loss'] - base['val_loss']:+.4f} |")
    for name in codecs:
        t, r = table[name], runs[name]
        print(f"| {name} | {t['bytes_per_element']:.3f} | {t['activations_rel_l2']:.2e} | "
              f"{t['activations_row_rel']:.2e} | {t['gradients_rel_l2']:.2e} | {t['gradients_row_rel']:.2e} | "
              f"{r['final_train_loss']:.4f} | "
              f"{r['val_loss']:.4f} | {r['val_loss'] - base['val_loss']:+.4f} |")
    ResultsLog("codec_study").save(args=vars(args), errors=table, runs=runs, noise_floor=max(noise, default=None))


if __name__ == "__main__":
    main()
