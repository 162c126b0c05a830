"""``coscale report``: every analysis table and three charts for one model and one GPU, in one file.

The defaults (DeepSeek-V3 on H800) reproduce the paper's analysis end to end: Table 1, Table 2, the EP
decoding limit for 400G InfiniBand and GB200 NVL72, training memory under DeepSeek-V3's layout and
Table 3.
"""

from __future__ import annotations

import os
from html import escape

from coscale.analysis import ep_limit, flops, kv_cache, memory, network
from coscale.analysis.models import Model, ModelView, as_view
from coscale.analysis.output import staged_directory
from coscale.analysis.table import Table
from coscale.hardware import HardwareSpec, load_hardware

# DeepSeek-V3's training layout (2,048 GPUs: 16-way PP, 64-way EP, ZeRO-1 DP) and a dense counterpart.
MOE_LAYOUT = memory.ParallelLayout(dp=128, tp=1, pp=16, ep=64, zero=1)
DENSE_LAYOUT = memory.ParallelLayout(dp=16, tp=8, pp=16, ep=1, zero=1)


def _with_reference(v: ModelView, reference: tuple[str, ...]) -> list[Model]:
    """``v`` first, then the paper's models of a table other than ``v`` itself."""
    return [v] + [m for m in reference if m != v.name]


def report_tables(model: Model = "deepseek-v3", hardware: str | HardwareSpec = "h800") -> list[Table]:
    """The report's tables, in order."""
    v = as_view(model)
    hw = load_hardware(hardware)
    tables = [kv_cache.kv_cache_table(_with_reference(v, kv_cache.TABLE1_MODELS), hardware=hw),
              flops.flops_table(_with_reference(v, flops.TABLE2_MODELS))]
    if v.is_moe:
        cases = [(f"{hw.name}, hidden {v.hidden_size}", ep_limit.inference_limit(v, hw))]
        if v.name == "deepseek-v3":
            cases = ep_limit.paper_cases(v) + cases
        tables.append(ep_limit.inference_limit_table(cases))
    layout = MOE_LAYOUT if v.is_moe and v.n_routed_experts % MOE_LAYOUT.ep == 0 else DENSE_LAYOUT
    if v.heads % layout.tp or layout.pp > v.layers:
        layout = memory.ParallelLayout(dp=layout.world, zero=3)
    tables.append(memory.memory_table(
        memory.memory_per_gpu(v, layout),
        f"Training memory per GPU ({v.name}, dp={layout.dp} tp={layout.tp} pp={layout.pp} "
        f"ep={layout.ep}, ZeRO-{layout.zero})",
        ["BF16 weights, FP32 master weights and gradients, BF16 AdamW moments; sequence 4096, micro-batch 1."],
    ))
    tables.append(network.network_table())
    tables.append(network.target_table(16384))
    return tables


def write_report(output_dir: str | os.PathLike = "coscale-report", model: Model = "deepseek-v3",
                 hardware: str | HardwareSpec = "h800", html: bool = False, charts: bool = True) -> str:
    """Write ``report.md`` (or ``report.html``) and the PNG charts into ``output_dir``; return its path.

    All files are written to a staging directory first: on any error nothing is left half-written."""
    v = as_view(model)
    hw = load_hardware(hardware)
    tables = report_tables(v, hw)
    if charts:
        from coscale.analysis import plots

        plots.require_matplotlib()
    name = "report.html" if html else "report.md"
    with staged_directory(output_dir) as stage:
        images: list[tuple[str, str]] = []
        if charts:
            images.append(("KV cache per token by model",
                           plots.kv_cache_chart(_with_reference(v, kv_cache.TABLE1_MODELS), stage("kv_cache.png"))))
            if v.is_moe:
                images.append(("TPOT against interconnect bandwidth",
                               plots.tpot_chart(stage("tpot_vs_bandwidth.png"), model=v, hardware=hw)))
            images.append(("Cost per endpoint against cluster size", plots.cost_chart(stage("network_cost.png"))))
        title = f"coscale co-design report: {v.name} on {hw.name}"
        if html:
            body = "\n".join(t.to_html() for t in tables) + "".join(
                f'<h3>{escape(c)}</h3>\n<img src="{escape(os.path.basename(p))}" alt="{escape(c)}">\n'
                for c, p in images)
            text = f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title></head>" \
                   f"<body>\n<h1>{escape(title)}</h1>\n{body}</body></html>\n"
        else:
            parts = [f"# {title}", ""] + [t.to_markdown() + "\n" for t in tables]
            parts += [f"### {c}\n\n![{c}]({os.path.basename(p)})\n" for c, p in images]
            text = "\n".join(parts)
        with open(stage(name), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(os.fspath(output_dir), name)
