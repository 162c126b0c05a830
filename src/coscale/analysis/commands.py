"""``coscale analyze {kv-cache,flops,memory,inference-limit,network}`` and ``coscale report``.

Thin: parse, call the library, print one rendering (a readable table, ``--markdown`` or ``--json``).
"""

from __future__ import annotations

from coscale.analysis import ep_limit, flops, kv_cache, memory, network, throughput_commands
from coscale.analysis.memory import DTYPE_BYTES
from coscale.analysis.table import Table, render
from coscale.errors import ConfigError
from coscale.hardware import hardware_names, load_hardware

HARDWARE_CHOICES = ", ".join(hardware_names())


def register(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", help="co-design analysis: the paper's tables for any model/GPU")
    sub = analyze.add_subparsers(dest="analysis", metavar="SUBCOMMAND", required=True)

    p = _add(sub, "kv-cache", "KV-cache bytes per token and tokens that fit (Table 1)", _kv_cache, multi=True)
    p.add_argument("--dtype", choices=DTYPE_BYTES, default="bf16", help="KV-cache precision (default bf16)")
    p.add_argument("--weight-dtype", choices=DTYPE_BYTES, default="fp8", help="weights for 'tokens fit'")
    p.add_argument("--gpus", type=int, default=16, help="GPUs holding weights and cache (default 16)")

    p = _add(sub, "flops", "training FLOPs per token and parameters (Table 2)", _flops, multi=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--attention", choices=flops.ATTENTION_MODES, default="causal")
    p.add_argument("--include-embedding", action="store_true", help="count 6 x the embedding table too")
    p.add_argument("--include-mtp", action="store_true", help="count the MTP modules")

    p = _add(sub, "memory", "per-GPU memory for training or inference", _memory)
    for name in ("dp", "tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size (default 1)")
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="extra expert replicas over the EP group; any --ep then works (experts per GPU rounded up)")
    # the mode options default to None, so that one given in the other mode is refused (_memory)
    p.add_argument("--zero", type=int, help="training: ZeRO stage 0-3 (3 = FSDP; default 1)")
    p.add_argument("--seq-len", type=int, help="training: tokens per sequence (default 4096)")
    p.add_argument("--micro-batch", type=int, help="training: sequences per micro-batch (default 1)")
    p.add_argument("--weights", choices=DTYPE_BYTES, help="training: compute weights (fp8: FP8 weights; default bf16)")
    p.add_argument("--master", choices=[*DTYPE_BYTES, "none"], help="training: master weights (default fp32)")
    p.add_argument("--grads", choices=DTYPE_BYTES, help="training: gradients (default fp32)")
    p.add_argument("--moments", choices=DTYPE_BYTES, help="training: AdamW moments (default bf16)")
    p.add_argument("--activation-coeff", type=float,
                   help="training: activation bytes per token, layer and hidden unit (34; 2 = full recompute)")
    p.add_argument("--inference", action="store_true", help="weights + KV cache instead of training")
    p.add_argument("--batch", type=int, help="inference: sequences in flight (default 1)")
    p.add_argument("--context", type=int, help="inference: tokens per sequence (default 4096)")
    p.add_argument("--weight-dtype", choices=DTYPE_BYTES, help="inference weights (default fp8)")
    p.add_argument("--kv-dtype", choices=DTYPE_BYTES, help="inference: KV-cache precision (default bf16)")

    p = _add(sub, "inference-limit", "EP decoding speed limit (section 4.4.2); with no option: the paper's cases",
             _inference_limit)
    p.add_argument("--bandwidth", type=float, help="EP link bandwidth in GB/s (overrides the hardware)")
    p.add_argument("--link", choices=ep_limit.LINKS, help="which link carries EP traffic (default auto: the "
                   "scale-up fabric when it spans more than 8 GPUs, else the NICs)")
    p.add_argument("--tokens-per-device", type=int, help="tokens per device and micro-batch (default 32)")
    p.add_argument("--experts-per-token", type=int, help="default: routed + shared (9 for DeepSeek-V3)")
    p.add_argument("--hidden", type=int, help="hidden size for the communication term")
    p.add_argument("--paper-rounding", action="store_true", help="hidden = 7000, as the paper's '7K'")
    p.add_argument("--micro-batches", type=int, help="overlapped micro-batches (default 2)")
    p.add_argument("--context", type=int, help="tokens per sequence for the memory/compute bounds (default 4096)")
    p.add_argument("--mtp-acceptance", type=float, default=0.0,
                   help="MTP draft acceptance rate 0-1 (paper: 0.8-0.9, ~1.8x tokens/s)")
    p.add_argument("--sweep", help="comma-separated bandwidths in GB/s, e.g. 25,50,100,200,400,900")
    p.add_argument("--plot", help="with --sweep (or alone): write a TPOT-vs-bandwidth PNG here (needs matplotlib)")

    throughput_commands.register(sub, _add)

    p = _add(sub, "network", "network size and cost by topology (Table 3)", _network, model=False)
    p.add_argument("--radix", type=int, default=64, help="switch ports (default 64)")
    p.add_argument("--planes", type=int, default=8, help="MPFT planes / MRFT rails (default 8)")
    p.add_argument("--target", type=int, help="list the topologies reaching this many GPUs, cheapest first")
    p.add_argument("--cost", action="append", default=[], metavar="KEY=USD",
                   help="override a unit price: switch_port, copper_link, optical_link, long_optical_link")

    text = "one Markdown/HTML report with all analysis tables and charts"
    p = subparsers.add_parser("report", help=text, description=(
        "Write every analysis table (KV cache, training FLOPs, the EP decoding limit, training memory, "
        "network size and cost) and three PNG charts for one model and one GPU into a directory. The "
        "defaults (DeepSeek-V3 on H800) reproduce the paper's analysis."))
    p.add_argument("--model", default="deepseek-v3", help="model preset, config.json or checkpoint directory")
    p.add_argument("--hardware", default="h800", help=f"hardware preset ({HARDWARE_CHOICES}) or YAML/JSON file")
    p.add_argument("--output", default="coscale-report", help="output directory (default coscale-report)")
    p.add_argument("--html", action="store_true", help="write report.html instead of report.md")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts (no matplotlib needed)")
    p.set_defaults(func=_report)


def _add(sub, name: str, help_text: str, func, multi: bool = False, model: bool = True):
    p = sub.add_parser(name, help=help_text, description=help_text)
    if multi:
        p.add_argument("--model", action="append", help="model preset, config.json or checkpoint directory "
                       "(repeatable; default: the paper's table)")
    elif model:
        p.add_argument("--model", default="deepseek-v3", help="model preset, config.json or checkpoint directory")
    if model:
        p.add_argument("--hardware", default=None,
                       help=f"hardware preset ({HARDWARE_CHOICES}) or YAML/JSON file, e.g. from "
                            "'coscale calibrate' (default h800)")
    # 'coscale analyze <name>: error: ...': the CLI's error prefix names the subcommand (args.command)
    p.set_defaults(command=f"analyze {name}")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", default="text",
                     help="print JSON: {\"tables\": [{title, columns, rows, notes}]}, numbers as numbers")
    fmt.add_argument("--markdown", dest="format", action="store_const", const="markdown",
                     help="print Markdown tables")
    p.set_defaults(func=func)
    return p


def _print(tables: list[Table], args) -> int:
    print(render(tables, args.format))
    return 0


def _kv_cache(args) -> int:
    table = kv_cache.kv_cache_table(args.model, DTYPE_BYTES[args.dtype], args.hardware or "h800",
                                    args.gpus, DTYPE_BYTES[args.weight_dtype])
    return _print([table], args)


def _flops(args) -> int:
    table = flops.flops_table(args.model, args.seq_len, args.attention, args.include_embedding,
                              args.include_mtp)
    if args.hardware:
        hw = load_hardware(args.hardware)
        model, per_token = table.rows[0][0], table.rows[0][7] * 1e9
        table.notes.append(f"{model} on one {hw.name}: {hw.peak_flops('bf16') / per_token:,.0f} training "
                           "tokens/s at 100% of the dense BF16 peak; 'coscale analyze training-time' predicts "
                           "the achieved rate for a parallel layout.")
    return _print([table], args)


# analyze memory's options of one mode, with their defaults: given in the other mode they would be ignored
_MEMORY_MODES = {
    "training": dict(zero=1, seq_len=4096, micro_batch=1, weights="bf16", master="fp32", grads="fp32",
                     moments="bf16", activation_coeff=34.0),
    "inference": dict(batch=1, context=4096, weight_dtype="fp8", kv_dtype="bf16"),
}


def _memory_options(args) -> None:
    """Refuse the options of the mode not chosen; fill in the defaults of the chosen one."""
    chosen = "inference" if args.inference else "training"
    for mode, defaults in _MEMORY_MODES.items():
        given = [f"--{k.replace('_', '-')}" for k in defaults if getattr(args, k) is not None]
        if mode != chosen and given:
            hint = "add --inference" if mode == "inference" else "leave out --inference"
            raise ConfigError(f"{', '.join(given)} describe(s) {mode} memory: {hint}")
        for k, default in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, default)


def _memory(args) -> int:
    _memory_options(args)
    layout = memory.ParallelLayout(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep,
                                   zero=0 if args.inference else args.zero, redundant_experts=args.redundant_experts)
    where = f"dp={args.dp} tp={args.tp} pp={args.pp} ep={args.ep}" + (
        f" +{args.redundant_experts} redundant experts" if args.redundant_experts else "")
    if args.inference:
        m = memory.inference_memory_per_gpu(args.model, layout, args.batch, args.context,
                                            args.weight_dtype, args.kv_dtype)
        title = f"Inference memory per GPU ({args.model}, {where})"
        notes = [f"{args.weight_dtype} weights; {args.kv_dtype} KV cache for {args.batch} sequences x "
                 f"{args.context} tokens split over dp."]
    else:
        master = None if args.master == "none" else args.master
        m = memory.memory_per_gpu(args.model, layout, args.seq_len, args.micro_batch, args.weights, master,
                                  args.grads, args.moments, args.activation_coeff)
        title = f"Training memory per GPU ({args.model}, {where}, ZeRO-{args.zero})"
        notes = [f"{args.weights} weights, {args.master} master, {args.grads} gradients, {args.moments} AdamW "
                 f"moments; activations ~{args.activation_coeff:g} x seq x micro-batch x hidden bytes per layer."]
    table = memory.memory_table(m, title, notes)
    if args.hardware:
        hw = load_hardware(args.hardware)
        verdict = "fits" if m.total <= hw.hbm_bytes else "does NOT fit"
        table.notes.append(f"{hw.name} ({hw.hbm_gb:g} GB): {verdict}.")
    return _print([table], args)


def _inference_limit_conflicts(args) -> None:
    """Options that the chosen one would silently override."""
    if args.sweep is not None and args.bandwidth is not None:
        raise ConfigError("--sweep sets the bandwidths: leave out --bandwidth")
    if args.paper_rounding and args.hidden is not None:
        raise ConfigError("--paper-rounding sets the hidden size to 7000: leave out --hidden")
    if args.link is not None and (args.bandwidth is not None or args.sweep is not None):
        raise ConfigError("--link picks the hardware's link bandwidth, which --bandwidth / --sweep replace: "
                          "give one or the other")


def _inference_limit(args) -> int:
    _inference_limit_conflicts(args)
    hidden = ep_limit.PAPER_HIDDEN if args.paper_rounding else args.hidden
    given = {k: getattr(args, k) for k in ("tokens_per_device", "micro_batches", "context", "link")
             if getattr(args, k) is not None}
    common = dict(model=args.model, link=given.get("link", "auto"),
                  tokens_per_device=given.get("tokens_per_device", 32), experts_per_token=args.experts_per_token,
                  hidden=hidden, micro_batches=given.get("micro_batches", 2), context=given.get("context", 4096),
                  mtp_acceptance=args.mtp_acceptance)
    title = "EP decoding speed limit"
    if args.sweep is not None:  # an empty --sweep is an error (_floats), not the default table
        bandwidths = _floats(args.sweep, "--sweep")
        results = ep_limit.tpot_sweep(bandwidths, hardware=args.hardware or "h800", **common)
        cases = [(f"{r.bandwidth_gbps:g} GB/s", r) for r in results]
    elif args.hardware is None and args.bandwidth is None and args.model == "deepseek-v3" and not given \
            and args.hidden is None and args.experts_per_token is None and not args.paper_rounding \
            and not args.mtp_acceptance:
        cases = ep_limit.paper_cases(args.model)
        title += " (the paper's cases: 32 tokens per device, 2 micro-batches)"
    else:
        r = ep_limit.inference_limit(hardware=args.hardware or "h800", bandwidth_gbps=args.bandwidth, **common)
        cases = [(f"{r.hardware}, {r.bandwidth_gbps:g} GB/s, {r.tokens_per_device} tokens", r)]
    tables = [ep_limit.inference_limit_table(cases, title)]
    if args.plot:
        from coscale.analysis.plots import tpot_chart

        path = tpot_chart(args.plot, _floats(args.sweep, "--sweep") if args.sweep is not None else None,
                          hardware=args.hardware or "h800", **common)
        tables[0].notes.append(f"plot written to {path}")
    return _print(tables, args)


def _network(args) -> int:
    prices = network.CostModel().with_overrides(_costs(args.cost)) if args.cost else None
    tables = [network.network_table(args.radix, prices, args.planes)]
    if args.target is not None:
        tables.append(network.target_table(args.target, args.radix, prices, args.planes))
    return _print(tables, args)


def _report(args) -> int:
    from coscale.analysis.report import write_report

    path = write_report(args.output, args.model, args.hardware, html=args.html, charts=not args.no_charts)
    print(f"report written to {path}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one number")
    return values


def _costs(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ConfigError(f"--cost takes KEY=USD, got {item!r}"
                              + (" (no key before '=')" if sep else ""))
    return out

