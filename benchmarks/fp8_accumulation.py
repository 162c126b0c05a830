"""Why FP8 GEMMs promote to FP32 every 128 elements of K: an emulation that runs on a CPU.

Model of the Hopper FP8 tensor-core accumulator (DeepSeek-V3 report section 3.3; the ISCA paper's
"FP22": 13 fraction bits kept): each WGMMA step adds 32 exact FP8 products to the running sum after
aligning every addend to the largest exponent among them and dropping the bits below 13 fraction bits
(truncation). Three ways to compute C = A @ B^T for random A [R, K], B [C, K]:
  no_promotion    per-tensor scaled E4M3, the whole K summed in the limited accumulator, scaled once
  promote_128     1x128 scaled E4M3 (the recipe); the limited accumulator restarts every 128 elements
                  of K and its sum is scaled and added into an FP32 accumulator (DeepSeek / coscale)
  exact_sum       the same 1x128-quantized products summed exactly (quantization error alone)
Errors are relative Frobenius norms against float64 A @ B^T of the unquantized inputs. Two input
distributions: zero-mean normal, and positive-mean (|N(0,1)|, like post-activation values) where the
growing sum makes the alignment loss systematic.
Run: python benchmarks/fp8_accumulation.py [--rows 16] [--seed 0]; appends a line to
benchmarks/results/fp8_accumulation.jsonl (results_log.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from results_log import ResultsLog

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
FRACTION_BITS = 13
WGMMA_K = 32


def quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of x in groups of `group` along K (group = K means per row, ~per tensor)."""
    r, k = x.shape
    tiles = x.view(r, k // group, group)
    scale = tiles.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (tiles / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float64)
    return q.view(r, k), scale.squeeze(-1).double()


def limited_sum(terms: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + sum(terms) with every addend aligned to the largest exponent and truncated."""
    allterms = torch.cat([acc.unsqueeze(-1), terms], -1)
    biggest = allterms.abs().amax(-1, keepdim=True)
    exponent = torch.floor(torch.log2(biggest.clamp_min(1e-300)))
    ulp = torch.exp2(exponent - FRACTION_BITS)
    return (torch.trunc(allterms / ulp) * ulp).sum(-1)


def limited_dot(products: torch.Tensor) -> torch.Tensor:
    """Sum products [..., K] in WGMMA-sized steps through the limited accumulator."""
    acc = torch.zeros(products.shape[:-1], dtype=torch.float64)
    for k0 in range(0, products.shape[-1], WGMMA_K):
        acc = limited_sum(products[..., k0 : k0 + WGMMA_K], acc)
    return acc


def run_case(a: torch.Tensor, b: torch.Tensor) -> dict:
    exact = a.double() @ b.double().t()
    norm = exact.norm()
    k = a.shape[1]
    # no promotion: per-row (tensor-like) scales, whole K in the limited accumulator
    qa, sa = quantize(a, k)
    qb, sb = quantize(b, k)
    no_promo = limited_dot(qa[:, None, :] * qb[None, :, :]) * sa * sb.t()
    # promotion every 128: 1x128 scales; the limited accumulator restarts per 128-element block
    qa, sa = quantize(a, 128)
    qb, sb = quantize(b, 128)
    promo = torch.zeros_like(exact, dtype=torch.float32)
    exact_q = torch.zeros_like(exact)
    for kb in range(k // 128):
        block = slice(kb * 128, (kb + 1) * 128)
        products = qa[:, None, block] * qb[None, :, block]
        scale = sa[:, kb : kb + 1] * sb[:, kb][None, :]
        promo += (limited_dot(products) * scale).float()  # FP32 accumulator on the CUDA cores
        exact_q += products.sum(-1) * scale
    return {
        "no_promotion": float((no_promo - exact).norm() / norm),
        "promote_128": float((promo.double() - exact).norm() / norm),
        "exact_sum": float((exact_q - exact).norm() / norm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="rows of A and of B (output is rows x rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    results = []
    for dist in ("normal", "positive"):
        for k in (1024, 2048, 4096, 8192, 16384):
            a = torch.randn(args.rows, k)
            b = torch.randn(args.rows, k)
            if dist == "positive":
                a, b = a.abs(), b.abs()
            results.append({"distribution": dist, "K": k, **run_case(a, b)})
    print(f"FP8 accumulation emulation ({FRACTION_BITS} fraction bits kept, {WGMMA_K}-deep steps), "
          f"{args.rows}x{args.rows} outputs, {time.time() - start:.1f} s")  # fmt: skip
    print(f"{'inputs':>9} {'K':>6} {'no promotion':>13} {'promote/128':>12} {'exact sum':>10}")
    for r in results:
        print(f"{r['distribution']:>9} {r['K']:>6} {r['no_promotion']:>13.2e} {r['promote_128']:>12.2e} "
              f"{r['exact_sum']:>10.2e}")  # fmt: skip
    ResultsLog("fp8_accumulation").save(fraction_bits=FRACTION_BITS, rows=args.rows, results=results)


if __name__ == "__main__":
    main()
