"""Expert parallelism on torch.distributed (torchrun, process groups, NCCL on GPUs, gloo on CPU).

Table of contents (docs/parallel.md has the design):

- groups.py          ``init_parallel`` -> ParallelContext (world / EP / DP groups, rank -> node map,
                     virtual nodes via gpus_per_node, timeouts), ``check_same_config``, CommunicationError
- codec.py           wire formats: ``fp32``, ``bf16``, ``fp8`` (e4m3 + 1x128 scales); the Codec protocol
- routes.py          route planning: ``Topology``, ``Route`` / ``Stage``, the flat and two-hop plans, ``Traffic``
- transfer.py        moving rows along a route: ``scatter`` / ``gather`` (autograd, start / wait halves)
- dispatch.py        ``dispatch`` / ``combine`` (a scatter of tokens, a gather of expert outputs), async halves
- node_limited.py    ``node_limited_topk`` (at most M nodes per token), analytic byte counts
- expert_parallel.py ``ExpertParallelExperts``, ``apply_expert_parallel``; checkpoints across EP sizes
- overlap.py         ``overlapped_experts_forward``: two micro-batches, communication behind compute
- training.py        ``setup_for_training``, ``sync_gradients``, ``shard_batch``, optimizer state across EP
                     sizes, ``all_reduce_router_loads`` for EP x DP training
- world.py           ``World``: ``SingleProcess`` or ``Distributed`` (EP x DP), the one object a training
                     loop asks about the processes it runs with
- launch.py          ``spawn``: N local processes with torchrun's environment (tests, one host)
"""

from coscale.parallel.codec import Codec, FP8Codec, RawCodec, get_codec
from coscale.parallel.dispatch import (
    DispatchMeta,
    combine,
    combine_start,
    combine_wait,
    dispatch,
    dispatch_plan,
    dispatch_start,
    dispatch_wait,
)
from coscale.parallel.expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    gathered_experts,
    local_expert_range,
    local_experts_forward,
    total_traffic,
)
from coscale.parallel.groups import (
    CommunicationError,
    ParallelContext,
    ParallelDims,
    check_same_config,
    config_fingerprint,
    init_parallel,
    init_process_group_from_env,
)
from coscale.parallel.node_limited import (
    analytic_inter_node_bytes,
    check_gate_is_node_limited,
    node_limited_topk,
    nodes_per_token,
)
from coscale.parallel.overlap import overlapped_experts_forward
from coscale.parallel.routes import Route, RoutePlan, Stage, Topology, Traffic, plan_flat, plan_routes, plan_two_hop
from coscale.parallel.training import (
    all_reduce_router_loads,
    broadcast_parameters,
    clip_grad_norm_,
    full_optimizer_state_dict,
    grad_norm,
    load_optimizer_state_dict,
    setup_for_training,
    shard_batch,
    sync_gradients,
)

__all__ = [
    "Codec", "FP8Codec", "RawCodec", "get_codec",
    "DispatchMeta", "Topology", "Traffic", "combine", "combine_start", "combine_wait", "dispatch",
    "dispatch_plan", "dispatch_start", "dispatch_wait",
    "ExpertParallelExperts", "apply_expert_parallel", "gathered_experts", "local_expert_range",
    "local_experts_forward", "total_traffic",
    "CommunicationError", "ParallelContext", "ParallelDims", "check_same_config", "config_fingerprint",
    "init_parallel", "init_process_group_from_env",
    "analytic_inter_node_bytes", "check_gate_is_node_limited", "node_limited_topk", "nodes_per_token",
    "overlapped_experts_forward",
    "Route", "RoutePlan", "Stage", "plan_flat", "plan_routes", "plan_two_hop",
    "all_reduce_router_loads", "broadcast_parameters", "clip_grad_norm_",
    "full_optimizer_state_dict", "grad_norm",
    "load_optimizer_state_dict", "setup_for_training", "shard_batch", "sync_gradients",
]
