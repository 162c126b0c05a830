"""Kernel configurations: the one module through which every coscale kernel that tunes picks its tiles.

Two mechanisms, chosen per kernel by what its configuration is:

- :func:`triton_autotune` wraps Triton's own ``@triton.autotune`` for kernels whose configuration is
  only constexprs, warps and stages, with a grid computed from them (``fp8_gemm``, ``grouped_gemm``).
  Triton times the configurations on the first call per key and keeps the winner on the kernel
  object (``kernel.cache``); ``torch.library.wrap_triton`` accepts such kernels under torch.compile.
- :class:`ConfigPicker` for kernels whose configuration also shapes what the host builds for each
  launch: the grouped FP8 GEMMs (``fp8_grouped_kernels``) build TMA tensor descriptors whose block
  shape is the tile, size a persistent grid from the SM count, and fall back from a TMA bulk store to
  pointer stores where the output's rows are not 16-byte aligned. ``@triton.autotune`` reaches
  host-built descriptors only through a ``pre_hook``, which has misbehaved under torch.compile
  (pytorch#139059), and it times one configuration after another, as coscale's first picker did,
  which on the H100 kept a candidate up to 8% below the best (BENCHMARKS.md); the picker compiles
  every candidate before timing any and times them in interleaved rounds. Each picker is an explicit
  object beside its kernel's candidates, its choices in ``picker.picked`` (``clear()`` forgets
  them); tests build their own.

Under ``TRITON_INTERPRET=1`` both give one configuration: the interpreter cannot time, and Triton's
autotuner fails without a GPU driver when it has two or more configurations.

Warm-up before CUDA graphs and torch.compile: both mechanisms tune on the first call with a new key,
which launches every candidate and synchronises. Run one eager call of each shape first (a warm-up
step). A ConfigPicker asked for an untuned key where it cannot time (during CUDA-graph capture,
torch.compile tracing or with fake tensors) returns its first candidate, the default, without
remembering it, so a later eager call still tunes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting

__all__ = ["ConfigPicker", "autotune_configs", "autotuned", "config_text", "launch_config", "power_of_two_bucket",
           "triton_autotune"]


def power_of_two_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): a tuning key that groups similar row counts."""
    return 1 << max(n - 1, 0).bit_length()


def autotune_configs(gpu_configs: Sequence, interpreter_config) -> list:
    """``gpu_configs`` on a GPU; ``[interpreter_config]`` under the interpreter or without CUDA."""
    if interpreting() or not torch.cuda.is_available():
        return [interpreter_config]
    return list(gpu_configs)


def triton_autotune(gpu_configs: Sequence, interpreter_config, key: list[str], rep_ms: int | None = None,
                    graph_timing: bool = False, **options):
    """``@triton.autotune`` over ``autotune_configs(gpu_configs, interpreter_config)``, keyed by the
    kernel arguments named in ``key`` (Triton adds the tensors' dtypes to the key). ``rep_ms``: time
    each candidate over this many milliseconds (after 5 of warm-up) instead of Triton's 25 + 100, for
    kernels of tens of microseconds with many candidates and keys; ``graph_timing``: time each candidate
    replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``, over ``rep_ms`` or 20 ms) instead
    of launched from Python, for kernels that run in CUDA graphs and can take less time than their
    launch (~20 us in Python): do_bench then times the host, every candidate alike, and the pick is noise.
    Capturing costs up to a few hundred milliseconds a candidate, once per key. ``options`` go to
    ``triton.autotune`` as they are (e.g. ``prune_configs_by``)."""
    import triton

    configs = autotune_configs(gpu_configs, interpreter_config)
    if graph_timing:
        def do_bench(fn, quantiles):
            import triton.testing

            return triton.testing.do_bench_cudagraph(fn, rep=rep_ms or 20, quantiles=quantiles)

        options["do_bench"] = do_bench
    elif rep_ms is not None:
        def do_bench(fn, quantiles):
            import triton.testing

            return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, quantiles=quantiles)

        options["do_bench"] = do_bench
    return triton.autotune(configs=configs, key=key, **options)


def autotuned(kernel, candidates: Sequence, key: list[str], rep_ms: int = 20):
    """``kernel`` under :func:`triton_autotune` over ``candidates`` = ((constexprs dict, num_warps), ...);
    the first is the interpreter's."""
    import triton

    configs = [triton.Config(dict(c), num_warps=w) for c, w in candidates]
    return triton_autotune(configs, configs[0], key=key, rep_ms=rep_ms)(kernel)


def launch_config(tuned, config: dict | None):
    """(kernel, launch kwargs): the autotuner, or with ``config`` ({constexprs..., "num_warps": w}) the
    bare kernel launched with that configuration (tests run every candidate this way)."""
    return (tuned, {}) if config is None else (tuned.fn, dict(config))


def describe_config(cfg) -> str:
    """A triton.Config as "NAME=v ... wN"."""
    return " ".join([f"{k}={v}" for k, v in cfg.kwargs.items()] + [f"w{cfg.num_warps}"])


def config_text(tuned) -> str:
    """The configuration an autotuner used last, as "NAME=v ... wN" ("" before any)."""
    cfg = getattr(tuned, "best_config", None)
    return "" if cfg is None else describe_config(cfg)


def _cannot_time() -> bool:
    """Whether timing a kernel now would break what is running: CUDA-graph capture, torch.compile
    tracing, or fake tensors (a torch.library fake kernel)."""
    if torch.compiler.is_compiling():
        return True
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # a torch without it: fake tensors are then not detected
        return False
    return detect_fake_mode() is not None


@dataclass
class ConfigPicker:
    """The fastest of ``candidates`` per call-shape key, timed once (on the first call with that key)
    and remembered in ``picked``.

    ``config(key, launch)`` returns the configuration; ``launch(cfg)`` must run the kernel once with
    ``cfg`` (it is called repeatedly while timing, so it must not change its inputs). A candidate
    that fails to compile or launch (e.g. out of shared memory on a smaller GPU) is skipped; a
    CoscaleError from ``launch`` is the caller's error and propagates. ``rounds``: timing rounds over
    all candidates, each candidate keeping its fastest round, so neither compilation nor the GPU's
    clock ramp favours the candidates timed last."""

    name: str
    candidates: tuple[dict, ...]
    interpreter_config: dict
    rounds: int = 2
    picked: dict[Hashable, dict] = field(default_factory=dict)

    def config(self, key: Hashable, launch: Callable[[dict], object]) -> dict:
        if interpreting():
            return self.interpreter_config
        cfg = self.picked.get(key)
        if cfg is None:
            if _cannot_time():
                return self.candidates[0]
            cfg = self.picked[key] = self._fastest(key, launch)
        return cfg

    def clear(self) -> None:
        """Forget every choice (the next call of each key tunes again)."""
        self.picked.clear()

    def _fastest(self, key: Hashable, launch: Callable[[dict], object]) -> dict:
        import triton.testing

        runnable, error = [], None
        for i, cand in enumerate(self.candidates):  # compile and run each once before any is timed
            try:
                launch(cand)
                runnable.append(i)
            except CoscaleError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU: skip it
                error = exc
        if not runnable:
            raise CoscaleError(f"no {self.name} configuration runs on this GPU for {key}: {error}") from error
        best: dict[int, float] = {}
        for _ in range(self.rounds):
            for i in runnable:
                ms = triton.testing.do_bench(lambda c=self.candidates[i]: launch(c), warmup=5, rep=40)
                best[i] = min(ms, best.get(i, ms))
        return self.candidates[min(runnable, key=best.__getitem__)]
