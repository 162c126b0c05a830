"""``coscale analyze serve | search | training-time | validate``: predicted throughput and time.

Thin: parse, call ``serving`` / ``search`` / ``training_time`` / ``validation``, print tables whose notes
list every assumption and the achieved rates used (with ``--hardware``: a preset, or a file written by
``coscale calibrate``).
"""

from __future__ import annotations

import math

from coscale.analysis import search, serving, training_time, validation
from coscale.analysis.memory import ParallelLayout
from coscale.analysis.models import as_view
from coscale.analysis.table import Table, render
from coscale.errors import ConfigError
from coscale.hardware import hardware_names, load_hardware

PROFILE = "DeepSeek's published profile"


def register(sub, add) -> None:
    p = add(sub, "serve", "prefill and decode throughput per GPU under expert parallelism", _serve)
    p.add_argument("--phase", choices=("both", "decode", "prefill"), default="both")
    p.add_argument("--deepseek-profile", action="store_true",
                   help="DeepSeek's published inference profile (H800; decode EP128, 128 requests, 4K context, "
                        "one MTP draft; prefill EP32, 16K tokens, 4K prompts) and its figures beside ours")
    _layout_args(p)
    p.add_argument("--batch", type=int, help="decode: requests per attention group (per GPU at tp 1; default 128)")
    p.add_argument("--context", type=int, help="decode: cached tokens per request (default 4096)")
    p.add_argument("--tokens", type=int, help="prefill: prompt tokens per attention group (default 16384)")
    p.add_argument("--prompt-len", type=int, help="prefill: tokens per prompt (default 4096)")
    p.add_argument("--mtp-drafts", type=int, help="decode: MTP draft tokens verified per step (default 0)")
    p.add_argument("--mtp-acceptance", type=float, help="decode: probability a draft is accepted (default 0)")
    p.add_argument("--kernels-per-step", type=int,
                   help="decode: the serving stack's kernels per step, from a profile of it; those beyond the "
                        "modelled ops cost small_kernel_us each (default: only the modelled ops)")
    _dtype_args(p)
    p.add_argument("--breakdown", action="store_true", help="also print the time of every kernel per step")

    p = add(sub, "search", "largest decode batch under memory and a TPOT target; best EP/TP layout for N GPUs",
            _search)
    p.add_argument("--gpus", type=int, help="rank every EP/TP layout of this many GPUs (else: --ep/--tp only)")
    _layout_args(p)
    p.add_argument("--tpot-ms", type=float, help="TPOT target in ms (default: none, memory only)")
    p.add_argument("--context", type=int, default=4096, help="cached tokens per request (default 4096)")
    p.add_argument("--mtp-drafts", type=int, default=0, help="MTP draft tokens per step (default 0)")
    p.add_argument("--mtp-acceptance", type=float, help="draft acceptance 0-1, with --mtp-drafts (default 0)")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="fraction of HBM kept for activations, buffers and fragmentation (default 0.1)")

    p = add(sub, "training-time", "training step time, GPU-hours and cost for a parallel layout", _training)
    p.add_argument("--deepseek-v3", action="store_true",
                   help="DeepSeek-V3's pre-training layout (2,048 H800, PP16 DualPipe, EP64) beside the report's "
                        "180K GPU-hours per trillion tokens")
    for name in ("dp", "tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, help=f"{name.upper()} size (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096)")
    p.add_argument("--global-batch", type=int,
                   help="sequences per optimizer step (default dp x micro-batch, times 2 x pp with pipeline stages)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    p.add_argument("--schedule", choices=training_time.SCHEDULES, help="pipeline schedule (default dualpipe)")
    p.add_argument("--recompute", choices=training_time.RECOMPUTE, help="recomputation (default deepseek)")
    p.add_argument("--precision", choices=("fp8", "bf16"), help="GEMM precision (default fp8)")
    p.add_argument("--eager", action="store_true", help="ops launched one by one from Python (no CUDA graphs)")
    p.add_argument("--no-grad-clip", action="store_true",
                   help="leave out gradient-norm clipping (by default the step clips, as the V3 report and coscale "
                        "train do)")
    p.add_argument("--expert-imbalance", type=float, default=0.0, metavar="MAXVIO",
                   help="the busiest expert-parallel rank's routed rows over the mean, minus 1 (MaxVio over EP "
                        "ranks; 'coscale train' reports it over experts); its expert kernels and the all-to-all "
                        "take that much longer (default 0: balanced)")
    p.add_argument("--train-tokens", type=float, default=1e12, help="tokens to train on (default 1e12)")
    p.add_argument("--price", type=float, default=training_time.PRICE_PER_GPU_HOUR,
                   help="US$ per GPU-hour (default 2, the DeepSeek-V3 report's H800 price)")

    p = add(sub, "validate", "predictions beside coscale's own measurements (training and decode steps)",
            _validate, model=False)
    p.add_argument("--measurements", help="JSON file {\"measurements\": [...]} (see docs/analysis.md)")
    p.add_argument("--from-run", action="append", default=[], metavar="RUN_DIR",
                   help="a 'coscale train' run directory to add as a measurement (repeatable)")
    p.add_argument("--hardware", help="hardware for --from-run records: a preset "
                   f"({', '.join(hardware_names())}) or a file from 'coscale calibrate' (default h200)")
    p.add_argument("--update-doc", metavar="MARKDOWN",
                   help="write the table between the validation markers of this page (docs/analysis.md)")


def _layout_args(p) -> None:
    p.add_argument("--ep", type=int, help="GPUs sharing the routed experts (default 8)")
    p.add_argument("--tp", type=int, help="attention tensor parallelism (default 1)")
    p.add_argument("--redundant-experts", type=int, help="extra expert replicas (default 0); any --ep then works")
    p.add_argument("--micro-batches", type=int, help="overlapped micro-batches (default 2; 1: no overlap)")


def _dtype_args(p) -> None:
    for name, default in (("weights", "fp8"), ("kv", "bf16"), ("dispatch", "fp8"), ("combine", "bf16")):
        p.add_argument(f"--{name}", choices=serving.DTYPES, default=default, help=f"default {default}")


def _layout(args, ep_default: int) -> serving.ServingLayout:
    def pick(name, default):
        value = getattr(args, name)
        return default if value is None else value

    return serving.ServingLayout(ep=pick("ep", ep_default), tp=pick("tp", 1),
                                 redundant_experts=pick("redundant_experts", 0), micro_batches=pick("micro_batches", 2))


_PHASE_OPTIONS = {"decode": ("batch", "context", "mtp_drafts", "mtp_acceptance", "kernels_per_step"),
                  "prefill": ("tokens", "prompt_len")}


def _serve(args) -> int:
    phases = ("decode", "prefill") if args.phase == "both" else (args.phase,)
    for phase, names in _PHASE_OPTIONS.items():
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
        if given and phase not in phases:
            raise ConfigError(f"{', '.join(given)} describe(s) the {phase} phase: add --phase {phase} or both")
    results, published = [], {}
    for phase in phases:
        profile = serving.DEEPSEEK_PROFILE[phase] if args.deepseek_profile else {}
        model = args.model if not profile or args.model != "deepseek-v3" else profile["model"]
        hardware = args.hardware or profile.get("hardware", "h800")
        layout = _layout(args, profile.get("ep", 8))
        dtypes = dict(weight_dtype=args.weights, kv_dtype=args.kv, dispatch_dtype=args.dispatch,
                      combine_dtype=args.combine)
        if phase == "decode":
            given = dict(batch=args.batch, context=args.context, mtp_drafts=args.mtp_drafts,
                         mtp_acceptance=args.mtp_acceptance)
            defaults = dict(batch=128, context=4096, mtp_drafts=0, mtp_acceptance=0.0)
            kw = {k: given[k] if given[k] is not None else profile.get(k, defaults[k]) for k in given}
            _check_acceptance(kw["mtp_drafts"], args.mtp_acceptance)
            _check_profile_layout(args, phase, model, hardware, layout)
            r = serving.decode(model, hardware, layout, **kw, **dtypes, kernels_per_step=args.kernels_per_step)
        else:
            given = dict(tokens=args.tokens, prompt_len=args.prompt_len)
            defaults = dict(tokens=16384, prompt_len=4096)
            kw = {k: given[k] if given[k] is not None else profile.get(k, defaults[k]) for k in given}
            _check_profile_layout(args, phase, model, hardware, layout)
            r = serving.prefill(model, hardware, layout, **kw, **dtypes)
        results.append(r)
        same = profile and all(v is None for v in given.values()) and args.hardware is None and \
            layout == serving.ServingLayout(ep=profile["ep"]) and model == profile["model"]
        if same:
            published[phase] = profile["published_tokens_per_s"]
    tables = [_serve_table(results, published)]
    if args.breakdown:
        tables += [_breakdown_table(r) for r in results]
    return _print(tables, args)


def _check_acceptance(drafts: int, acceptance: float | None) -> None:
    """An acceptance rate means nothing without drafts to accept: refuse it rather than ignore it."""
    if acceptance is not None and not drafts:
        raise ConfigError("--mtp-acceptance is the acceptance of MTP drafts: give --mtp-drafts N (N >= 1) too")


def _check_profile_layout(args, phase: str, model, hardware, layout: serving.ServingLayout) -> None:
    """With --deepseek-profile and no --ep, the profile's EP size is used: name it when it does not fit."""
    if not args.deepseek_profile or args.ep is not None:
        return
    try:
        layout.check(as_view(model), load_hardware(hardware))
    except ConfigError as e:
        raise ConfigError(f"--deepseek-profile runs {phase} at EP{layout.ep}, which {model} cannot use ({e}): "
                          "give --ep") from None


def _serve_table(results: list, published: dict[str, float]) -> Table:
    rows = []
    for r in results:
        ref = published.get(r.phase)
        rows.append([r.phase, r.model, r.hardware, f"ep {r.layout.ep} tp {r.layout.tp} mb {r.layout.micro_batches}",
                     r.step_s * 1e3, r.latency_s * 1e3, r.tokens_per_s_per_gpu, r.tokens_per_s_per_node, r.binding,
                     r.schedule.compute_busy_s * 1e3, r.schedule.network_busy_s * 1e3,
                     sum(r.memory.values()) / 1e9, "yes" if r.fits else "NO", ref,
                     (r.tokens_per_s_per_gpu / ref - 1) * 100 if ref else None])
    notes = [f"{r.phase}: {note}" for r in results for note in r.assumptions]
    notes.append("latency: TPOT for decode (step / tokens a request emits per step), TTFT for prefill (the step); "
                 "tokens/s: output tokens (decode) or prompt tokens (prefill) per GPU; busy: time the compute "
                 "stream / the network is busy in one step; binding: the resource busy longest.")
    if published:
        notes.append(f"{PROFILE}: github.com/deepseek-ai/profile-data, per GPU as the SGLang team read it "
                     "(lmsys.org/blog/2025-05-05-large-scale-ep: 18,598 output / 62,713 input tokens/s per node); "
                     "its decode runs one MTP draft per request, counted at the 60% acceptance that comparison uses.")
    return Table(title="Serving throughput per GPU (predicted)",
                 columns=["phase", "model", "hardware", "layout", "step [ms]", "TTFT/TPOT [ms]", "tokens/s per GPU",
                          "tokens/s per node", "binding", "compute busy [ms]", "network busy [ms]",
                          "memory [GB]", "fits", "published tokens/s", "vs published [%]"],
                 rows=rows, formats=["", "", "", "", ".2f", ".2f", ",.0f", ",.0f", "", ".2f", ".2f", ".1f", "",
                                     ",.0f", "+.1f"], notes=notes)


def _breakdown_table(r) -> Table:
    busy = r.schedule.busy_by_op
    total = r.schedule.compute_busy_s
    rows = [[name, seconds * 1e3, seconds / total * 100 if name not in ("dispatch", "combine") else None]
            for name, seconds in sorted(busy.items(), key=lambda kv: -kv[1])]
    return Table(title=f"Kernel time per {r.phase} step, all layers and micro-batches ({r.model}, {r.hardware})",
                 columns=["kernel", "ms per step", "% of compute"], rows=rows, formats=["", ".3f", ".1f"],
                 notes=["dispatch / combine run on the network beside the compute stream (not in its %)."])


def _search(args) -> int:
    if args.tpot_ms is not None and not 0 < args.tpot_ms < math.inf:
        raise ConfigError(f"--tpot-ms must be a positive finite number, got {args.tpot_ms:g}")
    _check_acceptance(args.mtp_drafts, args.mtp_acceptance)
    acceptance = args.mtp_acceptance or 0.0
    tpot = args.tpot_ms / 1e3 if args.tpot_ms is not None else None
    hardware = args.hardware or "h800"
    if args.gpus is not None:
        if any(getattr(args, k) is not None for k in ("ep", "tp")):
            raise ConfigError("--gpus searches every EP/TP layout: leave out --ep and --tp")
        found = search.best_layouts(args.model, hardware, args.gpus, args.context, tpot, args.mtp_drafts,
                                    acceptance, args.redundant_experts or 0, args.micro_batches or 2,
                                    args.reserve)
    else:
        found = [search.max_decode_batch(args.model, hardware, _layout(args, 8), args.context, tpot,
                                         args.mtp_drafts, acceptance, args.reserve)]
    rows = []
    for f in found:
        r = f.result
        rows.append([f"ep {f.layout.ep} tp {f.layout.tp}", f.batch, f.limited_by,
                     r.latency_s * 1e3 if r else None, r.tokens_per_s_per_gpu if r else None,
                     r.tokens_per_s_per_node if r else None, sum(r.memory.values()) / 1e9 if r else None,
                     r.binding if r else None])
    target = f"TPOT <= {args.tpot_ms:g} ms" if tpot else "no TPOT target"
    table = Table(title=f"Decode deployments of {args.model} on {hardware} ({target}, context {args.context})",
                  columns=["layout", "max batch", "limited by", "TPOT [ms]", "tokens/s per GPU", "tokens/s per node",
                           "memory [GB]", "binding"], rows=rows,
                  formats=["", "", "", ".2f", ",.0f", ",.0f", ".1f", ""],
                  notes=[f"batch: requests per attention group; memory within {1 - args.reserve:.0%} of HBM; "
                         "best tokens/s per GPU first. Assumptions: 'coscale analyze serve' notes."])
    return _print([table], args)


def _given(value, default):
    return default if value is None else value


def _training(args) -> int:
    base = dict(training_time.DEEPSEEK_V3_TRAINING) if args.deepseek_v3 else {}
    if args.deepseek_v3 and args.model != "deepseek-v3":
        raise ConfigError("--deepseek-v3 is DeepSeek-V3's own layout: leave out --model")
    layout = base.pop("layout", ParallelLayout())
    layout = ParallelLayout(**{k: _given(getattr(args, k), getattr(layout, k)) for k in ("dp", "tp", "pp", "ep")})
    micro = _given(args.micro_batch, base.get("micro_batch", 1))
    # by default each pipeline runs the fewest micro-batches a pipeline schedule needs: 1 without one, 2 x pp
    # with one (DualPipe's least; 1F1B's bubble would be most of a step with fewer)
    per_pipeline = 2 * layout.pp if layout.pp > 1 else 1
    kw = dict(seq_len=_given(args.seq_len, base.get("seq_len", 4096)), micro_batch=micro,
              global_batch=_given(args.global_batch, base.get("global_batch", layout.dp * micro * per_pipeline)),
              schedule=_given(args.schedule, "dualpipe"), recompute=_given(args.recompute, "deepseek"),
              precision=_given(args.precision, "fp8"), eager=args.eager, grad_clip=not args.no_grad_clip,
              expert_imbalance=args.expert_imbalance)
    if not 0 < args.train_tokens < math.inf or not 0 <= args.price < math.inf:
        raise ConfigError(f"--train-tokens must be a positive finite number and --price a finite number >= 0, "
                          f"got {args.train_tokens:g} and {args.price:g}")
    r = training_time.training_time(args.model, _given(args.hardware, base.get("hardware", "h800")), layout, **kw)
    hours = r.gpu_hours(args.train_tokens)
    rows = [[name, seconds, seconds / r.step_s * 100] for name, seconds in r.parts_s.items()]
    rows.append(["step", r.step_s, 100.0])
    summary = [["tokens per step", r.tokens_per_step], ["tokens/s per GPU", r.tokens_per_s_per_gpu],
               ["model TFLOP/s per GPU (Table 2 convention)", r.model_tflops_per_gpu],
               ["MFU (BF16 peak) [%]", r.mfu * 100], [f"GPU-hours for {args.train_tokens:.3g} tokens", hours],
               [f"cost at ${args.price:g}/GPU-hour [US$]", hours * args.price]]
    notes = list(r.assumptions)
    changed = [k for k in ("dp", "tp", "pp", "ep", "seq_len", "global_batch", "micro_batch", "schedule", "recompute",
                           "precision", "hardware") if getattr(args, k) is not None] + (["eager"] if args.eager else [])
    if args.deepseek_v3 and not changed:
        published = training_time.PUBLISHED_GPU_HOURS_PER_TRILLION
        summary += [["published GPU-hours per 1e12 tokens (the report)", published],
                    ["predicted vs published [%]", (r.gpu_hours(1e12) / published - 1) * 100]]
        notes.append("the report: 180K H800 GPU-hours per trillion tokens (2.664M for 14.8T of pre-training); "
                     "Table 4: 19.926 s per step, 385 TFLOP/s "
                     "causal per GPU. Not modelled: contention between DualPipe's overlapped chunks, kernels slower "
                     "inside the full step than in their own benchmarks"
                     + (", expert-load imbalance (--expert-imbalance)." if not args.expert_imbalance else "."))
    return _print([Table(title=f"Training step of {r.model} on {r.world} x {r.hardware}",
                         columns=["part", "seconds", "% of step"], rows=rows, formats=["", ".4g", ".1f"], notes=notes),
                   Table(title="Training throughput and cost (predicted)", columns=["quantity", "value"], rows=summary,
                         formats=["", ",.4g"])], args)


def _validate(args) -> int:
    if args.hardware is not None and not args.from_run:
        raise ConfigError("--hardware applies to --from-run records only (a measurements file names its own)")
    records = validation.load_measurements(args.measurements) if args.measurements else []
    records += [validation.record_from_run(d, args.hardware or "h200") for d in args.from_run]
    if not records:
        raise ConfigError("give --measurements FILE and/or --from-run RUN_DIR")
    table = validation.validation_table(records)
    if args.update_doc:
        table.notes.append(f"written to {validation.update_doc(args.update_doc, table)}")
    return _print([table], args)


def _print(tables: list[Table], args) -> int:
    print(render(tables, args.format))
    return 0
