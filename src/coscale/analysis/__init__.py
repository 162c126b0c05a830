"""Co-design analysis: the paper's tables for any model and any GPU, in pure Python (no torch).

Table of contents:
- ``models``           DenseModelSpec (Llama / Qwen), HF config.json reader, ModelView
- ``kv_cache``         KV-cache bytes per token (Table 1), tokens that fit beside the weights
- ``flops``            training FLOPs per token (Table 2), total / activated parameters
- ``memory``           per-GPU training memory under a parallel layout; inference weights + KV cache
- ``ep_limit``         EP decoding speed limit (section 4.4.2) with compute and HBM bounds
- ``network``          FT2 / MPFT / FT3 / MRFT / Slim Fly / Dragonfly size and cost (Table 3)
- ``report``           all of it in one Markdown / HTML file with PNG charts (``plots``)
- ``commands``         ``coscale analyze ...`` and ``coscale report``

Hardware presets live in :mod:`coscale.hardware`.
"""

from coscale.analysis.ep_limit import InferenceLimit, ep_comm_time, inference_limit, tpot_sweep
from coscale.analysis.flops import attention_flops_per_token, training_flops_breakdown, training_flops_per_token
from coscale.analysis.kv_cache import kv_cache_bytes_per_token, tokens_that_fit
from coscale.analysis.memory import ParallelLayout, inference_memory_per_gpu, memory_per_gpu
from coscale.analysis.models import DenseModelSpec, ModelView, as_view, load_model
from coscale.analysis.network import CostModel, Network, network_cost, networks_for
from coscale.analysis.report import report_tables, write_report

__all__ = [
    "CostModel", "DenseModelSpec", "InferenceLimit", "ModelView", "Network", "ParallelLayout",
    "as_view", "attention_flops_per_token", "ep_comm_time", "inference_limit", "inference_memory_per_gpu",
    "kv_cache_bytes_per_token", "load_model", "memory_per_gpu", "network_cost", "networks_for",
    "report_tables", "tokens_that_fit", "tpot_sweep", "training_flops_breakdown",
    "training_flops_per_token", "write_report",
]
