"""Why a run's routers send every token to the same experts: what the gates see, step by step (CPU).

Run: `PYTHONPATH=src python tools/router_collapse.py [--config CONFIG] [--lr LR] [--gate-lr-scale S]`.

Trains a model (a preset or a config.json; default: proxy-v3's routing at hidden size 1,024) on the
embedded corpus with AdamW and aux-loss-free balancing, and prints per MoE layer every few steps:
- `collinear`: |mean of the gate inputs' unit vectors|^2, 0 for tokens in every direction, 1 when every
  token's gate input points the same way (then no router can tell tokens apart, and a bias, which shifts
  every token's scores alike, cannot split them: it only moves the whole batch from one expert to another);
- `spread`: the scores' standard deviation over tokens, mean over experts;
- `hot`: the largest mean score of an expert (1.0: a sigmoid saturated for every token);
- `top share`: the largest fraction of the batch's tokens routed to one expert (1.0: MaxVio at its maximum);
- `|bias|`: the largest router bias.

What it showed (2026-12-03): at hidden 1,024 and lr 3e-3 the gate inputs are 0.8-0.9 collinear from step
10 on, one expert's score saturates at 1.0 for every token and takes all of them, while the loss rises
(an unstable learning rate for that width); proxy-v3 (hidden 7,168) at lr 5e-4 and `small` at 3e-3 show
MaxVio at its maximum on the H200 through 300 steps, which this reproduces on the CPU. At lr 5e-4 (and at
coscale train's width-scaled default, 7.5e-4 for this width) the routing stays balanced. At hidden 4,096 the
default (1.875e-4) with train's bias update speed (0.0067, 30 warm-up steps, batch 8) still saturated one
expert of the second layer for every token by step 100 (top share 0.98-0.99), as proxy-v3 did on the H200
for its first 200 steps; `--gate-lr-scale 0.1` kept the top share at 0.31-0.43 with the same loss. On the
H200 the same scale (`coscale train --router-lr-scale 0.1`, proxy-v3, run 28) did not remove the early collapse
(mean MaxVio 2.53 over the first 150 steps against 2.39-2.78 at scale 1), though the routers balanced better
later: there, with the routers' rate at a tenth, the collapse at step 30 cannot come from the routers' own
movement, so the gate inputs are the next thing to watch on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from coscale.config import ModelConfig, get_preset
from coscale.model.moe import Gate, update_router_biases
from coscale.model.transformer import DeepseekForCausalLM
from coscale.train.data import embedded_corpus_text


def default_config() -> ModelConfig:
    """proxy-v3's routing (16 experts, top-4, 4 groups of which 2, sigmoid, noaux_tc) at hidden 1,024."""
    return dataclasses.replace(
        get_preset("proxy-v3"), hidden_size=1024, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, moe_intermediate_size=64, vocab_size=256, num_nextn_predict_layers=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a preset name or a config.json (default: proxy-v3's routing at 1,024)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gate-lr-scale", type=float, default=1.0, help="the routers' learning rate over --lr")
    parser.add_argument("--gamma", type=float, default=0.02, help="bias update speed")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--every", type=int, default=10, help="print every N steps")
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.seq_len, args.every) < 1 or args.lr <= 0 or args.gate_lr_scale < 0:
        parser.error("--steps, --batch-size, --seq-len, --every and --lr must be positive, --gate-lr-scale >= 0")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.config is None:
        cfg = default_config()
    elif args.config.endswith(".json"):
        cfg = ModelConfig(**json.load(open(args.config)))
    else:
        cfg = get_preset(args.config)
    model = DeepseekForCausalLM(cfg)
    model.init_weights()
    model.train()
    tokens = np.frombuffer(embedded_corpus_text().encode(), dtype=np.uint8).astype(np.int64) % cfg.vocab_size
    gate_params = [p for n, p in model.named_parameters() if n.endswith("gate.weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("gate.weight")]
    base_lr = (args.lr, args.lr * args.gate_lr_scale)
    optimizer = torch.optim.AdamW([{"params": others}, {"params": gate_params}], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    gates = [(name, m) for name, m in model.named_modules() if isinstance(m, Gate)]
    seen: dict[str, tuple] = {}

    def watch(name):
        def hook(gate, inputs, outputs):
            x = inputs[0].detach().float()
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            scores = gate.scores(inputs[0]).detach()
            share = outputs[0].flatten().bincount(minlength=scores.shape[1]).max().item() / x.shape[0]
            seen[name] = (unit.mean(0).norm().item() ** 2, scores.std(0).mean().item(), scores.mean(0).max().item(),
                          share)
        return hook

    for name, gate in gates:
        gate.register_forward_hook(watch(name))
    gen = torch.Generator().manual_seed(0)
    print(f"{'step':>5} {'loss':>7}  {'layer':28} {'collinear':>9} {'spread':>7} {'hot':>5} {'top share':>9} "
          f"{'|bias|':>6}")
    for step in range(1, args.steps + 1):
        for group, lr in zip(optimizer.param_groups, base_lr):
            group["lr"] = lr * min(1.0, step / max(1, args.warmup))
        starts = torch.randint(0, len(tokens) - args.seq_len - 1, (args.batch_size,), generator=gen).tolist()
        batch = torch.stack([torch.from_numpy(tokens[s:s + args.seq_len + 1]) for s in starts])
        out = model.compute_loss(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model, args.gamma)
        if step % args.every == 0:
            for i, (name, gate) in enumerate(gates):
                col, spread, hot, share = seen[name]
                bias = gate.e_score_correction_bias
                bias = float(bias.abs().max()) if bias is not None else float("nan")
                head = f"{step:5d} {out.main_loss.item():7.3f}" if i == 0 else " " * 13
                print(f"{head}  {name:28} {col:9.3f} {spread:7.3f} {hot:5.3f} {share:9.3f} {bias:6.2f}")


if __name__ == "__main__":
    main()
