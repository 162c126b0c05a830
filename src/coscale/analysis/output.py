"""Writing analysis results to disk: whole files or nothing, and one-line errors naming the path.

A report is several files (Markdown or HTML and PNG charts); they are written into a temporary directory
beside their destination and moved into place only when all of them exist, so a failure (an unwritable
path, a full disk, a missing plotting library) leaves no half-written report behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from coscale.errors import CoscaleError
from coscale.hardware import HardwareSpec, hardware_text


class OutputError(CoscaleError):
    """A result file or directory that cannot be written."""


def _explain(path: str, e: OSError) -> OutputError:
    cause = e.strerror or str(e)
    return OutputError(f"cannot write {path}: {cause}")


def make_directory(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _explain(path, e) from None
    if not os.path.isdir(path):
        raise OutputError(f"cannot write {path}: not a directory")
    return path


def write_file(path: str | os.PathLike, data: str | bytes) -> str:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    make_directory(parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".coscale-", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _explain(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


write_text_file = write_file


def write_hardware(spec: HardwareSpec, path: str | os.PathLike) -> str:
    """Write ``spec`` (with its efficiencies and their sources) as YAML, or JSON for ``.json``."""
    return write_text_file(path, hardware_text(spec, path))


@contextmanager
def staged_directory(output_dir: str | os.PathLike) -> Iterator[Callable[[str], str]]:
    """Yield ``stage(name) -> path`` for files of ``output_dir``; on success every staged file is moved in.

    On any error nothing reaches ``output_dir`` (which is still created, so that its own problems are
    reported first, with the path).
    """
    out = make_directory(output_dir)
    try:
        staging = tempfile.mkdtemp(prefix=".coscale-staging-", dir=out)
    except OSError as e:
        raise _explain(out, e) from None
    names: list[str] = []

    def stage(name: str) -> str:
        names.append(name)
        return os.path.join(staging, name)

    try:
        yield stage
        for name in names:
            try:
                os.replace(os.path.join(staging, name), os.path.join(out, name))
            except OSError as e:
                raise _explain(os.path.join(out, name), e) from None
    except OSError as e:  # a write inside the block: name the file it was meant for
        where = os.fspath(getattr(e, "filename", None) or out)
        if where.startswith(staging):
            where = os.path.join(out, os.path.relpath(where, staging))
        raise _explain(where, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
