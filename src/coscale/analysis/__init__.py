"""Co-design analysis: the paper's tables for any model and any GPU, in pure Python (no torch).

Table of contents:
- ``models``           DenseModelSpec (Llama / Qwen), HF config.json reader, ModelView
- ``kv_cache``         KV-cache bytes per token (Table 1), tokens that fit beside the weights
- ``flops``            training FLOPs per token (Table 2), total / activated parameters
- ``memory``           per-GPU training memory under a parallel layout; inference weights + KV cache
- ``ep_limit``         EP decoding speed limit (section 4.4.2) with compute and HBM bounds
- ``network``          FT2 / MPFT / FT3 / MRFT / Slim Fly / Dragonfly size and cost (Table 3)
- ``costs``            one kernel's time from FLOPs, bytes and a GPU's achieved rates; routing statistics
- ``layers``           the kernels of one decoder layer (MLA prefill / absorbed decode, MoE, all-to-all)
- ``overlap``          two-micro-batch overlap of computation and communication, as a schedule
- ``serving``          prefill and decode throughput per GPU under expert parallelism
- ``search``           largest batch under memory and a TPOT target; best EP/TP layout for N GPUs
- ``training_time``    training step time, GPU-hours and cost for a parallel layout
- ``validation``       predictions beside coscale's own measurements
- ``report``           all of it in one Markdown / HTML file with PNG charts (``plots``); ``output``
- ``commands``         ``coscale analyze ...`` and ``coscale report`` (``throughput_commands``)

Hardware presets and achieved rates live in :mod:`coscale.hardware`; ``coscale.calibrate`` measures them.
"""

from coscale.analysis.ep_limit import InferenceLimit, ep_comm_time, inference_limit, tpot_sweep
from coscale.analysis.flops import attention_flops_per_token, training_flops_breakdown, training_flops_per_token
from coscale.analysis.kv_cache import kv_cache_bytes_per_token, tokens_that_fit
from coscale.analysis.memory import ParallelLayout, inference_memory_per_gpu, memory_per_gpu
from coscale.analysis.models import DenseModelSpec, ModelView, as_view, load_model
from coscale.analysis.network import CostModel, Network, network_cost, networks_for
from coscale.analysis.report import report_tables, write_report
from coscale.analysis.search import best_layouts, max_decode_batch
from coscale.analysis.serving import PhaseResult, ServingLayout, decode, prefill
from coscale.analysis.training_time import TrainingTime  # the function keeps its module's name: use the module

__all__ = [
    "CostModel", "DenseModelSpec", "InferenceLimit", "ModelView", "Network", "ParallelLayout", "PhaseResult",
    "ServingLayout", "TrainingTime", "as_view", "attention_flops_per_token", "best_layouts", "decode",
    "ep_comm_time", "inference_limit", "inference_memory_per_gpu", "kv_cache_bytes_per_token", "load_model",
    "max_decode_batch", "memory_per_gpu", "network_cost", "networks_for", "prefill", "report_tables",
    "tokens_that_fit", "tpot_sweep", "training_flops_breakdown", "training_flops_per_token", "write_report",
]
