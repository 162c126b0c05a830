"""Where a speculative decode step's time goes, against a plain step (cProfile over 30 engine steps).

A random ``small`` model with its MTP module (bf16, CUDA graphs, not compiled), the synchronous schedule
both ways so that they compare; drafts of a random model are rejected, so each step emits one token per
request either way and the difference is the cost of verifying and drafting. Prints ms per step and the
profile (sorted by own time: time blocked on the GPU shows in the function that waits).

Run: ``PYTHONPATH=src python3 tools/profile_spec_step.py [--batches 1 32] [--preset small] [--device cuda]``.
BENCHMARKS.md (third session, run 13) has what it printed.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from coscale.config import get_preset
from coscale.errors import CoscaleError
from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.sampling import SamplingParams
from coscale.model import DeepseekForCausalLM


def profile(model, dev, batch: int, speculative: bool, steps: int = 30) -> None:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    e = Engine(model, EngineConfig(block_size=16, num_blocks=batch * 14 + 4, max_num_seqs=batch,
                                   max_num_batched_tokens=batch * 64, max_model_len=200, speculative=speculative,
                                   overlap=False, compile=False), device=dev)
    prompt = [1, 2, 3] * 21
    for i in range(batch):  # warm-up requests ending one step apart: every graph size captured
        e.add_request(f"warm{i}", prompt, SamplingParams(max_tokens=8 + i, temperature=0.0))
    while e.has_unfinished():
        e.step()
    for i in range(batch):
        e.add_request(f"r{i}", prompt, SamplingParams(max_tokens=100, temperature=0.0))
    for _ in range(3):
        e.step()
    sync()
    before, prof = e.stats(), cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        e.step()
    sync()
    prof.disable()
    ms = (time.perf_counter() - start) / steps * 1e3
    tokens = (e.stats().generation_tokens_total - before.generation_tokens_total) / steps
    print(f"\n##### batch {batch}, speculative {speculative}: {ms:.2f} ms/step, {tokens:.1f} tokens/step", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    while e.has_unfinished():
        e.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_preset(args.preset)).to(device=dev, dtype=torch.bfloat16).eval()
    if not model.config.num_nextn_predict_layers:
        raise SystemExit(f"preset {args.preset} has no MTP module")
    for batch in args.batches:
        for speculative in (False, True):
            profile(model, dev, batch, speculative)


if __name__ == "__main__":
    try:
        main()
    except CoscaleError as e:  # a bad preset or checkpoint: one line, not a traceback
        raise SystemExit(f"{__file__}: {e}") from None
