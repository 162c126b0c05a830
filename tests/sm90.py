"""What the tests of the Gluon kernels share: the mark for a Hopper GPU and ptxas's report on an sm_90 compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from coscale.kernels import quant as q

on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or q.interpreting() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm_90 GPU",
)


def ptxas_report(ptx: str, tmp_path) -> str:
    """ptxas -v on the PTX (the ptxas Triton itself uses for sm_90: triton >= 3.6 names it ptxas-blackwell)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except ImportError:
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    (tmp_path / "k.ptx").write_text(ptx)
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    return report.stderr


def compile_ptx(module: str, args: list, tmp_path) -> tuple[str, int]:
    """(PTX, shared-memory bytes) of ``module.compile_for_sm90(*args)``, compiled in a fresh process: in this one a
    kernel that ran on Triton's CPU interpreter before leaves Gluon's compiler failing on its descriptor arguments
    ("'block_argument' object has no attribute 'dtype'", triton 3.9, cold cache)."""
    script = ("import json, sys, importlib\n"
              f"kernel = importlib.import_module({module!r}).compile_for_sm90(*json.loads(sys.argv[1]))\n"
              "open(sys.argv[2], 'w').write(kernel.asm['ptx'])\n"
              "print(json.dumps(kernel.metadata.shared))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args), str(tmp_path / "kernel.ptx")],
                         capture_output=True, text=True, env=env, timeout=150)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return (tmp_path / "kernel.ptx").read_text(), json.loads(out.stdout.strip().splitlines()[-1])
