"""FP8 vs BF16 training-accuracy study (DeepSeek-V3's claim: relative loss error < 0.25%).

GPU:  PYTHONPATH=src python benchmarks/fp8_accuracy.py --model small --steps 300 [--spread-seed 1]
CPU:  PYTHONPATH=src python benchmarks/fp8_accuracy.py --model tiny --steps 60 --reference fp32
Trains the same model, seed and batches in the reference precision and in FP8, prints the relative
difference of the loss curves after warm-up, and saves a plot of both curves and fp8_study.json under
--out (default $OUT/fp8_study or runs/fp8_study); the study's summary is appended as a line to
benchmarks/results/fp8_accuracy.jsonl (results_log.py).
"""

import argparse
import json
import os

from coscale.train.fp8_study import compare_metrics_files, run_fp8_study
from coscale.train.loop import TrainConfig
from results_log import ResultsLog


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, help="peak learning rate (default: coscale train's for the model's width; "
                   "the records before 2026-12-03's seventh session used 1.5e-3 for small, 5e-4 for proxy-v3, at "
                   "which their routers sent every token to one expert: docs/training.md)")
    p.add_argument("--reference", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--smooth", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-seed", type=int, help="also train the reference with this seed: its seed-to-seed "
                   "difference is the yardstick for FP8's")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "fp8_study"))
    p.add_argument("--from-metrics", nargs="+", metavar="METRICS_JSONL",
                   help="no training: compare runs made separately (REFERENCE FP8 [REFERENCE_OTHER_SEED], "
                   "coscale train metrics.jsonl files) over the steps all of them reached")
    a = p.parse_args()
    if a.from_metrics:
        if len(a.from_metrics) not in (2, 3):
            p.error("--from-metrics takes REFERENCE FP8 [REFERENCE_OTHER_SEED]")
        r = compare_metrics_files(*a.from_metrics, skip=max(1, a.steps // 10), smooth=a.smooth)
        print(json.dumps(r, indent=2))
        return
    base = TrainConfig(model=a.model, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                       seed=a.seed, eval_interval=0, save_interval=0, checkpoints=False, progress=False,
                       tensorboard=False,
                       log_interval=max(1, a.steps // 10))
    r = run_fp8_study(base, a.out, reference=a.reference, smooth=a.smooth, spread_seed=a.spread_seed)
    ResultsLog("fp8_accuracy").save(study=r)
    print(json.dumps(r, indent=2))
    print(f"\n{a.model}, {a.steps} steps: FP8 vs {a.reference} loss, relative difference after warm-up "
          f"(moving average {a.smooth}): mean {100 * r['mean_rel_diff_smoothed']:.3f}%, "
          f"max {100 * r['max_rel_diff_smoothed']:.3f}%, final {100 * r['final_rel_diff_smoothed']:+.3f}%; "
          f"val {100 * (r['val_rel_diff'] or 0):+.3f}%; goal < 0.25%")
    tps = r["tokens_per_s"]
    print(f"tokens/s: {a.reference} {tps[a.reference]:,.0f}, fp8 {tps['fp8']:,.0f} "
          f"(x{r.get('fp8_speedup', float('nan')):.2f}); steady {r['steady_tokens_per_s']}; "
          f"peak GiB {r['peak_gib']}; plot {r['plot']}")
    if "reference_spread" in r:
        sp = r["reference_spread"]
        print(f"{a.reference} seed {sp['seeds'][0]} vs seed {sp['seeds'][1]} (the yardstick): mean "
              f"{100 * sp['mean_rel_diff_smoothed']:.3f}%, max {100 * sp['max_rel_diff_smoothed']:.3f}%, final "
              f"{100 * sp['final_rel_diff_smoothed']:+.3f}%; FP8 within it: {r['fp8_within_reference_spread']}")


if __name__ == "__main__":
    main()
