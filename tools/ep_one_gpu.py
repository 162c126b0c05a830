"""The expert-parallel layer on one GPU through NCCL: dispatch / combine with CUDA tensors, NCCL's
all-to-all (a group of one rank exchanging with itself), its stream and the two-micro-batch overlap,
compared with the single-process MoE layer (GroupedExperts) on the same weights and routing.

    torchrun --nproc-per-node 1 tools/ep_one_gpu.py          (PYTHONPATH=src; prints one line per case)

tests/test_parallel_cuda.py runs ``check_ep_layer`` in-process (a NCCL group of one from a FileStore)
where a GPU exists. Each case reports the relative L2 error of the output and of the input and weight
gradients against the local layer, and passes under the codec's bound: fp32/bf16 wire formats 2e-2
(bf16 compute; different summation orders), LogFMT 5e-2, FP8 1e-1.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

CASES = (  # (dispatch codec, combine codec, micro-batches, bound)
    ("fp32", "fp32", 1, 2e-2),
    ("bf16", "bf16", 2, 2e-2),
    ("fp8", "bf16", 1, 1e-1),
    ("fp8", "bf16", 2, 1e-1),
    ("logfmt8", "logfmt10", 2, 5e-2),
)


def _codec(name):
    from coscale.parallel.codec import LogFMTCodec

    return LogFMTCodec(int(name[6:])) if name.startswith("logfmt") else name


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_ep_layer(device: torch.device, tokens: int = 512, hidden: int = 512, n_experts: int = 8,
                   topk: int = 2, intermediate: int = 256) -> list[dict]:
    """Run every case on ``device`` under the initialised default group; one dict per case."""
    from coscale.model.moe import GroupedExperts
    from coscale.parallel import apply_expert_parallel

    if os.environ.get("COSCALE_EP_LOOPBACK") != "1":
        raise SystemExit("set COSCALE_EP_LOOPBACK=1: otherwise a group of one rank skips the all-to-all")
    torch.manual_seed(0)
    local = GroupedExperts(n_experts, hidden, intermediate)
    for p in local.parameters():
        torch.nn.init.normal_(p, std=hidden**-0.5)
    local = local.to(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(n_experts, device=device)[:topk] for _ in range(tokens)])
    w = torch.rand(tokens, topk, device=device).softmax(-1)
    grad_out = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)

    def run(module):
        xi = x.clone().requires_grad_(True)
        out = module(xi, idx, w)
        out.backward(grad_out)
        return out.detach(), xi.grad, [p.grad for p in (module.w_gate, module.w_up, module.w_down)]

    ref_out, ref_gx, ref_gw = run(local)
    results = []
    for dispatch_codec, combine_codec, micro, bound in CASES:
        holder = torch.nn.Module()
        holder.experts = copy.deepcopy(local)
        holder.experts.zero_grad(set_to_none=True)
        apply_expert_parallel(holder, dist.group.WORLD, dispatch_codec=_codec(dispatch_codec),
                              combine_codec=_codec(combine_codec), micro_batches=micro)
        t0 = time.perf_counter()
        out, gx, gw = run(holder.experts)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        errs = {"out": _rel(out, ref_out), "grad_x": _rel(gx, ref_gx),
                "grad_w": max(_rel(g, r) for g, r in zip(gw, ref_gw))}
        results.append({"dispatch": dispatch_codec, "combine": combine_codec, "micro_batches": micro,
                        "bound": bound, **errs, "ok": max(errs.values()) <= bound and out.is_cuda == x.is_cuda,
                        "ms": 1e3 * (time.perf_counter() - t0), "bytes": holder.experts.traffic.local_bytes})
    return results


def main() -> int:
    from coscale.parallel import init_parallel

    os.environ.setdefault("COSCALE_EP_LOOPBACK", "1")
    if not torch.cuda.is_available():
        raise SystemExit("ep_one_gpu.py needs a CUDA GPU (NCCL)")
    ctx = init_parallel(ep_size=dist.get_world_size() if dist.is_initialized() else
                        int(os.environ.get("WORLD_SIZE", "1")))
    try:
        results = check_ep_layer(ctx.device)
    finally:
        dist.destroy_process_group()
    for r in results:
        print(f"EP on {torch.cuda.get_device_name()} backend nccl world 1: dispatch {r['dispatch']:>7} combine "
              f"{r['combine']:>8} micro-batches {r['micro_batches']}: rel err out {r['out']:.2e} grad_x "
              f"{r['grad_x']:.2e} grad_w {r['grad_w']:.2e} (bound {r['bound']:.0e}) "
              f"{'OK' if r['ok'] else 'FAIL'}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
