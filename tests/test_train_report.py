"""What a run reports beyond its losses: the expert-load balance (MaxVio) and the peak memory, in the
header, the progress lines, metrics.jsonl, the PNG, summary.json and the footer."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from coscale.train import memory
from coscale.train import metrics as m
from coscale.train.config import TrainConfig
from coscale.train.loop import train
from coscale.train.report import Progress
from test_train_loop import small_config


def _vm_hwm_bytes() -> int | None:
    """The kernel's own peak-RSS figure for this process (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_peak_rss_matches_the_kernel_figure():
    before = _vm_hwm_bytes()
    if before is None:
        pytest.skip("no /proc/self/status")
    ours = memory.peak_rss_bytes()
    after = _vm_hwm_bytes()
    # both are the kernel's high-water mark of the resident set (getrusage counts a few pages differently)
    assert before - 8 * 1024**2 <= ours <= after + 8 * 1024**2
    assert memory.peak_memory("cpu") == {"peak_rss_gib": pytest.approx(ours / 1024**3, rel=1e-3)}


def test_peak_rss_grows_with_an_allocation():
    if _vm_hwm_bytes() is None:
        pytest.skip("no /proc/self/statm")
    # the resident set now (statm's second field, in pages) plus 320 MiB with every page touched: the peak
    # must reach it (the peak before may be higher than the resident set now, e.g. from importing torch)
    code = ("import os, torch; from coscale.train.memory import peak_rss_bytes as p; "
            "now = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
            "t = torch.ones(80 * 1024**2); print(now, p())")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    now, peak = map(int, out.stdout.split())
    assert peak >= now + 310 * 1024**2, (now, peak)


def test_cuda_peaks_come_from_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(d) or 3 * 1024**3)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 4.5 * 1024**3)
    peak = memory.peak_memory("cuda:1")
    assert peak == {"peak_memory_allocated_gib": 3.0, "peak_memory_reserved_gib": 4.5}
    assert calls == [torch.device("cuda:1")]
    assert memory.describe(peak) == "peak 3.00 GiB allocated, 4.50 GiB reserved"
    assert "peak RSS" in memory.describe(memory.peak_memory("cpu"))


def test_progress_shows_maxvio():
    cfg = TrainConfig(steps=4, log_interval=2, progress=False)
    lines = []
    progress = Progress(cfg, 0, lines.append, main=True)
    for step, vio in ((1, 0.5), (2, 1.5), (3, None), (4, 0.25)):
        progress.step({"step": step, "loss": 1.0, "lr": 1e-3, "maxvio": vio}, tokens=10, seconds=1.0)
    assert "MaxVio 1.00" in lines[0] and "MaxVio 0.25" in lines[1]  # the mean of the window's batches
    dense = Progress(cfg, 0, lines.append, main=True)
    dense.step({"step": 2, "loss": 1.0, "lr": 1e-3}, tokens=10, seconds=1.0)
    assert "MaxVio" not in lines[-1]
    bar = Progress(TrainConfig(steps=2, progress=True), 0, lines.append, main=True)
    bar.step({"step": 1, "loss": 1.0, "lr": 1e-3, "maxvio": 0.25}, tokens=10, seconds=1.0)
    assert "maxvio=0.25" in bar.bar.postfix  # the bar shows the latest step's worst layer
    bar.close()


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_has_a_balance_panel_only_for_moe_runs(tmp_path):
    path = tmp_path / m.METRICS_FILE
    records = [{"type": "train", "step": s, "loss": 3 / s, "maxvio": 2 / s, "maxvio_mean": 1 / s} for s in range(1, 30)]
    records.append({"type": "eval", "step": 29, "val_loss": 0.2, "val_maxvio": 0.1})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    width, height = _png_size(m.plot_loss_curve(str(path), str(tmp_path / "moe.png")))
    path.write_text("".join(json.dumps({"type": "train", "step": s, "loss": 3 / s}) + "\n" for s in range(1, 30)))
    width_dense, height_dense = _png_size(m.plot_loss_curve(str(path), str(tmp_path / "dense.png")))
    assert width == width_dense and height > 1.5 * height_dense


def test_a_run_reports_balance_and_memory_everywhere(tmp_path):
    cfg = small_config(tmp_path / "run", steps=4, eval_interval=2, log_interval=2, save_interval=0)
    lines = []
    summary = train(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "memory: peak RSS" in lines[0]  # the header
    assert "| MaxVio " in text and "MaxVio_global" in text  # log lines and evaluation lines
    footer = text[text.index("done:"):]
    assert "expert load: MaxVio_batch" in footer and "memory: peak RSS" in footer
    records = m.read_metrics(summary["metrics"])
    train_records = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert all(r["peak_rss_gib"] > 0 for r in train_records)
    assert all(set(r["maxvio_layers"]) == {"layer1", "mtp1"} and r["maxvio"] >= r["maxvio_mean"] >= 0
               for r in train_records)
    assert all(r["maxvio"] == max(r["maxvio_layers"].values()) for r in train_records)
    assert [set(r["val_maxvio_layers"]) for r in evals] == [{"layer1"}, {"layer1"}]  # MTP: not in evaluation
    saved = json.load(open(os.path.join(cfg.out_dir, "summary.json")))
    last = train_records[-4:]
    assert saved["final_maxvio_batch"] == pytest.approx(sum(r["maxvio"] for r in last) / len(last))
    assert saved["final_maxvio_batch_steps"] == 4
    assert saved["final_val_maxvio_global"] == evals[-1]["val_maxvio"]
    assert saved["peak_rss_gib"] >= max(r["peak_rss_gib"] for r in train_records)
    assert _png_size(saved["plot"])[1] > 800  # the loss panel and the balance panel
