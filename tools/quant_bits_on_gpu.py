"""Where the quantization kernels' bits differ from the reference on a GPU: every rows and 128x1 candidate on the
hard inputs of tests/test_quant.py (values over 8 decades, signed zeros, NaN and -inf, near-ties), against the
CPU reference and the reference run on the GPU, with the first mismatching elements (x, scale, bits).

Also the one-launch dual kernel's candidates and the weight kernel's candidates writing W^T's bytes too (WT);
then the word transpose's candidates (quant_ops.TRANSPOSE_WORDS) against torch; then the producers' transposed
launch (cols_quant_kernel): every candidate with the identity producer against the references, and with
SwiGLU, its backward and the permutation's gather against the first candidate (the per-element arithmetic is
the same in every candidate, so any difference is a transpose or packing fault). `--only-producer-cols` runs
that last part alone. Run on a GPU:
`PYTHONPATH=src TRITON_INTERPRET=0 python3 tools/quant_bits_on_gpu.py` (about a minute). Run 31 found with it
the sign of zero in tiles holding an infinity and the PACK4 candidates' byte packing.
"""

import argparse
import sys

import torch

sys.path.insert(0, "tests")
from coscale.kernels import quant_ops as qo  # noqa: E402
from test_quant import _hard_input, bits  # noqa: E402


def report(tag, got, ref_gpu, ref_cpu, x, scales, layout):
    """One line per candidate (mismatches against each reference) and its first six mismatching elements."""
    g, rg, rc = bits(got).cpu(), bits(ref_gpu).cpu(), bits(ref_cpu).cpu()
    known = ~torch.isnan(ref_cpu.float().cpu())
    bad = ((g != rc) & known).nonzero()
    print(f"{tag}: kernel vs cpu ref {len(bad)}, gpu ref vs cpu ref {int(((rg != rc) & known).sum())}, "
          f"kernel vs gpu ref {int(((g != rg) & known).sum())}")
    for i, j in bad[:6].tolist():
        inside = j < (x.shape[1] if layout == "rows" else x.shape[0])
        xv = (x[i, j] if layout == "rows" else x[j, i]).item() if inside else 0.0
        sv = scales[i, j // 128].item()
        print(f"   [{i},{j}] x={xv!r} s={sv!r} got={int(g[i, j]):#04x} ref_gpu={int(rg[i, j]):#04x} "
              f"ref_cpu={int(rc[i, j]):#04x}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only-dual", action="store_true", help="only the one-launch dual kernel's candidates")
    parser.add_argument("--dual-chunked", action="store_true",
                        help="of the dual kernel's candidates, only the PACK4 ones in column chunks")
    parser.add_argument("--only-producer-cols", action="store_true", help="only the producers' transposed launch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quant_bits_on_gpu.py needs a CUDA GPU (it compares the kernels' bytes there)")
    if args.only_producer_cols:
        producer_cols()
        return
    only_dual = args.only_dual or args.dual_chunked
    dual_configs = [(cfg, w) for cfg, w in qo.DUAL_CONFIGS
                    if not args.dual_chunked or (cfg["PACK4"] and cfg["CHUNK"] < 128)]
    cases = [("hard fp32", _hard_input(300, 200, torch.float32, seed=300)),
             ("hard bf16", _hard_input(300, 200, torch.bfloat16, seed=300)),
             ("signed zeros fp32", _hard_input(256, 384, torch.float32, seed=11))]
    for name, x in cases:
        xg = x.cuda()
        for round_scale in (False, True):
            ry, rs, ryt, rst = qo.act_quant_reference(x, round_scale, True, True, True)
            gy, _, gyt, _ = qo.act_quant_reference(xg, round_scale, True, True, True)
            print(f"== {name} round_scale={round_scale}")
            for cfg, warps in () if only_dual else qo.ROWS_CONFIGS:
                y, s, _, _ = qo.quant_outputs(*x.shape, xg.device, True, False, True)
                qo.launch_rows(xg, y, s, round_scale, config={**cfg, "num_warps": warps})
                report(f"rows {cfg} w{warps}", y, gy, ry, x.float(), rs, "rows")
            for cfg, warps in () if only_dual else qo.COLS_CONFIGS:
                _, _, yt, st = qo.quant_outputs(*x.shape, xg.device, False, True, True)
                qo.launch_cols(xg, yt, st, round_scale, config={**cfg, "num_warps": warps})
                report(f"cols {cfg} w{warps}", yt, gyt, ryt, x.float(), rst, "cols")
            for cfg, warps in dual_configs:  # both layouts from one launch
                outs = qo.quant_outputs(*x.shape, xg.device, True, True, True)
                qo.launch_producer("dual", outs, xg, round_scale, m=x.shape[0], k=x.shape[1],
                                   config={**cfg, "num_warps": warps})
                report(f"dual rows {cfg} w{warps}", outs[0], gy, ry, x.float(), rs, "rows")
                report(f"dual cols {cfg} w{warps}", outs[2], gyt, ryt, x.float(), rst, "cols")
        # 128x128 weight blocks, W^T's bytes from the same program (WT: quant_ops.WEIGHT_PAIR_ONE_PASS)
        rw, rsw = qo.weight_quant_128x128_ref(x)
        gw, _ = qo.weight_quant_128x128_ref(xg)
        for cfg, warps in () if only_dual else qo.WEIGHT_CONFIGS:
            y, s, yt, st = qo._weight_outputs([xg], True)
            yt.view(torch.uint8).fill_(0x7F)
            qo.launch_weight(xg, y, s, st, False, config={**cfg, "num_warps": warps}, yt=yt)
            report(f"weight WT {cfg} w{warps}", y, gw, rw, x.float(), rsw.repeat_interleave(128, 0), "rows")
            wrong = int((bits(yt) != bits(y).t()).sum())
            print(f"weight WT {cfg} w{warps}: W^T bytes vs W's transposed {wrong}")
    # W^T's bytes through 32-bit words (quant_ops.TRANSPOSE_WORDS): every candidate, every byte
    for shape in ((512, 768), (3, 256, 384), (7168, 2048)):
        y = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
        for cfg, warps in () if only_dual else qo.TRANSPOSE_WORDS_CONFIGS:
            out = torch.zeros(*shape[:-2], shape[-1], shape[-2], dtype=torch.uint8, device="cuda")
            qo.transpose_bytes(y, out, config={**cfg, "num_warps": warps}, words=True)
            wrong = int((out != y.transpose(-1, -2)).sum())
            print(f"transpose_words {shape} {cfg} w{warps}: kernel vs torch {wrong}")
    if not only_dual:
        producer_cols()


def producer_cols():
    """cols_quant_kernel's candidates (quant_ops.PRODUCER_COLS_CONFIGS): see the module docstring."""
    for name, x in (("hard fp32", _hard_input(300, 200, torch.float32, seed=300)),
                    ("hard bf16", _hard_input(300, 200, torch.bfloat16, seed=300))):
        xg = x.cuda()
        _, _, ryt, rst = qo.act_quant_reference(x, False, True, True, True)
        _, _, gyt, _ = qo.act_quant_reference(xg, False, True, True, True)
        for cfg, warps in qo.PRODUCER_COLS_CONFIGS:
            outs = qo.quant_outputs(*x.shape, xg.device, False, True, True)
            qo.launch_producer("cols", outs, xg, False, m=x.shape[0], k=x.shape[1], config={**cfg, "num_warps": warps})
            report(f"producer cols identity {name} {cfg} w{warps}", outs[2], gyt, ryt, x.float(), rst, "cols")
    gen = torch.Generator().manual_seed(36)
    m, inter, hidden, topk = 1000, 384, 640, 4
    gate_up = (torch.randn(m, 2 * inter, generator=gen) * 2).to(torch.bfloat16).cuda()
    da = torch.randn(m, inter, generator=gen).to(torch.bfloat16).cuda()
    x = (torch.randn(m // topk, hidden, generator=gen) * 3).to(torch.bfloat16).cuda()
    row_pair = torch.cat([torch.randperm(m - 40, generator=gen), torch.full((40,), -1)]).to(torch.int32).cuda()
    w = torch.rand(m, generator=gen).cuda()
    for source, src, k, extra in ((1, gate_up, inter, dict(b=da, up_offset=inter)),
                                  (2, gate_up, 2 * inter, dict(b=da, up_offset=inter)),
                                  (3, x, hidden, dict(idx=row_pair, w=w, topk=topk))):
        first = None
        for cfg, warps in qo.PRODUCER_COLS_CONFIGS:
            outs = qo.quant_outputs(m, k, src.device, False, True, True)
            outs[2].view(torch.uint8).fill_(0x7F)  # NaN bytes: a byte the kernel does not write shows
            qo.launch_producer("cols", outs, src, False, m=m, k=k, source=source, config={**cfg, "num_warps": warps},
                               **extra)
            if first is None:
                first = outs
            wrong = int((bits(outs[2]) != bits(first[2])).sum())
            scales = int((outs[3] != first[3]).sum())
            print(f"producer cols source {source} {cfg} w{warps}: bytes vs the first candidate {wrong}, "
                  f"scales {scales}, nonzero bytes {int((bits(outs[2]) != 0).sum())}")


if __name__ == "__main__":
    main()
