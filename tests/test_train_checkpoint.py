"""Training-state checkpoints: atomic saves, latest pointer, pruning, integrity and compatibility checks."""

import json
import os

import pytest
import torch

from coscale.errors import CheckpointError
from coscale.train import checkpointing as ckpt


def _save(run_dir, step, value=1.0, keep=2):
    model = {"w": torch.full((4, 4), value)}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    trainer = {"sampler": {"generator": torch.Generator().manual_seed(step).get_state(), "batches_drawn": step}}
    meta = {"model_config": {"hidden_size": 4}, "precision": "fp32"}
    return ckpt.save_checkpoint(str(run_dir), step, model, optimizer, trainer, meta, keep=keep)


def test_save_load_round_trip(tmp_path):
    path = _save(tmp_path, 5, value=2.5)
    assert path == os.path.join(str(tmp_path), "checkpoints", "step_00000005")
    assert ckpt.resolve_checkpoint(str(tmp_path)) == path
    assert ckpt.run_dir_of(path) == str(tmp_path)
    state = ckpt.load_checkpoint(path)
    assert state.meta["step"] == 5 and state.meta["precision"] == "fp32"
    assert torch.equal(state.model["w"], torch.full((4, 4), 2.5))
    assert state.trainer["sampler"]["batches_drawn"] == 5


def test_weights_alone_load_for_inference(tmp_path):
    """load_model_state reads and verifies meta.json and model.pt only: a checkpoint shipped without its
    optimizer and trainer state loads; a damaged model.pt is still refused; training resumes need all."""
    path = _save(tmp_path, 3, value=1.5)
    os.remove(os.path.join(path, "optimizer.pt"))
    os.remove(os.path.join(path, "trainer.pt"))
    meta, weights = ckpt.load_model_state(path)
    assert meta["step"] == 3 and torch.equal(weights["w"], torch.full((4, 4), 1.5))
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        ckpt.load_checkpoint(path)
    with open(os.path.join(path, "model.pt"), "r+b") as f:
        f.seek(40)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="model.pt fails its SHA-256 check"):
        ckpt.load_model_state(path)


def test_latest_pointer_and_pruning(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    names = sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("step_"))
    assert names == ["step_00000002", "step_00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    _save(tmp_path, 3, value=7.0)  # the same step again replaces it
    assert ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(tmp_path))).model["w"][0, 0] == 7.0


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1, value=1.0)
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):  # checkpointing saves through an open file
        calls.append(f)
        if len(calls) == 2:  # the optimizer file: write half of it, then die
            real_save(obj, f, *args, **kwargs)
            f.flush()
            f.truncate(f.tell() // 2)
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, value=2.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.resolve_checkpoint(str(tmp_path)) == good
    assert torch.equal(ckpt.load_checkpoint(good).model["w"], torch.full((4, 4), 1.0))
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_crash_before_pointer_update_and_stale_temporaries(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    # A process killed after writing a temporary directory leaves it behind; readers ignore it ...
    stale = tmp_path / "checkpoints" / ".tmp-step_00000002-x"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step_00000001")
    # ... and the next save removes it.
    _save(tmp_path, 2)
    assert not stale.exists()
    # A pointer naming a missing checkpoint falls back to the newest complete one.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step_00000002")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_corrupt_checkpoint_is_one_line_error(tmp_path, damage):
    path = _save(tmp_path, 1)
    target = os.path.join(path, "model.pt")
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(10)
    elif damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(target, "wb").write(bytes(data))
    elif damage == "delete":
        os.remove(target)
    else:
        open(os.path.join(path, "meta.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as info:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_unreadable_file_without_hash_check(tmp_path):
    path = _save(tmp_path, 1)
    meta = ckpt.read_meta(path)
    open(os.path.join(path, "trainer.pt"), "wb").write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read trainer.pt"):
        ckpt.load_checkpoint(path, meta)  # meta already verified earlier: torch.load itself fails


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt.resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a run directory"):
        ckpt.resolve_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve_checkpoint(str(tmp_path))


def test_check_compatible_names_the_field(tmp_path):
    path = _save(tmp_path, 1)
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(path, meta, {"model_config": {"hidden_size": 4}, "precision": "fp32"})
    with pytest.raises(CheckpointError, match=r"model_config.hidden_size is 4 in the checkpoint, 8 now"):
        ckpt.check_compatible(path, meta, {"model_config": {"hidden_size": 8}})
    with pytest.raises(CheckpointError, match="precision is 'fp32' in the checkpoint, 'bf16' now"):
        ckpt.check_compatible(path, meta, {"precision": "bf16"})


def test_future_format_version_refused(tmp_path):
    path = _save(tmp_path, 1)
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    meta["format_version"] = 99
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.read_meta(path)
