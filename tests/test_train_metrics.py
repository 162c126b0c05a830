"""Metrics: JSONL records, truncation on resume, optional TensorBoard mirror, loss-curve PNG."""

import json

import pytest

from coscale.train import metrics as m


def test_jsonl_truncate_and_plot(tmp_path):
    logger = m.MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(1, 31):
        logger.log({"type": "train", "step": step, "loss": 5.0 / step})
    logger.log({"type": "eval", "step": 30, "val_loss": 0.3})
    logger.close()
    path = tmp_path / m.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"type": "train", "st')  # a line cut short by a crash
    assert len(m.read_metrics(str(path))) == 31
    m.truncate_after(str(path), 10)
    records = m.read_metrics(str(path))
    assert [r["step"] for r in records] == list(range(1, 11))
    png = m.plot_loss_curve(str(path), str(tmp_path / "curve.png"), unigram_entropy=3.2)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_keeps_earlier_records_and_fresh_run_clears_them(tmp_path):
    path = tmp_path / m.METRICS_FILE
    path.write_text("".join(json.dumps({"type": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    m.MetricsLogger(str(tmp_path), resume_step=3, tensorboard=False).close()
    assert [r["step"] for r in m.read_metrics(str(path))] == [1, 2, 3]
    m.MetricsLogger(str(tmp_path), tensorboard=False).close()
    assert m.read_metrics(str(path)) == []


@pytest.fixture
def tensorboard_scalars(monkeypatch):
    """The scalars a MetricsLogger sends to TensorBoard, as (tag, value, step), through a fake writer."""
    scalars = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(m, "_summary_writer", lambda log_dir: FakeWriter())
    return scalars


def test_tensorboard_mirror_when_available(tmp_path, tensorboard_scalars):
    scalars = tensorboard_scalars
    logger = m.MetricsLogger(str(tmp_path), tensorboard=True)
    logger.log({"type": "train", "step": 1, "loss": 2.0, "moe_load_max_over_min": None, "flag": True})
    logger.log({"type": "eval", "step": 1, "val_loss": 1.5})
    logger.close()
    assert scalars == [("train/loss", 2.0, 1), ("eval/val_loss", 1.5, 1)]
    assert logger.tensorboard_dir == str(tmp_path / m.TENSORBOARD_DIR)


def test_tensorboard_mirrors_per_layer_maxvio(tmp_path, tensorboard_scalars):
    logger = m.MetricsLogger(str(tmp_path), tensorboard=True)
    logger.log({"type": "train", "step": 2, "maxvio": 0.5, "maxvio_layers": {"layer1": 0.5, "mtp1": None}})
    logger.close()
    assert tensorboard_scalars == [("train/maxvio", 0.5, 2), ("train/maxvio_layers/layer1", 0.5, 2)]
