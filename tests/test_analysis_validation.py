"""The validation loop: measurement files, run directories, the docs table."""

import json

import pytest

from coscale.analysis import serving, training_time, validation
from coscale.analysis.memory import ParallelLayout
from coscale.errors import ConfigError

TRAIN = {"kind": "train_step", "model": "small", "hardware": "h200", "seq_len": 256, "batch": 4,
         "precision": "bf16", "eager": True, "seconds": 0.05, "source": "test"}
DECODE = {"kind": "decode_step", "model": "deepseek-v2-lite", "hardware": "h200", "batch": 8, "context": 512,
          "seconds": 0.01}


def test_predictions_match_the_models():
    assert validation.predict(TRAIN) == training_time.training_time(
        "small", "h200", ParallelLayout(), seq_len=256, global_batch=4, micro_batch=4, schedule="1f1b",
        recompute="none", precision="bf16", eager=True, optimizer="fp32").step_s
    # the record's recipe is used: MTP excluded, BF16 moments (DeepSeek's recipe)
    assert validation.predict({**TRAIN, "include_mtp": False, "moments": "bf16"}) == training_time.training_time(
        "small", "h200", ParallelLayout(), seq_len=256, global_batch=4, micro_batch=4, schedule="1f1b",
        recompute="none", include_mtp=False, precision="bf16", eager=True, optimizer="deepseek").step_s
    with pytest.raises(ConfigError, match="moments"):
        validation.predict({**TRAIN, "moments": "fp16"})
    assert validation.predict({**TRAIN, "kernels_per_step": 4000}) == training_time.training_time(
        "small", "h200", ParallelLayout(), seq_len=256, global_batch=4, micro_batch=4, schedule="1f1b",
        recompute="none", precision="bf16", eager=True, optimizer="fp32", kernels_per_step=4000).step_s
    assert validation.predict(DECODE) == serving.decode(
        "deepseek-v2-lite", "h200", serving.ServingLayout(micro_batches=1), batch=8, context=512,
        weight_dtype="bf16").step_s
    counted = validation.predict({**DECODE, "kernels_per_step": 1200})  # the stack's kernels, from a profile
    assert counted == serving.decode("deepseek-v2-lite", "h200", serving.ServingLayout(micro_batches=1), batch=8,
                                     context=512, weight_dtype="bf16", kernels_per_step=1200).step_s
    assert counted > validation.predict(DECODE)


def test_table_and_doc_update(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"measurements": [TRAIN, DECODE]}))
    table = validation.validation_table(validation.load_measurements(path))
    row = table.rows[0]
    assert row[4] == pytest.approx(50.0) and row[6] == pytest.approx((row[5] / row[4] - 1) * 100)
    doc = tmp_path / "analysis.md"
    doc.write_text(f"intro\n{validation.BEGIN}\nold\n{validation.END}\nafter\n")
    validation.update_doc(doc, table)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert "| train_step | small |" in text


def test_record_from_a_run_directory(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"model": "small", "batch_size": 4, "seq_len": 256}))
    lines = [{"type": "run", "device": "cuda:0"}] + [{"type": "train", "step": i, "tokens_per_s": r}
                                 for i, r in enumerate([100.0, 900.0, 1000.0, 1024.0], 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    record = validation.record_from_run(tmp_path, "h200")
    assert record["seconds"] == pytest.approx(4 * 256 / 1012.0)  # median of the last half: 1000, 1024
    assert record["precision"] == "bf16" and validation.predict(record) > 0
    (tmp_path / "summary.json").write_text(json.dumps({"precision": "fp8"}))
    assert validation.record_from_run(tmp_path, "h200")["precision"] == "fp8"


@pytest.mark.parametrize("content, match", [
    ("{nope", "not valid JSON"), ('{"measurements": 3}', "must hold"),
    ('{"measurements": [{"kind": "sleep", "model": "small", "seconds": 1}]}', "kind"),
    ('{"measurements": [{"kind": "train_step", "model": "small", "batch": 1, "seq_len": 8, "seconds": 0}]}',
     "seconds"),
    ('{"measurements": [{"kind": "decode_step", "model": "small", "batch": "x", "context": 8, "seconds": 1}]}',
     "batch"),
])
def test_bad_measurement_files(tmp_path, content, match):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        validation.validation_table(validation.load_measurements(path))


def test_doc_without_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("no markers\n")
    with pytest.raises(ConfigError, match="validation:begin"):
        validation.update_doc(doc, validation.validation_table([TRAIN]))
