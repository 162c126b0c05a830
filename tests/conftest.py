"""Test-session settings: one CPU thread per process, Triton kernels on the CPU interpreter.

The suite runs on small, often shared CPU machines. torch's default (one OpenMP thread per core) makes
every small operation wait for all its threads, and on busy cores they spin while they wait: on a 2-core
machine with a load of 10, tests/test_fp8_training.py + test_model.py took 600 s (254 s of CPU) with 2
threads and 61 s (25 s of CPU) with 1. Processes the tests start (spawned ranks, torchrun, the CLI)
multiply that, so the environment variables below reach them too. An explicit OMP_NUM_THREADS wins
(set it to measure the multi-threaded paths).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, and for subprocesses
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
# The kernel tests run Triton on CPU tensors, through its interpreter; set before triton is imported. On a
# GPU machine, TRITON_INTERPRET=0 runs the CUDA-only tests (skipped without a GPU) on the real kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
