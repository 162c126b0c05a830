"""A MoE layer's shared experts on a second CUDA stream, beside its router and routed experts, at decode.

Shape legend: T tokens (a decode batch), H hidden, I the shared experts' intermediate width (n_shared x the
expert's).

At a decode batch's few tokens no kernel of a MoE layer fills the GPU: the routed experts stream 6 of 64
experts' weights at about 60% of copy bandwidth on V2-Lite at batch 1, and the shared experts' three kernels
(cuBLAS's gate/up GEMM, SwiGLU, the down GEMM: about 15 us a layer, BENCHMARKS.md run 29) wait their turn
behind them though neither reads the other's output. Here they run on a side stream from the moment the
layer's input exists, so the two weight streams share the memory system instead of taking turns; SGLang and
vLLM do the same for DeepSeek's shared experts at small batches.

Two operators, so that torch.compile keeps the decode step one graph and a CUDA graph captures both branches:

- ``side_stream_swiglu(x, w_gate_up, w_down)``: the side stream waits for everything queued so far on the
  current stream (so x is ready), then runs down(silu(gate) * up) with gate and up as one stacked GEMM
  (coscale.model.fused_weights), the shared experts' own arithmetic at inference; returns at once.
- ``join_side_stream_add(y, y_side, x_side)``: the current stream waits for the side stream, then y + y_side.
  It takes the side branch's input x_side only to keep it alive until the side stream is done with it: a
  tensor freed earlier could be handed to the current stream's next allocation while the side stream still
  reads it. The side branch's own tensors are allocated on the side stream, and the side stream waits on the
  current one at every fork, so their memory is reused only behind the join that last read it.

Inductor must not move the fork after the work it is meant to run beside, and two of its passes do: the locality
pass moves a producer next to its only consumer (the join; torch 2.13 spares operators tagged as drawing random
numbers, torch 2.11 does not), and the peak-memory reordering put the router's GEMM ahead of the fork in the
compiled MoE layer. So a compiled step that takes the side stream turns both off (``compile_options``): they order
kernels for locality and memory, which a decode step's few tokens hardly need.

A CUDA graph captures the fork and join as parallel branches (the side stream joins the capture at the fork
and leaves it at the join). Off CUDA both run in order on the one stream: same arithmetic, no streams.
``SHARED_STREAM_MAX_TOKENS`` is the largest decode batch that takes the side stream (0: never). It pays only where
the routed experts leave the memory system idle, at small batches: V2-Lite's batch-1 decode step went from 3.453 to
3.305 ms (1.045x; the kernels of the two streams overlap: 3.83 ms of kernel time in a 3.27 ms step) on an H100
(BENCHMARKS.md run 48; no H200 was lent). Measured at batch 1 only, so on up to 4 tokens (MTP's drafts of one
sequence) and off beyond until measured there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coscale.kernels.library import operator

__all__ = ["SHARED_STREAM_MAX_TOKENS", "compile_options", "join_side_stream_add", "side_stream",
           "side_stream_swiglu", "stacked_swiglu_hidden", "swiglu_stacked", "takes_side_stream"]

SHARED_STREAM_MAX_TOKENS = 4

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of a CUDA device (one a device, made on first use)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def takes_side_stream(tokens: int) -> bool:
    """Whether a decode batch of ``tokens`` runs its MoE layers' shared experts on the side stream (CUDA, BF16 shared
    experts: coscale.model.moe.MoE checks the rest)."""
    return 0 < tokens <= SHARED_STREAM_MAX_TOKENS


def compile_options() -> dict:
    """Inductor options for a compiled decode step: with the side stream on, neither the locality nor the
    peak-memory reordering (module docstring); else none."""
    if SHARED_STREAM_MAX_TOKENS > 0:
        return {"reorder_for_locality": False, "reorder_for_peak_memory": False}
    return {}


def stacked_swiglu_hidden(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [.., H] with w_gate_up [2I, H] = [W_gate; W_up]: one GEMM for both (a SwiGLU MLP's
    hidden at inference, coscale.model.moe.MLP)."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_stacked(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up) of x [T, H] with w_gate_up [2I, H] and w_down [H, I] (the reference, and what either
    stream runs)."""
    return F.linear(stacked_swiglu_hidden(x, w_gate_up), w_down)


def _fake_swiglu(x, w_gate_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[0])


@operator("side_stream_swiglu", opaque=True, fake=_fake_swiglu)
def side_stream_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """swiglu_stacked(x, w_gate_up, w_down), queued on the side stream behind the current stream's work (CUDA);
    its result may be read only after ``join_side_stream_add``."""
    if not x.is_cuda:
        return swiglu_stacked(x, w_gate_up, w_down)
    side = side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        return swiglu_stacked(x, w_gate_up, w_down)


def _fake_join(y, y_side, x_side):
    return torch.empty_like(y)


@operator("join_side_stream_add", opaque=True, fake=_fake_join)
def join_side_stream_add(y: torch.Tensor, y_side: torch.Tensor, x_side: torch.Tensor) -> torch.Tensor:
    """y + y_side once the side stream's work is done (CUDA: the current stream waits for it); x_side, the side
    branch's input, is held until then (module docstring)."""
    if y.is_cuda:
        torch.cuda.current_stream(y.device).wait_stream(side_stream(y.device))
    return y + y_side
