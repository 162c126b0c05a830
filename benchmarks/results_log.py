"""One results file per benchmark script: ``benchmarks/results/<script>.jsonl``, one JSON line per run.

Each line holds the conditions of the run (UTC date, git commit and whether the tree was modified, a
digest of ``src/coscale`` that identifies the code where no git checkout exists, GPU, driver, CUDA,
torch, triton, Python, the command line) and what the script measured::

    log = ResultsLog("bench_fp8")           # at the start of main(): the conditions are taken now
    log.save(meta=meta, results=results)    # as often as there is something worth keeping

The first ``save`` appends the run's line; later calls replace that same line (found by the run's id),
so a run cut short (a timeout, a lease that ends) keeps what it had measured and a finished run is
still one line. One run of a script at a time per folder (two would race on the rewrite).

A script whose result is a printed report (profile_layers.py) saves the text it printed:
``with teed_stdout() as report: ...; log.save(report=report.getvalue())``.

``BENCH_RESULTS_DIR`` overrides the folder: ``run_gpu.sh`` points it at ``$OUT`` so that a device run's
new lines come back; append them here (``cat $OUT/bench_fp8.jsonl >> benchmarks/results/bench_fp8.jsonl``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _command(*args: str) -> str | None:
    """stdout of a command, stripped; None when it is missing or fails."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    out = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0] if out else None  # one line per GPU, the same driver


def source_digest() -> str:
    """sha256 (first 16 hex digits) of every .py file under src/coscale: the code that ran, where the
    device machine's copy of the tree has no git history."""
    h = hashlib.sha256()
    src = REPO / "src" / "coscale"
    for path in sorted(src.rglob("*.py")):
        h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_conditions() -> dict:
    """Where and on what a benchmark ran; None for what cannot be known here (no GPU, no git)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = torch.cuda.is_available()
    status = _command("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _command("git", "rev-parse", "HEAD"),
        "modified": None if status is None else bool(status),
        "source_digest": source_digest(),
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "driver": _driver() if on_gpu else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "argv": sys.argv[1:],
    }


class ResultsLog:
    """The line of one run in ``<folder>/<script>.jsonl`` (see the module docstring)."""

    def __init__(self, script: str, folder: str | os.PathLike | None = None):
        folder = folder or os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
        self.path = Path(folder) / f"{script}.jsonl"
        self.run = uuid.uuid4().hex[:12]
        self.head = {"run": self.run, "script": script, **run_conditions()}

    def save(self, **fields) -> Path:
        """Write this run's line (the conditions plus ``fields``), replacing the one it wrote before.

        The file is rewritten through a temporary file and a rename, so a run killed while saving
        leaves the previous contents whole."""
        line = json.dumps({**self.head, **fields}, default=str)
        mine = f'{{"run": "{self.run}",'
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        at = next((i for i, old in enumerate(lines) if old.startswith(mine)), len(lines))
        lines[at:at + 1] = [line]  # in place: the lines stay in the order the runs started
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{self.run}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)
        return self.path


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def teed_stdout() -> Iterator[io.StringIO]:
    """Print as usual and keep a copy of everything printed, for scripts whose result is a report."""
    copy = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, copy)):
        yield copy
