"""End-to-end decode throughput of the serving engine against the memory roofline and HF transformers.

Run: `PYTHONPATH=src python benchmarks/bench_decode.py [--quick]`; appends a line to
benchmarks/results/bench_decode.jsonl (results_log.py).
`--quick` (about 3 minutes on one H200): prompts of 512 tokens, 32 timed decode steps, HF with 8 new
tokens. `--checkpoint DIR --speculative` measures a trained checkpoint with and without MTP drafts
(acceptance rate and speed-up; batch 1 and 32 by default) instead of the random model.

Model: DeepSeek-V2-Lite's shape (15.7B parameters, BF16), randomly initialised on the GPU (std 0.02):
the speed does not depend on the values. For each batch (1, 16, 64, 128) the engine gets that many
greedy requests with random prompts, runs them until all are decoding, then times `--steps` decode
steps (CUDA graphs replayed, one token per request per step; the step's host work included).

Memory roofline (tokens/s if a step only read HBM at 4.25 TB/s, the H200's measured copy bandwidth):
bytes per step = 2 x (non-expert weights without the embedding + MoE layers x experts touched x one
expert's weights) + batch x context x the KV cache per token (coscale.analysis.kv_cache), where a batch
of B tokens touches E (1 - (1 - k/E)^B) of a layer's E experts under uniform routing and context is the
mean over the timed steps. When coscale.analysis.serving is present, its decode estimate for the same
setting (one GPU, BF16 weights and cache, no micro-batch overlap) is printed beside it.

`--breakdown`: where a step's time goes. Per batch: wall ms per step; GPU ms per step (CUDA events from
the step's first kernel to its tokens copied back) and of its forward alone; host ms per phase of the
engine's step (schedule, build, forward launch, sample launch, advance, wait for the GPU, land); and the
top kernels by GPU time over three decode steps as the engine runs them (compiled and replayed from CUDA
graphs where it does so; the profiler sees each kernel of a replayed graph) from torch.profiler.
`--overlap on|off|both`: the engine's overlapped schedule (default on; both: each batch twice).
`--shared-stream N`: the shared experts of each MoE layer on a second stream beside its router and routed experts
at decode batches of at most N tokens (coscale.kernels.side_stream; default off).
`--decode-kernels auto|torch|both`: coscale's decode kernels (the fused router, the Triton GEMM for the
dense layers at a few rows) or PyTorch's (the reference router, cuBLAS); both: one engine each.

HF transformers: DeepseekV2ForCausalLM from the same config (random weights, BF16, SDPA attention),
`generate` greedy with the same batch and prompt length; decode tokens/s = batch x (n - 1) / (time of
n new tokens - time of 1). Skipped where it runs out of memory or with --no-hf.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import traceback

import torch

from coscale.analysis.kv_cache import kv_cache_bytes_per_token
from coscale.analysis.models import as_view
from coscale.config import ModelConfig, get_preset
from coscale.infer.cache import blocks_for
from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.sampling import SamplingParams
from coscale.model import DeepseekForCausalLM
from results_log import ResultsLog

H200_COPY_TBPS = 4.25


def memory_roofline(cfg: ModelConfig, batch: int, context: float, tbps: float = H200_COPY_TBPS) -> dict:
    v = as_view(cfg)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    E, k = v.n_routed_experts, v.experts_per_token
    touched = E * (1 - (1 - k / E) ** batch) if E else 0.0
    weights = 2 * (v.non_expert_params - v.embedding_params + moe_layers * touched * v.expert_params)
    kv = batch * context * kv_cache_bytes_per_token(v, 2)
    step_s = (weights + kv) / (tbps * 1e12)
    return dict(weight_gb=weights / 1e9, kv_gb=kv / 1e9, roofline_step_ms=step_s * 1e3,
                roofline_tokens_per_s=batch / step_s)


def analysis_estimate(cfg: ModelConfig, batch: int, context: int) -> float | None:
    """coscale.analysis.serving's decode tokens/s for the setting, when that module exists."""
    try:
        from coscale.analysis.serving import ServingLayout, decode
    except ImportError:
        return None
    try:
        res = decode(model=cfg, hardware="h200", layout=ServingLayout(micro_batches=1), batch=batch,
                     context=int(context), weight_dtype="bf16", kv_dtype="bf16")
        return res.tokens_per_s_per_gpu
    except Exception:  # an API that changed: report nothing rather than fail the run
        traceback.print_exc()
        return None


def random_model(cfg: ModelConfig) -> DeepseekForCausalLM:
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    model.init_weights()
    return model.eval()


def run_engine_batch(engine: Engine, batch: int, prompt_len: int, steps: int, gen, breakdown: bool = False,
                     top: int = 20) -> dict:
    vocab = engine.model.config.vocab_size
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(rid, prompt, SamplingParams(max_tokens=engine.max_model_len - prompt_len, temperature=0.0))
    t0 = time.perf_counter()
    started: set[str] = set()
    while len(started) < batch:  # prefill (chunked under the token budget)
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    for _ in range(3):  # graph capture for this batch size, then replays (the overlapped pipeline full)
        engine.step()
    stats0 = engine.stats()
    engine.step_timer.reset(enabled=breakdown)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = engine.stats().generation_tokens_total - stats0.generation_tokens_total
    accepted = engine.stats().accepted_tokens_total - stats0.accepted_tokens_total
    drafts = engine.stats().draft_tokens_total - stats0.draft_tokens_total
    entry = dict(batch=batch, prompt_len=prompt_len, steps=steps, tokens=tokens, decode_s=seconds,
                 tokens_per_s=tokens / seconds, step_ms=seconds / steps * 1e3, prefill_s=prefill_s,
                 acceptance=accepted / drafts if drafts else None, overlap=engine.overlap)
    if breakdown:
        timer = engine.step_timer
        gpu = timer.gpu_ms() or {}
        entry.update(gpu_step_ms=gpu.get("step"), gpu_forward_ms=gpu.get("forward"),
                     host_ms={k: v / steps * 1e3 for k, v in timer.host.items()})
        timer.reset(enabled=False)
        entry["top_kernels"] = top_kernels(engine, 3, top)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return entry


def top_kernels(engine: Engine, steps: int, n: int = 20) -> list[dict]:
    """The n kernels with the most GPU time over `steps` decode steps as the engine runs them (so the
    compiled, graph-replayed kernels when it replays graphs: an eager profile would show the uncompiled
    step's kernels, which is not what is timed); on CPU (a smoke test) the operators with the most CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    engine.step()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)) if cuda else \
            ev.self_cpu_time_total
        if us:
            rows.append(dict(name=ev.key[:90], us_per_step=us / steps, calls_per_step=ev.count / steps))
    total = sum(r["us_per_step"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = 100 * r["us_per_step"] / total
    rows.sort(key=lambda r: -r["us_per_step"])
    return [dict(total_us_per_step=total, kernels_per_step=sum(r["calls_per_step"] for r in rows))] + rows[:n]


def _time_generate(model, ids: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_decode(cfg: ModelConfig, results: list[dict], prompt_len: int, new_tokens: int, gen) -> None:
    """Add HF generate's decode tokens/s to each result (one HF model for all batches)."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    d = cfg.to_dict()
    d.update(rope_scaling=None, eos_token_id=None, bos_token_id=None)
    hf_cfg = DeepseekV2Config(**d)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    measured: dict[int, float] = {}  # batch -> HF tokens/s (measured once when a batch runs twice)
    for entry in results:
        if "error" in entry:
            continue
        if entry["batch"] in measured:
            entry["hf_tokens_per_s"] = measured[entry["batch"]]
            entry["speedup_vs_hf"] = entry["tokens_per_s"] / entry["hf_tokens_per_s"]
            continue
        try:
            ids = torch.randint(0, cfg.vocab_size, (entry["batch"], prompt_len), generator=gen).cuda()
            _time_generate(model, ids, 2)  # warm-up
            one, full = _time_generate(model, ids, 1), _time_generate(model, ids, new_tokens)
            entry["hf_tokens_per_s"] = entry["batch"] * (new_tokens - 1) / max(full - one, 1e-9)
            entry["speedup_vs_hf"] = entry["tokens_per_s"] / entry["hf_tokens_per_s"]
            measured[entry["batch"]] = entry["hf_tokens_per_s"]
        except torch.OutOfMemoryError:
            entry["hf_tokens_per_s"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as exc:
            entry["hf_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print({k: entry.get(k) for k in ("batch", "tokens_per_s", "hf_tokens_per_s")}, flush=True)
    del model
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 3 minutes on one H200")
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 16 64 128 (1 32 with --speculative)")
    parser.add_argument("--prompt-len", type=int, help="default 1024 (512 with --quick)")
    parser.add_argument("--steps", type=int, help="timed decode steps (default 64, 32 with --quick)")
    parser.add_argument("--hf-tokens", type=int, help="new tokens for HF generate (default 16, 8 with --quick)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of the random V2-Lite-shape model")
    parser.add_argument("--speculative", action="store_true", help="with --checkpoint: MTP drafts on and off")
    parser.add_argument("--kv-cache-dtype", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--fp8-gluon", action=argparse.BooleanOptionalAction, default=None,
                        help="with --kv-cache-dtype fp8: the MLA decode on the warp-specialized Gluon kernel where it "
                             "takes the case, or (--no-fp8-gluon) the Triton kernel (mla_decode.FP8_GLUON, default on)")
    parser.add_argument("--gluon-design", choices=("converter", "registers"),
                        help="with --kv-cache-dtype fp8: which Gluon MLA decode kernel (mla_decode.FP8_GLUON_DESIGN)")
    parser.add_argument("--min-split-keys", type=int, metavar="N", help="the fewest keys an MLA decode context "
                        "split takes (mla_decode.MIN_TOKENS_PER_SPLIT, default 64): fewer splits short contexts more")
    parser.add_argument("--shared-stream", type=int, metavar="N", help="run each MoE layer's shared experts on a "
                        "second stream beside the routed experts at decode batches of at most N tokens "
                        "(coscale.kernels.side_stream.SHARED_STREAM_MAX_TOKENS, default 4; 0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the graphed decode step (default: the engine's, on with CUDA graphs)")
    parser.add_argument("--breakdown", action="store_true", help="host/GPU time per step and the top kernels")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="kernels listed by --breakdown (default 20)")
    parser.add_argument("--decode-kernels", choices=("auto", "torch", "both"), default="auto",
                        help="coscale's decode kernels (fused router, Triton decode linears) or PyTorch's; both: "
                             "one engine each, side by side (EngineConfig.decode_kernels)")
    parser.add_argument("--overlap", choices=("on", "off", "both"), default="on",
                        help="the engine's overlapped schedule (off without speculation only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    if args.speculative and not args.checkpoint:
        parser.error("--speculative measures a trained checkpoint's MTP modules: give --checkpoint")
    if args.top < 1:
        parser.error("--top: at least 1 kernel")
    if args.min_split_keys is not None and args.min_split_keys < 1:
        parser.error("--min-split-keys: at least 1")
    if args.shared_stream is not None and args.shared_stream < 0:
        parser.error("--shared-stream: a batch size, 0 or more")
    if args.fp8_gluon is not None and args.kv_cache_dtype != "fp8":
        parser.error("--fp8-gluon / --no-fp8-gluon choose the FP8 cache's decode kernel: add --kv-cache-dtype fp8")
    from coscale.kernels import mla_decode as mla_decode_module

    if args.gluon_design is not None and args.kv_cache_dtype != "fp8":
        parser.error("--gluon-design chooses the FP8 cache's Gluon decode kernel: add --kv-cache-dtype fp8")
    if args.fp8_gluon is not None:
        mla_decode_module.FP8_GLUON = args.fp8_gluon
    if args.gluon_design is not None:
        mla_decode_module.FP8_GLUON_DESIGN = args.gluon_design
    if args.min_split_keys is not None:
        mla_decode_module.MIN_TOKENS_PER_SPLIT = args.min_split_keys
    if args.shared_stream is not None:
        from coscale.kernels import side_stream

        side_stream.SHARED_STREAM_MAX_TOKENS = args.shared_stream
    batches = args.batches or ([1, 32] if args.speculative else [1, 16, 64, 128])
    prompt_len = args.prompt_len or (512 if args.quick else 1024)
    steps = args.steps or (32 if args.quick else 64)
    hf_tokens = args.hf_tokens or (8 if args.quick else 16)
    gen = torch.Generator().manual_seed(args.seed)

    t_load = time.perf_counter()
    if args.checkpoint:
        from coscale.infer.loading import load_for_inference

        model = load_for_inference(args.checkpoint, torch.bfloat16, torch.device("cuda"))
    else:
        model = random_model(get_preset("deepseek-v2-lite"))
    cfg = model.config
    load_s = time.perf_counter() - t_load
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "model": args.checkpoint or "deepseek-v2-lite (random)", "params": model.num_parameters(),
            "kv_cache_dtype": args.kv_cache_dtype, "fp8_gluon": mla_decode_module.FP8_GLUON,
            "fp8_gluon_design": mla_decode_module.FP8_GLUON_DESIGN,
            "copy_tbps": H200_COPY_TBPS, "min_split_keys": mla_decode_module.MIN_TOKENS_PER_SPLIT,
            "shared_stream": args.shared_stream, "load_s": load_s}
    print(json.dumps(meta), flush=True)
    log = ResultsLog("bench_decode")
    results: list[dict] = []
    start = time.time()
    max_len = prompt_len + 3 * (steps + 16)  # room for up to 3 tokens per step (MTP drafts accepted)
    modes = [(True, False)] if args.speculative else []
    modes = [(False, o) for o in {"on": [True], "off": [False], "both": [False, True]}[args.overlap]] + modes
    kernel_choices = ["torch", "auto"] if args.decode_kernels == "both" else [args.decode_kernels]
    for kernels, (speculative, overlap) in ((k, m) for k in kernel_choices for m in modes):
        depth = cfg.num_nextn_predict_layers if speculative else 0
        config = EngineConfig(max_model_len=max_len, max_num_seqs=max(batches),
                              num_blocks=max(batches) * blocks_for(max_len + depth, 64) + 8,
                              max_num_batched_tokens=8192, speculative=speculative,
                              kv_cache_dtype=args.kv_cache_dtype, overlap=overlap, compile=args.compile,
                              decode_kernels=kernels)
        engine = Engine(model, config)
        print(engine.describe(), flush=True)
        for batch in batches:
            entry = {"speculative": speculative, "decode_kernels": kernels}
            try:
                entry.update(run_engine_batch(engine, batch, prompt_len, steps, gen, args.breakdown, args.top))
                entry["decode_mode"] = engine.decode_mode()
                entry.update(memory_roofline(cfg, batch, prompt_len + steps / 2))
                entry["pct_of_roofline"] = 100 * entry["tokens_per_s"] / entry["roofline_tokens_per_s"]
                entry["analysis_tokens_per_s"] = analysis_estimate(cfg, batch, prompt_len + steps // 2)
            except Exception as exc:
                entry.update(batch=batch, error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            results.append(entry)
            log.save(meta=meta, results=results)  # keep partial results if the lease ends mid-run
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()}, flush=True)
        del engine
        torch.cuda.empty_cache()
    if not args.no_hf and not args.checkpoint:
        del model
        torch.cuda.empty_cache()
        hf_decode(cfg, results, prompt_len, hf_tokens, gen)
    meta["wall_s"] = time.time() - start
    log.save(meta=meta, results=results)
    print_table(results)
    if args.breakdown:
        print_breakdown(results)
    print(json.dumps({"meta": meta, "n_results": len(results), "errors": sum("error" in r for r in results)}))


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "-"


def print_table(results):
    print(f"\n{'kernels':>7} {'spec':>4} {'ovl':>3} {'batch':>5} {'tok/s':>9} {'step ms':>8} {'roofline':>9} "
          f"{'%roof':>6} "
          f"{'analysis':>9} {'HF tok/s':>9} {'x HF':>6} {'accept':>6}")
    for r in results:
        if "error" in r:
            spec = "y" if r.get("speculative") else "n"
            print(f"{r.get('decode_kernels', '-'):>7} {spec:>4} {'':>3} {r['batch']:5d} ERROR {r['error']}")
            continue
        print(f"{r.get('decode_kernels', '-'):>7} {'y' if r['speculative'] else 'n':>4} "
              f"{'y' if r.get('overlap') else 'n':>3} {r['batch']:5d} "
              f"{_fmt(r['tokens_per_s'], '9.1f')} "
              f"{_fmt(r['step_ms'], '8.2f')} {_fmt(r['roofline_tokens_per_s'], '9.1f')} "
              f"{_fmt(r['pct_of_roofline'], '6.1f')} {_fmt(r.get('analysis_tokens_per_s'), '9.1f'):>9} "
              f"{_fmt(r.get('hf_tokens_per_s'), '9.1f'):>9} {_fmt(r.get('speedup_vs_hf'), '6.1f'):>6} "
              f"{_fmt(r.get('acceptance'), '6.2f'):>6}")


def print_breakdown(results):
    print(f"\n{'spec':>4} {'ovl':>3} {'batch':>5} {'wall ms':>8} {'GPU ms':>7} {'fwd ms':>7}  host ms / step by phase")
    for r in results:
        if "host_ms" not in r:
            continue
        phases = " ".join(f"{k} {v:.3f}" for k, v in r["host_ms"].items())
        print(f"{'y' if r['speculative'] else 'n':>4} {'y' if r['overlap'] else 'n':>3} {r['batch']:5d} "
              f"{r['step_ms']:8.3f} {_fmt(r['gpu_step_ms'], '7.3f')} {_fmt(r['gpu_forward_ms'], '7.3f')}  {phases}")
    for r in results:
        kernels = r.get("top_kernels")
        if not kernels:
            continue
        head = kernels[0]
        print(f"\nbatch {r['batch']} (overlap {r['overlap']}): decode step as run, {head['total_us_per_step']:.0f} us "
              f"of kernels, {head['kernels_per_step']:.0f} kernels / step")
        for k in kernels[1:]:
            print(f"  {k['us_per_step']:9.1f} us {k['pct']:5.1f}% x{k['calls_per_step']:6.1f}  {k['name']}")


if __name__ == "__main__":
    main()
