"""Run-to-run spread of BF16 training: the same config and seed trained twice (the noise floor that any
FP8-vs-BF16 comparison must beat). Prints the same statistics as fp8_accuracy.py and appends them as a
line to benchmarks/results/bf16_repeat.jsonl (results_log.py).

Run: PYTHONPATH=src python3 benchmarks/bf16_repeat.py [steps, default 150]"""

import dataclasses
import json
import os
import sys

from coscale.train.fp8_study import compare_curves
from coscale.train.loop import TrainConfig, train
from coscale.train.metrics import read_metrics
from results_log import ResultsLog

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
out = os.path.join(os.environ.get("OUT", "runs"), "bf16_repeat")
base = TrainConfig(model="small", steps=steps, batch_size=16, seq_len=512, lr=1.5e-3, seed=0, eval_interval=0,
                   save_interval=0, progress=False, tensorboard=False, log_interval=50, precision="bf16")
curves, vals = [], []
for i in range(2):
    s = train(dataclasses.replace(base, out_dir=f"{out}/run{i}", overwrite=True), log=lambda m: None)
    curves.append([r["loss"] for r in read_metrics(s["metrics"]) if r.get("type") == "train"])
    vals.append(s["final_val_loss"])
stats = compare_curves(curves[0], curves[1], skip=steps // 10, smooth=20)
summary = {"bf16_vs_bf16": stats, "val": vals, "first_losses": [c[:3] for c in curves]}
ResultsLog("bf16_repeat").save(steps=steps, **summary)
print(json.dumps(summary, indent=2))
