"""`coscale generate`: decode from an HF-format checkpoint directory (plain or MTP speculative)."""

from __future__ import annotations

import math
import time

from coscale.errors import CoscaleError
from coscale.train.config import seed_problem, threads_problem  # torch-free: the checks come at once

DEFAULT_PROMPT = "The "


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (latent KV cache; optional MTP speculation)",
        description="Generate text from a checkpoint with the latent KV cache, greedily, by sampling, or "
                    "with MTP speculative decoding.",
    )
    p.add_argument("checkpoint", help="HF-format checkpoint directory (config.json + safetensors), or a "
                   "`coscale train` run directory (its latest checkpoint)")
    p.add_argument("--prompt", help="prompt text, for byte-level models (vocab_size 256) "
                   f"(default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate after the prompt (default: 200)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy only)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's, all cores; use 1 on a shared machine, "
                        "where decoding's many small operations wait on busy cores)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling with --temperature > 0 "
                   "(default: 0)")
    p.set_defaults(func=run_generate)


def _prompt_ids(args, vocab_size: int) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise CoscaleError("--prompt-ids must be comma-separated integers") from None
    elif vocab_size == 256:
        ids = list((DEFAULT_PROMPT if args.prompt is None else args.prompt).encode("utf-8"))
    else:
        raise CoscaleError(
            f"this model's vocabulary has {vocab_size} tokens and coscale ships no tokenizer for it; "
            "pass token ids with --prompt-ids"
        )
    if not ids or any(not 0 <= i < vocab_size for i in ids):
        raise CoscaleError(f"prompt token ids must be non-empty and in [0, {vocab_size})")
    return ids


def resolve_device(name: str | None):
    """``--device`` of generate and serve as a torch.device: cpu or cuda[:N] of a GPU that exists (default:
    cuda when available)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.index is not None and device.index < 0):
        raise CoscaleError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CoscaleError("--device cuda requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CoscaleError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_model(path: str, dtype, device):
    """An HF-format checkpoint directory (FP8 weights kept in FP8), or a training run / training
    checkpoint directory (coscale.infer.loading)."""
    from coscale.infer.loading import load_for_inference

    return load_for_inference(path, dtype, device)


def run_generate(args) -> int:
    # The checks that need no torch come first: importing it takes seconds.
    if args.max_new_tokens < 0:
        raise CoscaleError("--max-new-tokens must be >= 0")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CoscaleError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.speculative and args.temperature > 0:
        raise CoscaleError("--speculative decodes greedily; drop --temperature")
    if args.prompt is not None and args.prompt_ids is not None:  # --prompt-ids won and --prompt was dropped
        raise CoscaleError("--prompt and --prompt-ids both give the prompt: pass one of them")
    if args.seed is not None and args.temperature == 0:  # greedy decoding draws nothing
        raise CoscaleError("--seed seeds sampling, and decoding is greedy: add --temperature T (> 0) or drop --seed")
    args.seed = 0 if args.seed is None else args.seed
    for problem in (args.threads is not None and threads_problem(args.threads, "--threads"),
                    seed_problem(args.seed, "--seed")):  # as coscale train's (torch's limits)
        if problem:
            raise CoscaleError(problem)

    import torch

    from coscale.infer.decode import generate, generate_speculative

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.checkpoint, dtype, device).eval()
    ids = _prompt_ids(args, model.config.vocab_size)
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise CoscaleError(
            f"prompt ({len(ids)}) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's context "
            f"length ({limit} positions)"
        )
    prompt = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    if args.speculative:
        if not len(model.mtp):
            raise CoscaleError("--speculative needs the MTP module and this model has none (num_nextn_predict_"
                               "layers 0, or a checkpoint without MTP weights, as HF transformers saves them); "
                               "run without --speculative")
        out, stats = generate_speculative(model, prompt, args.max_new_tokens)
        extra = (f", {stats.main_calls} main-model calls, draft acceptance "
                 f"{stats.acceptance_rate:.0%}")
    else:
        out, extra = generate(model, prompt, args.max_new_tokens, args.temperature, gen), ""
    seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    if model.config.vocab_size == 256 and args.prompt_ids is None:
        print(bytes(ids + new).decode("utf-8", errors="replace"))
    else:
        print(",".join(map(str, ids + new)))
    print(f"[{len(new)} tokens in {seconds:.2f} s, {len(new) / max(seconds, 1e-9):.1f} tokens/s{extra}]")
    return 0
