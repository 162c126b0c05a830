"""Training-state checkpoints for ``coscale train --resume``: model, optimizer, step, RNG, data position.

(HF-format weight files for other tools are :mod:`coscale.checkpoint`'s job; these directories hold
everything needed to continue a run bit for bit.)

Layout of a run directory::

    checkpoints/
      step_00000500/   model.pt  optimizer.pt  trainer.pt  meta.json
      step_00001000/   ...
      latest           text file: the name of the newest complete checkpoint

Atomicity: a checkpoint is written into a temporary directory beside the others
(``checkpoints/.tmp-step_...``), each file fsync'ed, then renamed into place with ``os.replace`` (atomic
within one filesystem), and only then is ``latest`` replaced, again through a temporary file and
``os.replace``. A crash at any moment leaves either the old or the new checkpoint as ``latest``, never a
half-written one; stale temporary directories are removed by the next save.

Integrity: ``meta.json`` is written last and records each file's size and SHA-256; loading checks
them, so a truncated or altered file is reported as a one-line :class:`CheckpointError` rather than
an unpickling traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from coscale.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainingState:
    """The contents of one checkpoint."""

    meta: dict[str, Any]  # step, model_config, train_config, data, files
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]  # RNG states, sampler state


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


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
    os.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(root)
    name = checkpoint_name(step)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root)
    try:
        files = {}
        for fname, obj in (("model.pt", model_state), ("optimizer.pt", optimizer_state),
                           ("trainer.pt", trainer_state)):
            path = os.path.join(tmp, fname)
            torch.save(obj, path)
            files[fname] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
            _fsync_file(path)
        full_meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "files": files,
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(os.path.join(tmp, META), full_meta)
        _fsync_dir(tmp)
        final = os.path.join(root, name)
        _replace_dir(tmp, final)
        _write_text_atomic(os.path.join(root, LATEST), name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, protect=name)
    return final


def _replace_dir(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (the same step saved again) is moved aside first."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=os.path.dirname(dst))
        os.replace(dst, os.path.join(old, "ckpt"))
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(dst))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: str, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(root) if n.startswith(_PREFIX))
    for name in names[:-keep]:
        if name != protect:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove_stale_temporaries(root: str) -> None:
    for name in os.listdir(root):
        if name.startswith(_TMP_PREFIX):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- finding and loading -------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from either itself or a run directory (through ``latest``)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, "model.pt")):
        return path
    root = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(root):
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")
    latest = os.path.join(root, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        if name.startswith(_PREFIX) and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    # No usable pointer (a crash between the directory rename and the pointer update): newest one.
    names = sorted(n for n in os.listdir(root) if n.startswith(_PREFIX))
    if not names:
        raise CheckpointError(f"no checkpoint found in {path}")
    return os.path.join(root, names[-1])


def run_dir_of(checkpoint_dir: str) -> str:
    """The run directory that holds ``checkpoint_dir`` (``<run>/checkpoints/step_N``)."""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    if os.path.basename(parent) == CHECKPOINTS:
        return os.path.dirname(parent)
    return parent


def read_meta(checkpoint_dir: str, verify: bool = True) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, after checking (``verify``) that every file it lists is intact."""
    path = os.path.join(checkpoint_dir, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {META} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {META} lacks 'step' or 'files'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} has format version {meta.get('format_version')!r}; "
            f"this coscale reads version {FORMAT_VERSION}"
        )
    if verify:
        for fname, info in meta["files"].items():
            _verify_file(checkpoint_dir, fname, info)
    return meta


def _verify_file(checkpoint_dir: str, fname: str, info: dict) -> None:
    path = os.path.join(checkpoint_dir, fname)
    if not os.path.isfile(path):
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {fname} is missing")
    size = os.path.getsize(path)
    if size != info.get("bytes"):
        raise CheckpointError(
            f"corrupt checkpoint {checkpoint_dir}: {fname} has {size} bytes, expected {info.get('bytes')}"
        )
    if _sha256(path) != info.get("sha256"):
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {fname} fails its SHA-256 check")


def load_checkpoint(checkpoint_dir: str, meta: dict[str, Any] | None = None) -> TrainingState:
    """Read a checkpoint onto the CPU (``meta`` from :func:`read_meta` skips re-verifying it)."""
    meta = meta if meta is not None else read_meta(checkpoint_dir)
    parts = {}
    for fname in ("model.pt", "optimizer.pt", "trainer.pt"):
        path = os.path.join(checkpoint_dir, fname)
        try:
            parts[fname] = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {fname} is missing") from None
        except Exception as e:  # torch raises several types for a damaged zip/pickle
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: cannot read {fname} ({reason})") from None
    return TrainingState(meta=meta, model=parts["model.pt"], optimizer=parts["optimizer.pt"],
                         trainer=parts["trainer.pt"])


def check_compatible(checkpoint_dir: str, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise if any ``expected`` entry differs from what the checkpoint recorded.

    ``expected`` maps a meta key to a value; a dict value (the model config) is compared field by field
    so that the message names the field that changed.
    """
    differences = []
    for key, want in expected.items():
        have = meta.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            for field in sorted(set(want) | set(have)):
                if _normalise(want.get(field)) != _normalise(have.get(field)):
                    differences.append(f"{key}.{field} is {have.get(field)!r} in the checkpoint, "
                                       f"{want.get(field)!r} now")
        elif _normalise(want) != _normalise(have):
            differences.append(f"{key} is {have!r} in the checkpoint, {want!r} now")
    if differences:
        more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
        raise CheckpointError(
            f"cannot resume from {checkpoint_dir}: {'; '.join(differences[:2])}{more}; "
            "resume with the settings the run was started with"
        )


def _normalise(value: Any) -> Any:
    """JSON round trip, so that tuples and lists (and int/float keys) compare as JSON would store them."""
    return json.loads(json.dumps(value, sort_keys=True))
