"""The serving engine's host work per decode step, measured on CPU with a tiny model.

Run: `PYTHONPATH=src python benchmarks/bench_engine_host.py [--quick] [--overlap on|off]`; appends a line
to benchmarks/results/bench_engine_host.jsonl (results_log.py).

What a decode step costs the host besides the model: scheduling, building the flat batch, sampling's
bookkeeping, turning sampled tokens into outputs. On a GPU that time either hides behind the previous
step's kernels (the overlapped schedule, docs/serving.md) or adds to every step. Here the model is
`tiny` cut to one layer, so its forward is small, and its two entry points (hidden_states_paged and
logits) are timed: host time per step = wall time per step - time inside the model. The engine's own
per-phase timer (Engine.step_timer) splits the host time where the engine has one.

For each batch (1, 16, 64, 128 by default) that many greedy requests with random 32-token prompts are
prefilled, then `--steps` decode steps are timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from coscale.config import get_preset
from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.sampling import SamplingParams
from coscale.model import DeepseekForCausalLM
from results_log import ResultsLog


class ModelClock:
    """Wraps the model's serving entry points and sums the seconds spent inside them."""

    def __init__(self, model):
        self.seconds = 0.0
        for name in ("hidden_states_paged", "logits"):
            setattr(model, name, self._timed(getattr(model, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper


def run_batch(model, clock: ModelClock, batch: int, steps: int, prompt_len: int, overlap, gen) -> dict:
    kw = {} if overlap is None else {"overlap": overlap}
    engine = Engine(model, EngineConfig(max_model_len=prompt_len + steps + 64, block_size=16,
                                        max_num_seqs=batch, max_num_batched_tokens=max(batch * prompt_len, 64),
                                        **kw))
    vocab = model.config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=steps + 32, temperature=0.0))
    for _ in range(4):  # prefill, then the first decodes (and, overlapped, the pipeline filled)
        engine.step()
    timer = getattr(engine, "step_timer", None)
    if timer is not None:
        timer.reset(enabled=True)
    clock.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    entry = dict(batch=batch, steps=steps, wall_ms=wall / steps * 1e3, model_ms=clock.seconds / steps * 1e3,
                 host_ms=(wall - clock.seconds) / steps * 1e3, overlap=getattr(engine, "overlap", None))
    if timer is not None:
        entry["phases_ms"] = {k: v / steps * 1e3 for k, v in timer.host.items()}
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--steps", type=int, help="timed decode steps (default 64, 16 with --quick)")
    parser.add_argument("--overlap", choices=("on", "off"), help="the engine's overlapped schedule (default: its own)")
    args = parser.parse_args()
    steps = args.steps or (16 if args.quick else 64)
    overlap = None if args.overlap is None else args.overlap == "on"
    torch.set_num_threads(1)  # the host's work is single-threaded; one thread keeps the model time steady
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1)).eval()
    clock = ModelClock(model)
    gen = torch.Generator().manual_seed(0)
    meta = {"model": "tiny, 1 layer, float32", "device": "cpu", "threads": torch.get_num_threads(),
            "steps": steps, "prompt_len": 32}
    log = ResultsLog("bench_engine_host")
    results = []
    for batch in args.batches:
        results.append(run_batch(model, clock, batch, steps, 32, overlap, gen))
        log.save(meta=meta, results=results)
    print(json.dumps(meta))
    print(f"{'batch':>5} {'overlap':>7} {'wall ms':>8} {'model ms':>8} {'host ms':>8}  host phases (ms / step)")
    for r in results:
        phases = " ".join(f"{k} {v:.3f}" for k, v in r.get("phases_ms", {}).items())
        print(f"{r['batch']:5d} {str(r['overlap']):>7} {r['wall_ms']:8.3f} {r['model_ms']:8.3f} {r['host_ms']:8.3f}  "
              f"{phases}")


if __name__ == "__main__":
    main()
