"""Test-session setup shared by every test module.

Triton decides between its compiler and its CPU interpreter when a kernel (or triton.language itself)
is decorated, i.e. when it is first imported, and importing coscale's kernels registers torch operators,
which imports Triton. Without a GPU the kernel tests run under the interpreter, so TRITON_INTERPRET=1
must be set before the first test module imports coscale: here, before collection. On a machine with a
GPU nothing is set, and the kernels compile.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
