"""What a run writes and when: unwritable --out paths, a full disk during a save, metrics durable before a
checkpoint, a run killed before its first checkpoint, file modes from the umask."""

import errno
import json
import os
import stat

import pytest
import torch

from coscale.cli import main
from coscale.errors import OutputError
from coscale.train import checkpointing as ckpt
from coscale.train import loop, run_dir
from coscale.train.loop import train
from coscale.train.metrics import read_metrics
from test_train_cli import _config_file, _fails, _snapshot
from test_train_loop import quiet, small_config


def _train_steps(path):
    return [r["step"] for r in read_metrics(os.path.join(path, "metrics.jsonl")) if r["type"] == "train"]


# ---- --out that cannot be written ------------------------------------------------------------------


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", "/dev/null/run"],
           "cannot create run directory /dev/null/run: /dev/null is not a directory")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_out_under_proc_is_one_line(tmp_path, capsys):
    line = _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", "/proc/coscale-run"],
                  "/proc/coscale-run")
    assert "cannot " in line
    assert not os.path.exists("/proc/coscale-run")


def test_out_on_a_read_only_filesystem(tmp_path, capsys, monkeypatch):
    """Both ways of finding out: the mount flag (before anything is built) and the failing mkdir."""
    out = tmp_path / "ro" / "run"
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", str(out)],
           f"cannot write run directory {out}: {tmp_path} is on a read-only filesystem")
    monkeypatch.setattr(os, "statvfs", real_statvfs)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(run_dir.os, "makedirs", refuse)
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", str(out)],
           f"cannot write run directory {out}: Read-only file system")
    assert not (tmp_path / "ro").exists()


def test_check_writable_names_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        run_dir.check_writable(str(tmp_path / "file" / "a" / "b"), "run directory")
    run_dir.check_writable(str(tmp_path / "new" / "deeper"), "run directory")  # creatable: no error


def test_failed_start_removes_what_it_created(tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "write_json_atomic", full)
    with pytest.raises(OutputError, match="No space left on device"):
        run_dir.prepare_out_dir(str(tmp_path / "a" / "b"), {}, clear=False)
    assert os.listdir(tmp_path) == []


# ---- a full disk during a checkpoint save ----------------------------------------------------------


def test_full_disk_during_a_checkpoint_save(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) > 3:  # the first checkpoint's three files fit; the disk is full after them
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    line = _fails(capsys, ["train", "--config", _config_file(tmp_path, steps=3), "--out", str(out)],
                  "No space left on device")
    assert "checkpoint step_00000002" in line and str(out / "checkpoints") in line
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["latest", "step_00000001"]  # nothing half-written, no temporary left
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    ckpt.load_checkpoint(str(out / "checkpoints" / "step_00000001"))  # the previous one is intact


# ---- metrics on disk before their checkpoint; resume keeps every record once ----------------------------


def test_metrics_are_on_disk_before_a_checkpoint_is_published(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save, real_fsync = ckpt.save_checkpoint, os.fsync
    fsynced, seen = [], {}

    def fsync(fd):
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else fd)
        return real_fsync(fd)

    def save(run_dir_, step, *args, **kwargs):
        # what a process killed right after this save would leave: the file as the OS has it
        seen[step] = (read_metrics(str(run / "metrics.jsonl")), list(fsynced))
        return real_save(run_dir_, step, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", save)
    train(small_config(run, log_interval=100), log=quiet)  # no log-interval flush before the end
    for step in (3, 6):
        records, synced = seen[step]
        assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, step + 1))
        assert [r["step"] for r in records if r["type"] == "eval"] == list(range(3, step + 1, 3))
        if os.path.isdir("/proc/self/fd"):
            assert str(run / "metrics.jsonl") in synced


def test_resume_after_a_kill_keeps_every_record_once(tmp_path):
    run = tmp_path / "run"
    full = train(small_config(tmp_path / "full"), log=quiet)
    train(small_config(run), log=quiet)
    # A kill during step 6's save: records up to step 5 were flushed, the step-6 checkpoint never published.
    ckpt_6 = run / "checkpoints" / "step_00000006"
    for name in os.listdir(ckpt_6):
        os.remove(ckpt_6 / name)
    ckpt_6.rmdir()
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    records = read_metrics(str(run / "metrics.jsonl"))
    with open(run / "metrics.jsonl", "w") as f:
        for r in records:
            if r["step"] <= 5:
                f.write(json.dumps(r) + "\n")
        f.write('{"type": "train", "step": 6, "lo')  # a line cut short by the kill
    summary = train(small_config(run, resume=str(run)), log=quiet)
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6]
    full_losses = {r["step"]: r["loss"] for r in read_metrics(full["metrics"]) if r["type"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(summary["metrics"]) if r["type"] == "train"}
    assert resumed == full_losses  # bitwise: the resumed steps recomputed, the earlier ones kept
    # The summary's final loss comes from metrics.jsonl: the same figure as the uninterrupted run's.
    assert summary["final_train_loss"] == full["final_train_loss"]
    assert summary["final_train_loss_steps"] == full["final_train_loss_steps"] == 6


# ---- a run killed before its first checkpoint ----------------------------------------------------------


def test_run_killed_before_its_first_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while saving its first checkpoint

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", killed)
    assert main(["train", "--config", _config_file(tmp_path), "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert (out / "train_config.json").exists() and not (out / "checkpoints").exists()
    before = _snapshot(out)
    for argv in (["--config", _config_file(tmp_path), "--out", str(out)], ["--resume", str(out)]):
        line = _fails(capsys, ["train", *argv], f"run directory {out} holds a run that stopped before its first "
                                                "checkpoint")
        assert "--overwrite" in line and "pass --resume" not in line
    assert _snapshot(out) == before
    assert main(["train", "--config", _config_file(tmp_path), "--out", str(out), "--overwrite"]) == 0
    assert _train_steps(out) == [1, 2]


def test_out_names_the_checkpoint_of_a_finished_run(tmp_path, capsys, finished_run):
    line = _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", str(finished_run)], "not empty")
    assert f"pass --resume {finished_run}" in line and "step_00000002" in line


# ---- file modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        summary = train(small_config(tmp_path / "run", steps=2, save_interval=1, keep_checkpoints=1), log=quiet)
    finally:
        os.umask(previous)
    modes = {}
    for dirpath, dirnames, filenames in os.walk(summary["out_dir"]):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            modes[os.path.relpath(path, summary["out_dir"])] = stat.S_IMODE(os.stat(path).st_mode)
    assert "checkpoints/step_00000002/model.pt" in modes and "train_config.json" in modes
    for name, mode in modes.items():
        is_dir = os.path.isdir(os.path.join(summary["out_dir"], name))
        assert mode == (0o777 if is_dir else 0o666) & ~umask, (name, oct(mode))
    assert stat.S_IMODE(os.stat(summary["out_dir"]).st_mode) == 0o777 & ~umask


@pytest.fixture
def finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", _config_file(tmp_path), "--out", str(out)]) == 0
    capsys.readouterr()
    return out
