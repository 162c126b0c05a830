"""The run directory: its layout, what state it is in, and the file operations a run needs.

Layout::

    train_config.json    the resolved training config (written when the run starts)
    metrics.jsonl        one record per line (coscale.train.metrics)
    loss_curve.png  tensorboard/  summary.json
    checkpoints/
      step_00000500/     model.pt  optimizer.pt  trainer.pt  meta.json
      latest             text file: the name of the newest complete checkpoint

A directory holding ``train_config.json`` or ``metrics.jsonl`` holds a run; with no checkpoint yet it is a
run that stopped before its first save, and ``--out`` and ``--resume`` both say so (start it again
with ``--overwrite``).

Files and directories are created with the process umask (as ``open`` and ``mkdir`` do), never the
owner-only modes of ``tempfile``. Write failures (not a directory, no permission, a read-only or full
filesystem) are one-line :class:`coscale.errors.OutputError` naming the path and the cause.

Nothing here imports torch: ``coscale train --resume`` reads a checkpoint's config before torch loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from typing import Any

from coscale.errors import CheckpointError, ConfigError, OutputError, writing
from coscale.train.metrics import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR

RUN_CONFIG = "train_config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Entries a run directory owns; --overwrite removes exactly these.
RUN_ENTRIES = (CHECKPOINTS, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, RUN_CONFIG, SUMMARY_FILE)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---- what a directory holds ----------------------------------------------------------------------


def holds_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in (RUN_CONFIG, METRICS_FILE))


def latest_checkpoint(run: str) -> str | None:
    """The newest complete checkpoint of a run directory (through ``latest``), or None."""
    root = os.path.join(run, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    latest = os.path.join(root, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        if name.startswith(PREFIX) and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    # No usable pointer (a crash between the directory rename and the pointer update): newest one.
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    return os.path.join(root, names[-1]) if names else None


def _no_checkpoint_yet(path: str) -> str:
    return f"run directory {path} holds a run that stopped before its first checkpoint"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from either itself or a run directory (its latest checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, "model.pt")):
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if holds_run(path):
        raise CheckpointError(f"{_no_checkpoint_yet(path)}: nothing to resume; pass --out {path} --overwrite "
                              "to start it again")
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        raise CheckpointError(f"no checkpoint found in {path}")
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")


def run_dir_of(checkpoint_dir: str) -> str:
    """The run directory that holds ``checkpoint_dir`` (``<run>/checkpoints/step_N``)."""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    if os.path.basename(parent) == CHECKPOINTS:
        return os.path.dirname(parent)
    return parent


# ---- reading and checking a checkpoint's meta.json -----------------------------------------------


def read_meta(checkpoint_dir: str, verify: bool = True, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, after checking (``verify``) that every file it lists is intact
    (``only``: just those of its files, e.g. the weights for inference)."""
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
            if only is None or fname in only:
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
    if sha256(path) != info.get("sha256"):
        raise CheckpointError(f"corrupt checkpoint {checkpoint_dir}: {fname} fails its SHA-256 check")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ---- the output directory ------------------------------------------------------------------------


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse, before anything is written, an ``--out`` that is taken or cannot be created."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output path {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(_occupied(out_dir))
    check_writable(out_dir, f"run directory {out_dir}")


def _occupied(out_dir: str) -> str:
    if not holds_run(out_dir):
        return (f"run directory {out_dir} exists and is not empty; choose another --out, or pass --overwrite "
                "(it removes only the files a run writes)")
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return (f"{_no_checkpoint_yet(out_dir)}, so it is not empty: pass --overwrite to start it again, or "
                "choose another --out")
    return (f"run directory {out_dir} is not empty: it holds a run (latest checkpoint "
            f"{os.path.basename(latest)}); pass --resume {out_dir} to continue it, --overwrite to replace "
            "it, or choose another --out")


def check_writable(path: str, what: str) -> None:
    """What can be known without writing: ``path`` (or its nearest existing ancestor, where it would be
    created) is a directory this process may write to, on a filesystem mounted read-write."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"cannot create {what}: {existing} is not a directory")
    if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"cannot write {what}: {existing} is on a read-only filesystem")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what}: permission denied on {existing}")


def prepare_out_dir(out_dir: str, resolved_config: dict[str, Any], clear: bool) -> None:
    """Create the run directory (``clear``: remove a previous run's entries) and write the run config.

    On failure (e.g. a filesystem that refuses new entries, like /proc) what this call created is removed.
    """
    top_created = _topmost_missing(out_dir)
    with writing(f"run directory {out_dir}"):
        try:
            os.makedirs(out_dir, exist_ok=True)
            if clear:
                for name in RUN_ENTRIES:
                    remove(os.path.join(out_dir, name))
            write_json_atomic(os.path.join(out_dir, RUN_CONFIG), resolved_config)
        except OSError:
            if top_created is not None:
                shutil.rmtree(top_created, ignore_errors=True)
            raise


def _topmost_missing(path: str) -> str | None:
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


# ---- file operations -----------------------------------------------------------------------------


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new directory ``parent/<prefix><random>`` with the umask's mode (``tempfile.mkdtemp`` uses 0700)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` through a temporary file, fsync'ed, and ``os.replace``."""
    tmp = os.path.join(os.path.dirname(path) or ".", f"{TMP_PREFIX}{secrets.token_hex(4)}-{os.path.basename(path)}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: str) -> None:
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
