"""MTP speculative decoding on a trained model: acceptance rate and speed-up at batch 1 and 32.

Run: `PYTHONPATH=src python benchmarks/bench_mtp.py` (one GPU, about 3 minutes) or `--quick` (CPU smoke
test with `tiny`, about a minute); appends a line to benchmarks/results/bench_mtp.jsonl (results_log.py).

1. Train: `coscale train --model small` (MTP depth 1, the preset's) on the built-in corpus (UTF-8 bytes
   of CPython's pydoc topics) for `--train-steps` steps, checkpoint saved at the end only, into
   `--run-dir` (a temporary folder by default). `--checkpoint DIR` skips training and measures a run or
   checkpoint directory that exists.
2. Decode: prompts are `--prompt-len`-byte windows of the held-out tail of the corpus (the last 5%,
   which training never saw), one per request; each request generates `--gen-tokens` tokens greedily.
   For each batch the engine runs (a) without speculation, with its default schedule (overlapped on
   CUDA), (b) without speculation, synchronous (the schedule speculation uses), (c) with the MTP module
   drafting. Timed from the step after every request has its first token to the last token; tokens/s =
   tokens generated in that window / its seconds (after a warm-up of the same batch: graph capture,
   compilation and autotuning are not timed). Acceptance = accepted drafts / drafts. Speed-up =
   (c) / (b) and (c) / (a). "same" = the fraction of requests whose MTP tokens equal the plain greedy
   tokens (exact in float arithmetic; BF16 batches of different shapes can round differently).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.loading import load_for_inference
from coscale.infer.sampling import SamplingParams
from coscale.train.data import embedded_corpus_text
from results_log import ResultsLog

VAL_FRACTION = 0.05  # coscale train's default held-out fraction


def train(preset: str, steps: int, run_dir: str, device: str, batch_size: int, seq_len: int) -> float:
    cmd = [sys.executable, "-m", "coscale", "train", "--model", preset, "--steps", str(steps), "--out", run_dir,
           "--overwrite", "--no-progress", "--no-tensorboard", "--save-interval", "0", "--eval-interval", "0",
           "--keep-checkpoints", "1", "--batch-size", str(batch_size), "--seq-len", str(seq_len),
           "--device", device, "--log-interval", str(max(1, steps // 5))]
    if device == "cpu":
        cmd += ["--threads", "1"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def held_out_prompts(n: int, length: int) -> list[list[int]]:
    tokens = np.frombuffer(embedded_corpus_text().encode("utf-8"), dtype=np.uint8)
    held = tokens[int(len(tokens) * (1 - VAL_FRACTION)):]
    stride = max(1, (len(held) - length) // n)
    return [held[i * stride: i * stride + length].astype(np.int64).tolist() for i in range(n)]


def decode(model, prompts: list[list[int]], gen_tokens: int, speculative: bool, overlap, device,
           compile: bool | None = None) -> dict:
    B, P = len(prompts), len(prompts[0])
    depth = model.config.num_nextn_predict_layers if speculative else 0
    config = EngineConfig(max_model_len=P + gen_tokens + 8, block_size=16, max_num_seqs=B,
                          max_num_batched_tokens=max(B * P, B * (1 + depth)), speculative=speculative,
                          overlap=overlap, num_blocks=B * (-(-(P + gen_tokens + 8 + depth) // 16)) + 4,
                          compile=compile)
    engine = Engine(model, config, device=device)
    # warm-up: the same batch first, its requests ending one step apart so that the batch shrinks through
    # every graph size (speculative requests finish at different steps in the timed run), so that
    # CUDA-graph capture, compilation and kernel autotuning happen before the timed run, as a server's
    # first requests would take them
    for i, p in enumerate(prompts):
        engine.add_request(f"warm{i}", p, SamplingParams(max_tokens=min(gen_tokens, 4 + i), temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    warm = engine.stats()
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=gen_tokens, temperature=0.0))
        out[f"r{i}"] = []

    def step():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids

    while any(not v for v in out.values()):  # prefill: every request has its first token
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    first = sum(len(v) for v in out.values())
    t0 = time.perf_counter()
    while engine.has_unfinished():
        step()
    sync()
    seconds = time.perf_counter() - t0
    s = engine.stats()
    assert s.used_blocks == 0
    drafts = s.draft_tokens_total - warm.draft_tokens_total
    return dict(tokens=out, tokens_per_s=(sum(len(v) for v in out.values()) - first) / seconds, seconds=seconds,
                acceptance=(s.accepted_tokens_total - warm.accepted_tokens_total) / drafts if drafts else None,
                overlap=engine.overlap)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny, a few training steps")
    parser.add_argument("--checkpoint", help="measure this run/checkpoint directory instead of training")
    parser.add_argument("--run-dir", help="where training writes (default: a temporary folder)")
    parser.add_argument("--train-steps", type=int, help="default 1200 (30 with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 32 (1 4 with --quick)")
    parser.add_argument("--prompt-len", type=int, help="default 64 (16 with --quick)")
    parser.add_argument("--gen-tokens", type=int, help="default 128 (12 with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the graphed decode step (default: the engine's, on with CUDA graphs)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        raise SystemExit("bench_mtp.py needs a CUDA GPU (or --quick for the CPU smoke test)")
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    preset = "tiny" if args.quick else "small"
    steps = args.train_steps or (30 if args.quick else 1200)
    batches = args.batches or ([1, 4] if args.quick else [1, 32])
    prompt_len = args.prompt_len or (16 if args.quick else 64)
    gen_tokens = args.gen_tokens or (12 if args.quick else 128)
    meta = {"preset": preset, "device": torch.cuda.get_device_name() if cuda else "cpu", "quick": args.quick,
            "compile": args.compile,
            "train_steps": None if args.checkpoint else steps, "prompt_len": prompt_len, "gen_tokens": gen_tokens}
    log = ResultsLog("bench_mtp")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            path = args.run_dir or os.path.join(tmp, "run")
            bs, seq = (8, 64) if args.quick else (16, 256)
            meta.update(train_s=train(preset, steps, path, "cuda" if cuda else "cpu", bs, seq),
                        train_batch=bs, train_seq_len=seq)
        meta["checkpoint"] = path
        model = load_for_inference(path, torch.bfloat16 if cuda else torch.float32, device)
    if not model.config.num_nextn_predict_layers:
        raise SystemExit(f"{path}: the model has no MTP module (num_nextn_predict_layers = 0)")
    meta["mtp_depth"] = model.config.num_nextn_predict_layers
    print(json.dumps(meta), flush=True)
    results = []
    for batch in batches:
        prompts = held_out_prompts(batch, prompt_len)
        plain = decode(model, prompts, gen_tokens, False, None, device, args.compile)
        sync = decode(model, prompts, gen_tokens, False, False, device, args.compile) if cuda else plain
        mtp = decode(model, prompts, gen_tokens, True, None, device, args.compile)
        same = sum(mtp["tokens"][k] == plain["tokens"][k] for k in plain["tokens"]) / batch
        entry = dict(batch=batch, acceptance=mtp["acceptance"], plain_tokens_per_s=plain["tokens_per_s"],
                     plain_overlap=plain["overlap"], sync_tokens_per_s=sync["tokens_per_s"],
                     mtp_tokens_per_s=mtp["tokens_per_s"], speedup_vs_sync=mtp["tokens_per_s"] / sync["tokens_per_s"],
                     speedup_vs_plain=mtp["tokens_per_s"] / plain["tokens_per_s"], same_tokens=same)
        results.append(entry)
        log.save(meta=meta, results=results)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}, flush=True)
    print(f"\n{'batch':>5} {'accept':>6} {'plain tok/s':>11} {'sync tok/s':>10} {'MTP tok/s':>9} "
          f"{'x sync':>6} {'x plain':>7} {'same':>5}")
    for r in results:
        print(f"{r['batch']:5d} {r['acceptance']:6.1%} {r['plain_tokens_per_s']:11.1f} {r['sync_tokens_per_s']:10.1f} "
              f"{r['mtp_tokens_per_s']:9.1f} {r['speedup_vs_sync']:6.2f} {r['speedup_vs_plain']:7.2f} "
              f"{r['same_tokens']:5.0%}")


if __name__ == "__main__":
    main()
