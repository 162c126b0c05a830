"""`coscale serve`, `coscale bench-serve` and `coscale tokenize`."""

from __future__ import annotations

import argparse
import os

from coscale.errors import CoscaleError, writing

SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client", "httpx", "pydantic")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("checkpoint", help="HF-format checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--tokenizer", default=None, help="a directory or tokenizer.json, or 'bytes' (default: the "
                   "checkpoint's tokenizer.json, else byte-level)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per KV-cache block (default: %(default)s)")
    p.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16", help="(default: %(default)s)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: from free memory "
                   "on CUDA, a small cache on CPU)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="share of the GPU's free memory the KV cache may take, CUDA only (default: 0.9)")
    p.add_argument("--max-num-seqs", type=int, default=128, help="running requests at most (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget per engine step (default: %(default)s)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the CUDA-graphed decode step (default: on, unless the checkpoint's layers "
                   "are FP8; the first decode steps compile)")
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                   help="launch the next engine step while the last one's tokens come back (auto: on CUDA "
                   "without --speculative) (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running requests get to finish "
                   "on SIGTERM before they are cancelled (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")
    p.set_defaults(func=run_serve)

    b = subparsers.add_parser("bench-serve",
                              help="load a running server with concurrent streaming clients; TTFT, TPOT")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    b.add_argument("--model", default=None, help="model id (default: the server's first)")
    b.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="(default: %(default)s)")
    b.add_argument("--num-requests", type=int, default=64, help="requests in all (default: %(default)s)")
    b.add_argument("--concurrency", type=int, default=8, help="clients at once (default: %(default)s)")
    b.add_argument("--prompt", default=None, help="prompt text (default: a fixed English sentence)")
    b.add_argument("--prompt-tokens", type=int, default=None,
                   help="random prompts of this many token ids instead (completions only)")
    b.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default: %(default)s)")
    b.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let replies stop at EOS (default: exactly --max-tokens each)")
    b.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s, greedy)")
    b.add_argument("--max-duration", type=float, default=600.0,
                   help="seconds for the whole run; requests still running then are cancelled (default: %(default)s)")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    b.add_argument("--seed", type=int, default=None, help="for --prompt-tokens (default: 0)")
    b.add_argument("--out", default=None, help="write the results as JSON to this file")
    b.add_argument("--check", action="store_true", help="after the load, check that no KV-cache block is left in "
                   "use (/metrics) and that each request's text equals a single-request run of it (greedy); "
                   "exit 1 when not")
    b.set_defaults(func=run_bench_serve)

    t = subparsers.add_parser("tokenize", help="tokenize text or JSONL files into .bin shards for `coscale train`")
    t.add_argument("inputs", nargs="+", metavar="FILE", help="UTF-8 text files, or JSONL with --jsonl-key")
    t.add_argument("--out", required=True, help="output directory for tokens-00000.bin, ...")
    t.add_argument("--tokenizer", default="bytes",
                   help="a directory or tokenizer.json, or 'bytes' (default: %(default)s)")
    t.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard at most (default: %(default)s)")
    t.add_argument("--jsonl-key", default=None, help="read JSONL files, one document per line, text in this key")
    t.add_argument("--no-eos", dest="eos", action="store_false", help="no EOS token between documents")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.set_defaults(func=run_tokenize)


def _require_serving_packages() -> None:
    import importlib.util

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise CoscaleError(f"serving needs {', '.join(missing)}: pip install 'coscale[serve]'")


def _check_tokenizer(tokenizer, checkpoint: str) -> None:
    from coscale.config import ModelConfig

    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):  # a training run directory: the engine reads its config itself
        return
    vocab = ModelConfig.from_json(path).vocab_size
    if tokenizer.vocab_size > vocab:
        raise CoscaleError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                           f"({vocab}); pass the matching --tokenizer")
    if tokenizer.name == "bytes" and vocab != 256:
        raise CoscaleError(f"{checkpoint} has no tokenizer.json and its vocabulary ({vocab}) is not byte-level; "
                           "pass --tokenizer")


def _check_serve_args(args) -> None:
    """What can be refused before the checkpoint is loaded (minutes for a large one)."""
    import math
    import socket

    if os.path.isfile(args.checkpoint):
        raise CoscaleError(f"{args.checkpoint} is a file; serve takes a checkpoint directory (config.json + weights)")
    if not os.path.isdir(args.checkpoint):
        raise CoscaleError(f"checkpoint directory not found: {args.checkpoint}")
    if not 0 <= args.shutdown_grace < math.inf:
        raise CoscaleError(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    if not 1 <= args.port <= 65535:
        raise CoscaleError(f"--port must be in 1..65535, got {args.port}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise CoscaleError("--served-model-name must not be empty")
    if args.speculative and args.overlap == "on":
        raise CoscaleError("--overlap on does not work with --speculative (its steps depend on the tokens just "
                           "accepted); use --overlap auto or off")
    try:
        socket.getaddrinfo(args.host, args.port)
    except (socket.gaierror, UnicodeError) as e:
        raise CoscaleError(f"--host {args.host!r} is not an address this machine can listen on: {e}") from None


def run_serve(args) -> int:
    _require_serving_packages()
    import logging

    from coscale.tokenizer import checkpoint_tokenizer

    _check_serve_args(args)
    from coscale.infer.commands import resolve_device
    from coscale.infer.engine import Engine, EngineConfig
    from coscale.serve.app import build_app
    from coscale.serve.server import make_server

    device = resolve_device(args.device)
    if device.type != "cuda" and args.gpu_memory_fraction is not None:
        raise CoscaleError("--gpu-memory-fraction sizes the KV cache on CUDA; on the CPU use --num-blocks")
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    _check_tokenizer(tokenizer, args.checkpoint)
    config = EngineConfig(max_model_len=args.max_model_len, block_size=args.block_size,
                          kv_cache_dtype=args.kv_cache_dtype, num_blocks=args.num_blocks,
                          gpu_memory_fraction=0.9 if args.gpu_memory_fraction is None else args.gpu_memory_fraction,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, speculative=args.speculative,
                          cuda_graphs=args.cuda_graphs, compile=args.compile,
                          overlap={"auto": None, "on": True, "off": False}[args.overlap])
    engine = Engine.from_pretrained(args.checkpoint, config, device=device)
    name = args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(args.checkpoint)))
    # (an empty --served-model-name is refused in _check_serve_args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    stats = engine.stats()
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (max_model_len {engine.max_model_len}, "
          f"KV cache {stats.cache_tokens} tokens in {stats.num_blocks} blocks, tokenizer {tokenizer.name})",
          flush=True)
    app = build_app(engine, tokenizer, name)
    make_server(app, args.host, args.port, shutdown_grace=args.shutdown_grace, log_level=args.log_level).run()
    return 0


def run_bench_serve(args) -> int:
    _require_serving_packages()
    import asyncio

    from tqdm import tqdm

    from coscale.serve.bench import DEFAULT_PROMPT, BenchConfig, run_bench

    if args.prompt is not None and args.prompt_tokens is not None:
        raise CoscaleError("--prompt and --prompt-tokens exclude each other (random token ids or one text)")
    if args.seed is not None and args.prompt_tokens is None:
        raise CoscaleError("--seed draws the random prompts of --prompt-tokens; without it there is nothing to seed")
    if args.out:  # checked before the load, not after it
        if os.path.isdir(args.out):
            raise CoscaleError(f"--out {args.out} is a directory; give a file name")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise CoscaleError(f"--out {args.out}: the directory {parent} does not exist")
    cfg = BenchConfig(url=args.url, model=args.model, endpoint=args.endpoint, num_requests=args.num_requests,
                      concurrency=args.concurrency, prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt,
                      prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                      temperature=args.temperature, max_duration=args.max_duration, request_timeout=args.timeout,
                      seed=0 if args.seed is None else args.seed, verify=args.check)
    cfg.check()  # before the progress bar
    with tqdm(total=cfg.num_requests, unit="req", desc="bench-serve") as bar:
        result = asyncio.run(run_bench(cfg, progress=lambda r: bar.update(1)))
    print(result.table())
    if args.out:
        with writing(args.out), open(args.out, "w") as f:
            f.write(result.to_json() + "\n")
        print(f"wrote {args.out}")
    return 0 if result.completed and (result.check is None or result.check["passed"]) else 1


def run_tokenize(args) -> int:
    from coscale.tokenizer import load_tokenizer, token_dtype, tokenize_files

    tokenizer = load_tokenizer(args.tokenizer)
    writer = tokenize_files(args.inputs, tokenizer, args.out, shard_tokens=args.shard_tokens,
                            jsonl_key=args.jsonl_key, append_eos=args.eos, progress=args.progress)
    dtype = token_dtype(tokenizer.vocab_size).name
    print(f"wrote {writer.total} tokens in {len(writer.paths)} shard(s) to {args.out} ({dtype}, vocabulary "
          f"{tokenizer.vocab_size})")
    print(f"train on them with: coscale train --data {os.path.join(args.out, '*.bin')} --bin-dtype {dtype} "
          f"(a model with vocab_size >= {tokenizer.vocab_size})")
    return 0
