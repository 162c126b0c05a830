"""The server under load: N concurrent streaming clients over loopback, every text checked against a
single-request run, no KV-cache block left in use afterwards, TTFT/TPOT percentiles.

Run: `PYTHONPATH=src python benchmarks/bench_serve_load.py` (CUDA: `small`, random weights, BF16) or
`--quick` (CPU: `tiny`, random weights); appends a line to benchmarks/results/bench_serve_load.jsonl.

A randomly initialised model is saved as an HF-format checkpoint in a temporary folder and served by
`coscale serve` in a child process on a free loopback port (byte tokenizer, max_num_seqs = clients).
Then `coscale bench-serve`'s driver (coscale.serve.bench) sends one streaming completion per client,
all at once (concurrency = requests = `--clients`, default 256), greedy, `--max-tokens` each (EOS
ignored), each prompt `--prompt-tokens` random byte ids of its own; with its check on: after the load
the server must be idle with 0 cache blocks in use (/metrics), and each request sent again alone must
stream the same text. The server is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from coscale.checkpoint import save_pretrained
from coscale.config import get_preset
from coscale.model import DeepseekForCausalLM
from coscale.serve.bench import BenchConfig, run_bench
from results_log import ResultsLog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: tiny")
    parser.add_argument("--clients", type=int, default=256, help="concurrent streaming clients (default 256)")
    parser.add_argument("--max-tokens", type=int, help="tokens per reply (default 64, 16 with --quick)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                        help="the server engine's overlapped schedule (coscale serve --overlap)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        raise SystemExit("bench_serve_load.py needs a CUDA GPU (or --quick for tiny on CPU)")
    preset = "small" if cuda else "tiny"
    max_tokens = args.max_tokens or (64 if cuda else 16)
    meta = {"preset": preset, "device": torch.cuda.get_device_name() if cuda else "cpu", "clients": args.clients,
            "max_tokens": max_tokens, "prompt_tokens": args.prompt_tokens, "overlap": args.overlap}
    log = ResultsLog("bench_serve_load")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = DeepseekForCausalLM(get_preset(preset))
        model.init_weights()
        path = os.path.join(tmp, preset)
        save_pretrained(model.to(torch.bfloat16) if cuda else model, path)
        del model
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "coscale", "serve", path, "--port", str(port), "--tokenizer", "bytes",
               "--device", "cuda" if cuda else "cpu", "--max-num-seqs", str(args.clients),
               "--max-model-len", str(args.prompt_tokens + max_tokens + 64), "--log-level", "warning",
               "--overlap", args.overlap]
        env = dict(os.environ)
        if not cuda:
            env.setdefault("OMP_NUM_THREADS", "1")
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        server = subprocess.Popen(cmd, env=env)
        try:
            while not _healthy(url):
                if server.poll() is not None or time.perf_counter() - t0 > args.startup_timeout:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            meta["startup_s"] = time.perf_counter() - t0
            cfg = BenchConfig(url=url, num_requests=args.clients, concurrency=args.clients,
                              prompt_tokens=args.prompt_tokens, max_tokens=max_tokens, temperature=0.0,
                              max_duration=600, request_timeout=600, verify=True)
            result = asyncio.run(run_bench(cfg))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    meta["server_exit_code"] = server.returncode
    out = json.loads(result.to_json())
    log.save(meta=meta, results=[out])
    print(json.dumps(meta))
    print(result.table())
    return 0 if result.check and result.check["passed"] and result.completed == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
