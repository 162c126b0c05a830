"""FP8 training tracks higher-precision training (the CPU-sized version of benchmarks/fp8_accuracy.py)."""

import json

import pytest
import torch

from coscale.train.fp8_study import compare_curves, compare_metrics_files, run_fp8_study
from coscale.train.loop import TrainConfig


def test_compare_curves_hand_case():
    ref = [2.0, 2.0, 1.0, 1.0]
    cand = [2.0, 2.0, 1.1, 0.9]
    stats = compare_curves(ref, cand, skip=2, smooth=1)
    assert stats["mean_rel_diff_smoothed"] == pytest.approx(0.1)
    assert stats["steps_compared"] == 2
    with pytest.raises(ValueError, match="more than"):
        compare_curves(ref, cand, skip=4, smooth=1)


@pytest.fixture
def one_thread():
    """Two training runs on a busy 2-core machine: 17 s on one thread, past 600 s with the default
    thread count when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fp8_training_tracks_fp32_on_tiny(tmp_path, one_thread):
    base = TrainConfig(model="tiny", model_overrides={"num_hidden_layers": 2}, steps=40, batch_size=4,
                       seq_len=64, seed=0, eval_interval=0, save_interval=0, progress=False,
                       tensorboard=False, log_interval=100)
    result = run_fp8_study(base, str(tmp_path), reference="fp32", smooth=10, log=lambda s: None)
    # E4M3 with 1x128/128x128 scaling: ~4% relative error per GEMM, which training averages out (measured
    # here: 0.27% mean, -0.06% val); a broken FP8 path (wrong scale or layout) is off by tens of percent.
    assert result["mean_rel_diff_smoothed"] < 0.02
    assert abs(result["val_rel_diff"]) < 0.02
    saved = json.loads((tmp_path / "fp8_study.json").read_text())
    assert saved["reference"] == "fp32" and (tmp_path / "fp8_vs_fp32.png").exists()


def test_fp8_study_reports_the_reference_seed_to_seed_spread(tmp_path, one_thread):
    base = TrainConfig(model="tiny", model_overrides={"num_hidden_layers": 1}, steps=24, batch_size=2,
                       seq_len=32, seed=0, eval_interval=0, save_interval=0, progress=False,
                       tensorboard=False, log_interval=100)
    result = run_fp8_study(base, str(tmp_path), reference="fp32", smooth=4, spread_seed=1, log=lambda s: None)
    spread = result["reference_spread"]
    assert spread["seeds"] == [0, 1] and spread["steps_compared"] == result["steps_compared"]
    # another seed draws other weights and batches: its curve differs, where FP8 on the same seed tracks
    assert spread["mean_rel_diff_smoothed"] > 0
    assert result["fp8_within_reference_spread"] == (result["mean_rel_diff_smoothed"]
                                                     <= spread["mean_rel_diff_smoothed"])
    assert set(result["tokens_per_s"]) == {"fp32", "fp8"} and (tmp_path / "fp32_seed1").is_dir()


def test_compare_metrics_files_compares_separate_runs_over_the_steps_all_reached(tmp_path):
    """Runs made in separate sessions (one cut short): compared over the common steps, with each run's
    steady tokens/s and peak memory."""
    def write(name, losses, tokens_per_s):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"type": "run", "step": 0}] + [
            {"type": "train", "step": i + 1, "loss": loss, "tokens_per_s": tokens_per_s,
             "peak_memory_allocated_gib": 1.5} for i, loss in enumerate(losses)]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return str(path)

    ref = write("ref", [4.0] * 40, 100.0)
    fp8 = write("fp8", [4.04] * 30, 125.0)  # 1% above, cut at step 30
    other = write("other", [4.2] * 40, 100.0)  # 5% above
    r = compare_metrics_files(ref, fp8, other, skip=5, smooth=4)
    assert r["steps"] == 30 and r["fp8"]["steps_compared"] == 25
    assert r["fp8"]["mean_rel_diff_smoothed"] == pytest.approx(0.01)
    assert r["spread"]["mean_rel_diff_smoothed"] == pytest.approx(0.05)
    assert r["fp8_within_reference_spread"] is True
    assert r["fp8_steady_tokens_per_s"] == pytest.approx(125.0) and r["reference_peak_gib"] == 1.5
