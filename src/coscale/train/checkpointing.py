"""Training-state checkpoints for ``coscale train --resume``: model, optimizer, step, RNG, data position.

(HF-format weight files for other tools are :mod:`coscale.checkpoint`'s job; these directories hold
everything needed to continue a run bit for bit. Their place in the run directory, and reading
``meta.json``, are :mod:`coscale.train.run_dir`'s.)

Atomicity: a checkpoint is written into a temporary directory beside the others
(``checkpoints/.tmp-step_...``), each file fsync'ed, then renamed into place with ``os.replace`` (atomic
within one filesystem), and only then is ``latest`` replaced, again through a temporary file and
``os.replace``. A crash at any moment leaves either the old or the new checkpoint as ``latest``, never a
half-written one; stale temporary directories are removed by the next save. A write that fails (a full
disk) removes the temporary directory and raises a one-line :class:`coscale.errors.OutputError`.

Integrity: ``meta.json`` is written last and records each file's size and SHA-256; loading checks
them, so a truncated or altered file is reported as a one-line :class:`CheckpointError` rather than
an unpickling traceback.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from coscale.errors import CheckpointError, OutputError, os_error_reason
from coscale.train.run_dir import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    CHECKPOINTS,
    FORMAT_VERSION,
    LATEST,
    META,
    PREFIX,
    TMP_PREFIX,
    check_compatible,
    checkpoint_name,
    fsync_dir,
    make_temp_dir,
    read_meta,
    resolve_checkpoint,
    run_dir_of,
    sha256,
    write_json_atomic,
    write_text_atomic,
)

STATE_FILES = ("model.pt", "optimizer.pt", "trainer.pt")


@dataclass
class TrainingState:
    """The contents of one checkpoint."""

    meta: dict[str, Any]  # step, model_config, train_config, data, files
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]  # RNG states, sampler state


# ---- saving --------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> str:
    """Write a checkpoint atomically under ``run_dir/checkpoints`` and point ``latest`` at it.

    Keeps the newest ``keep`` checkpoints (0 keeps all). Returns the checkpoint's directory.
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    name = checkpoint_name(step)
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp = make_temp_dir(root, f"{TMP_PREFIX}{name}-")
        files = {}
        for fname, obj in zip(STATE_FILES, (model_state, optimizer_state, trainer_state)):
            path = os.path.join(tmp, fname)
            _save_file(obj, path)
            files[fname] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
        full_meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "files": files,
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(os.path.join(tmp, META), full_meta)
        fsync_dir(tmp)
        final = os.path.join(root, name)
        _replace_dir(tmp, final)
        write_text_atomic(os.path.join(root, LATEST), name + "\n")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write checkpoint {name} in {root}: {os_error_reason(e)} (the previous "
                              "checkpoint is intact)") from None
        raise
    _prune(root, keep, protect=name)
    return final


def _save_file(obj: Any, path: str) -> None:
    """``torch.save`` through a Python file, fsync'ed: a failed write is the OSError that says why
    (ENOSPC...), where ``torch.save(obj, path)`` raises 'basic_ios::clear: iostream error'."""
    with open(path, "xb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (the same step saved again) is moved aside first."""
    old = None
    if os.path.exists(dst):
        old = make_temp_dir(os.path.dirname(dst), f"{TMP_PREFIX}old-")
        os.replace(dst, os.path.join(old, "ckpt"))
    os.replace(src, dst)
    fsync_dir(os.path.dirname(dst))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: str, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    for name in names[:-keep]:
        if name != protect:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove_stale_temporaries(root: str) -> None:
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


# ---- loading -------------------------------------------------------------------------------------


def load_checkpoint(checkpoint_dir: str, meta: dict[str, Any] | None = None) -> TrainingState:
    """Read a checkpoint onto the CPU (``meta`` from :func:`read_meta` skips re-verifying it)."""
    meta = meta if meta is not None else read_meta(checkpoint_dir)
    parts = _load_parts(checkpoint_dir, STATE_FILES)
    return TrainingState(meta=meta, model=parts["model.pt"], optimizer=parts["optimizer.pt"],
                         trainer=parts["trainer.pt"])


def load_model_state(checkpoint_dir: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, the model's state dict) of a checkpoint, for inference: only ``meta.json`` and
    ``model.pt`` are read and verified, so a checkpoint shipped without its optimizer state loads."""
    meta = read_meta(checkpoint_dir, only=("model.pt",))
    return meta, _load_parts(checkpoint_dir, ("model.pt",))["model.pt"]


def _load_parts(checkpoint_dir: str, files) -> dict[str, Any]:
    parts = {}
    for fname in files:
        path = os.path.join(checkpoint_dir, fname)
        try:
            parts[fname] = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {fname} is missing") from None
        except Exception as e:  # torch raises several types for a damaged zip/pickle
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: cannot read {fname} ({reason})") from None
    return parts
