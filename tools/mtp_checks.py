"""Two checks of MTP speculative decoding on a trained checkpoint (a GPU, or --device cpu).

1. ``drafting``: the same requests with the MTP module's forward replayed from CUDA graphs, drafted
   eagerly beside graphed main steps, and with no CUDA graphs at all: acceptance and tokens/s of each,
   and whether every draft (position and token) agrees between them. Graphed drafting must change only
   the speed.
2. ``greedy``: MTP greedy tokens against plain greedy tokens, in float32 and in bf16, at batch 1, 8 and
   32; at the first divergence, the plain model's top-2 logit gap there (a gap of one bf16 step means
   rounding: the verify step's batch shape differs from the plain step's).

Run: ``PYTHONPATH=src python3 tools/mtp_checks.py RUN_OR_CHECKPOINT [--check drafting|greedy|both]``.
Requests are held-out prompts of benchmarks/bench_mtp.py (32 bytes, 64 new tokens); bench_mtp's warm-up
and timing are reused. BENCHMARKS.md (third session, runs 12 and 14) has what it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_mtp  # noqa: E402
from coscale.errors import CoscaleError  # noqa: E402
from coscale.infer import speculative  # noqa: E402
from coscale.infer.engine import Engine  # noqa: E402
from coscale.infer.loading import load_for_inference  # noqa: E402

PROMPT, NEW = 32, 64


def drafting(model, dev, batches=(1, 8)) -> None:
    mode, drafts = {"now": ""}, []
    real = speculative.draft_logits

    def recording(m, depth, h, positions):
        logits = real(m, depth, h, positions)
        drafts.append((mode["now"], positions.tolist(), logits.argmax(-1).tolist()))
        return logits

    class Configured(Engine):  # the engine bench_mtp builds, in the mode under test
        def __init__(self, m, config, **kw):
            if mode["now"] == "no graphs":
                config.cuda_graphs = False
            super().__init__(m, config, **kw)
            if mode["now"] == "eager drafting" and self.graphs is not None:
                self.graphs.mtp_graphs = False

    speculative.draft_logits, bench_mtp.Engine = recording, Configured
    try:
        for batch in batches:
            prompts, seen = bench_mtp.held_out_prompts(batch, PROMPT), {}
            for mode["now"] in ("graphed drafting", "eager drafting", "no graphs"):
                start = len(drafts)
                r = bench_mtp.decode(model, prompts, NEW, True, None, dev, False)
                seen[mode["now"]] = ([d[1:] for d in drafts[start:]], r["tokens"])
                print(json.dumps(dict(batch=batch, mode=mode["now"], acceptance=r["acceptance"],
                                      tokens_per_s=round(r["tokens_per_s"], 1))), flush=True)
            ref_drafts, ref_tokens = seen["graphed drafting"]
            for other in ("eager drafting", "no graphs"):
                d, t = seen[other]
                same = sum(a == b for a, b in zip(ref_drafts, d))
                print(f"batch {batch}: graphed drafting vs {other}: {same}/{max(len(ref_drafts), len(d))} draft "
                      f"calls equal, tokens equal: {t == ref_tokens}", flush=True)
    finally:
        speculative.draft_logits, bench_mtp.Engine = real, Engine


def greedy(model, dev, batches=(1, 8, 32)) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype=dtype)
        for batch in batches:
            prompts = bench_mtp.held_out_prompts(batch, PROMPT)
            plain = bench_mtp.decode(m, prompts, NEW, False, False, dev, False)["tokens"]
            r = bench_mtp.decode(m, prompts, NEW, True, None, dev, False)
            line = f"{dtype} batch {batch}: same {sum(plain[k] == r['tokens'][k] for k in plain)}/{batch}, " \
                   f"acceptance {r['acceptance']:.3f}"
            for i, k in enumerate(plain):
                if plain[k] != r["tokens"][k]:
                    j = next(n for n, (a, b) in enumerate(zip(plain[k], r["tokens"][k])) if a != b)
                    with torch.no_grad():
                        logits = m(torch.tensor([prompts[i] + plain[k][:j]], device=dev))[0, -1].float()
                    top = logits.topk(2)
                    line += (f"; {k} first differs at token {j}: plain {plain[k][j]}, MTP {r['tokens'][k][j]}, "
                             f"top-2 {top.indices.tolist()}, gap {float(top.values[0] - top.values[1]):.4f}")
                    break
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a coscale train run or checkpoint directory (with an MTP module)")
    parser.add_argument("--check", choices=("drafting", "greedy", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    model = load_for_inference(args.checkpoint, torch.bfloat16, dev)
    if not model.config.num_nextn_predict_layers:
        raise SystemExit(f"{args.checkpoint}: the model has no MTP module")
    if args.check in ("drafting", "both"):
        drafting(model, dev)
    if args.check in ("greedy", "both"):
        greedy(model, dev)


if __name__ == "__main__":
    try:
        main()
    except CoscaleError as e:  # a bad preset or checkpoint: one line, not a traceback
        raise SystemExit(f"{__file__}: {e}") from None
