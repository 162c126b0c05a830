"""CUDA graphs of the decode step, one per padded batch size, and the GPU memory budget of the cache.

A decode step of a small model is a few hundred kernel launches of a few microseconds each, so the
host, not the GPU, sets the pace at small batches. Capturing the model's forward over a decode batch in
a CUDA graph replays all of them in one launch (vLLM and SGLang do the same). A graph fixes its shapes
and addresses, so:
- graphs are captured for batch sizes 1, 2, 4, 8 and then every 8 up to max_num_seqs (vLLM's rule), and a
  batch of n decodes runs the graph of the next size up, the extra rows padded: token 0 at positions
  0 .. S-1 of the padding block (block 0, never handed out), seq_len S, so they write and read only
  that block;
- the inputs (token ids, positions, cache slots, block tables, lengths) live in static buffers that
  each step copies into; the MLA decode kernel's context split is fixed from max_model_len, and each
  sequence divides its own blocks among the splits, so the lengths may change between replays;
- each graph is captured the first time its size is needed, after one eager run at that size (Triton
  autotuning and cuBLAS set-up must not happen inside a capture). All graphs share one memory pool.
The captured forward is compiled by torch.compile (``EngineConfig.compile``, on by default): without it
a decode step of a V2-Lite-shaped model is about 3,100 kernels, most of them a few microseconds of
elementwise work between the GEMMs, which cost more than the weights' reads at every batch size (H200,
BENCHMARKS.md). The buffers' batch dimension is marked dynamic before the first capture, so the first
graph is traced with symbolic sizes (torch.compile still specializes a batch of 1, and the host-side
token count in the attention metadata, so the second size compiles once more, with that count symbolic
too; the decode kernels' size rules add a graph per range of sizes). Traced with the sizes as constants
instead, the graph for 128 tokens fused the KV-cache write into a kernel of 40 us a layer, where the
symbolic-size graphs' write takes 2 us (H200, BENCHMARKS.md run 29). The MLA decode launcher is an opaque operator
(``coscale::mla_decode``), so the step stays one graph: a graph break inside a layer would make
torch.compile recompile the rest of the layer once per layer (its index is a static attribute) and,
past its recompile limit of 8, run the remaining layers eagerly, as the first GPU run of this did
(BENCHMARKS.md). FP8 inference layers are graph breaks (so a model with them is not compiled unless
asked: the engine's default). Should compiling fail (a torch whose Inductor cannot trace some part),
the engine logs why and captures the eager forward instead.
Only decode-only steps replay graphs; steps with prefill chunks run eagerly. With MTP speculation
the verify step (1 + D tokens a sequence) has graphs of its own, and so does each MTP module's forward
over that batch (``run_mtp``: it reads the main graph's buffers, so drafting is graphed too). Nothing in the decode
forward reads a value back to the host (the MoE permutation sizes its buffer statically:
coscale.kernels.permute), which is what makes it capturable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from coscale.infer.batch import Batch
from coscale.kernels import side_stream
from coscale.model.mla import PagedAttentionMetadata

logger = logging.getLogger(__name__)


def compiler_errors() -> tuple[type[BaseException], ...]:
    """The exceptions torch.compile raises when it cannot compile (Dynamo's, Inductor's), as opposed to
    errors of the computation itself (out of memory, a bad input), which must not be retried eagerly."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # older torch: Inductor's failures reach here as Dynamo's BackendCompilerFailed
        pass
    return tuple(errors)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(s, max_num_seqs) for s in sizes})


@dataclass
class _Draft:
    """MTP module `depth`'s forward over the batch of a _Graph: hidden states and next tokens in, out."""

    graph: torch.cuda.CUDAGraph
    h_prev: torch.Tensor
    next_ids: torch.Tensor
    hidden: torch.Tensor


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: PagedAttentionMetadata
    hidden: torch.Tensor
    drafts: dict[int, _Draft] = field(default_factory=dict)


class DecodeGraphs:
    def __init__(self, engine, compile: bool = True):
        self.engine = engine
        self.sizes = capture_sizes(engine.config.max_num_seqs)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.compiled = compile
        self.mtp_graphs = True  # False once capturing an MTP module's forward has failed: eager drafting
        # Two compilations of the forward: the batches that run the shared experts on a side stream need two of
        # Inductor's reordering passes off (side_stream.compile_options), the others keep them
        self._compiled = {side: torch.compile(engine.model.hidden_states_paged,
                                              options=side_stream.compile_options() if side else None)
                          for side in (False, True)} if compile else {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata) -> torch.Tensor:
        """The captured forward: compiled for this batch's side-stream choice, or eager."""
        if not self.compiled:
            return self.engine.model.hidden_states_paged(input_ids, positions, meta)
        return self._compiled[side_stream.takes_side_stream(input_ids.shape[0])](input_ids, positions, meta)

    def _warm_up(self, g: _Graph) -> None:
        """One run outside the capture (compilation, autotuning, workspaces); falls back to the eager
        forward, once, if compiling fails."""
        try:
            self.forward(g.input_ids, g.positions, g.meta)
        except compiler_errors() as e:  # serve uncompiled rather than not at all; other errors propagate
            if not self.compiled:
                raise
            logger.warning("compiling the decode step failed (%s: %s); capturing the eager forward instead",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compiled = False
            self.forward(g.input_ids, g.positions, g.meta)

    def can_run(self, batch: Batch) -> bool:
        return batch.num_decodes == len(batch.scheduled) and batch.num_decodes <= self.sizes[-1]

    def pad_size(self, scheduled) -> int | None:
        """The graph size a step of `scheduled` will replay (its batch is built padded to it), or None."""
        if len(scheduled) > self.sizes[-1] or not all(s.is_decode for s in scheduled):
            return None
        return self._padded(len(scheduled))

    def _padded(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _buffers(self, size: int, S: int) -> _Graph:
        e, dev = self.engine, self.engine.device
        n = size * S
        meta = PagedAttentionMetadata(
            cache=e.cache, slots=torch.arange(n, device=dev) % S, num_decode_tokens=n, decode_len=S,
            block_table=torch.zeros(size, e.table_width, dtype=torch.int32, device=dev),
            seq_lens=torch.full((size,), S, dtype=torch.int32, device=dev),
            max_seq_len=e.table_width * e.config.block_size, kernel_backend=e.kernel_backend,
        )
        positions = torch.arange(n, device=dev) % S
        return _Graph(None, torch.zeros(n, dtype=torch.long, device=dev), positions, meta, None)

    def _load(self, g: _Graph, batch: Batch) -> None:
        """Copy the batch into the static buffers; rows after it become padding (a batch built with
        pad_to arrives padded: whole-tensor copies). Block-table columns past the batch's width keep
        older entries, which no sequence reads (each reads only its own blocks, up to its length)."""
        n, S = batch.input_ids.shape[0], batch.meta.decode_len
        B, W = batch.meta.block_table.shape
        m = g.meta
        g.input_ids[:n].copy_(batch.input_ids)
        g.positions[:n].copy_(batch.positions)
        m.slots[:n].copy_(batch.meta.slots)
        m.block_table[:B, :W].copy_(batch.meta.block_table)
        m.seq_lens[:B].copy_(batch.meta.seq_lens)
        if n < g.input_ids.shape[0]:
            g.input_ids[n:].zero_()
            pad = torch.arange(m.slots.shape[0] - n, device=m.slots.device) % S
            g.positions[n:].copy_(pad)
            m.slots[n:].copy_(pad)
            m.block_table[B:].zero_()
            m.seq_lens[B:].fill_(S)

    def _graphed(self, warm_up, fn):
        """(graph, output) of fn() captured in a CUDA graph (in the shared pool), after warm_up() on a side
        stream: compilation, autotuning and workspaces must happen outside the capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out

    def _capture(self, batch: Batch) -> _Graph:
        size, S = self._padded(batch.num_decodes), batch.meta.decode_len
        g = self._buffers(size, S)
        if self.compiled:  # traced with symbolic sizes from the first capture on (module docstring)
            for t in (g.input_ids, g.positions, g.meta.slots, g.meta.block_table, g.meta.seq_lens):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        g.meta.block_table.zero_()
        self._load(g, batch)
        g.graph, g.hidden = self._graphed(lambda: self._warm_up(g),
                                          lambda: self.forward(g.input_ids, g.positions, g.meta))
        return g

    def run(self, batch: Batch) -> torch.Tensor:
        key = (self._padded(batch.num_decodes), batch.meta.decode_len)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(batch)
        self._load(g, batch)
        g.graph.replay()
        return g.hidden[: batch.num_tokens]

    def run_mtp(self, batch: Batch, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP module `depth` over `batch`, replayed from a graph of its own: the batch's main forward ran
        through ``run`` in this step, so that graph's buffers hold the batch (positions, slots, block
        tables, lengths; the module writes its own cache layer at the same slots). Eager, as the main
        forward without compile: one layer of a few hundred launches is host-bound like the rest. Should
        a capture fail, the engine logs why and drafts eagerly from then on."""
        g = self.graphs[(self._padded(batch.num_decodes), batch.meta.decode_len)]
        d = g.drafts.get(depth)
        if d is None and self.mtp_graphs:
            try:
                d = g.drafts[depth] = self._capture_mtp(g, depth, h_prev)
            except RuntimeError as e:  # serve with eager drafting rather than not at all
                logger.warning("capturing the MTP module's forward failed (%s: %s); drafting eagerly",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.mtp_graphs = False
        if d is None:
            return self.engine.model.mtp_hidden_states_paged(depth, h_prev, next_ids, batch.positions, batch.meta)
        n = h_prev.shape[0]
        d.h_prev[:n].copy_(h_prev)
        d.next_ids[:n].copy_(next_ids)
        d.next_ids[n:].zero_()  # padding rows: token 0 at the padding block, as in the main graph
        d.graph.replay()
        return d.hidden[:n]

    def _capture_mtp(self, g: _Graph, depth: int, h_prev: torch.Tensor) -> _Draft:
        d = _Draft(None, h_prev.new_zeros(g.input_ids.shape[0], h_prev.shape[1]), torch.zeros_like(g.input_ids), None)

        def forward():
            return self.engine.model.mtp_hidden_states_paged(depth, d.h_prev, d.next_ids, g.positions, g.meta)

        d.graph, d.hidden = self._graphed(forward, forward)
        return d


def free_cache_bytes(engine) -> int:
    """Bytes the KV cache may take on the engine's GPU: gpu_memory_fraction of the device, less what is
    in use (the weights, other processes), less the peak activations of the largest step (measured with
    a throw-away cache: a prefill chunk of the full token budget at the end of a max_model_len context,
    whose whole context prefill decompresses), less the logits and sampling buffers of a full batch."""
    from coscale.infer.batch import build_batch
    from coscale.infer.cache import BlockAllocator, PagedLatentCache, blocks_for
    from coscale.infer.sampling import SamplingParams
    from coscale.infer.scheduler import Request, ScheduledRequest

    dev, cfg, ec = engine.device, engine.model.config, engine.config
    tokens = min(ec.max_num_batched_tokens, engine.max_model_len)
    blocks = blocks_for(engine.max_model_len, ec.block_size)
    scratch = PagedLatentCache(cfg.num_hidden_layers + engine.depth, blocks, ec.block_size, cfg.kv_lora_rank,
                               cfg.qk_rope_head_dim, ec.kv_cache_dtype, engine.dtype, dev)
    request = Request("profile", [0] * engine.max_model_len, SamplingParams(1))
    request.blocks = BlockAllocator(blocks).allocate(blocks)
    request.num_computed = engine.max_model_len - tokens
    batch = build_batch([ScheduledRequest(request, tokens, False)], scratch, dev, blocks)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    with torch.no_grad():
        engine.model.hidden_states_paged(batch.input_ids, batch.positions, batch.meta)
    torch.cuda.synchronize(dev)
    activations = torch.cuda.max_memory_allocated(dev) - before
    del scratch, batch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    rows = ec.max_num_seqs * (1 + engine.depth)
    sampling = 6 * rows * cfg.vocab_size * 4  # logits, probabilities, sort buffers (float32)
    budget = free - (1 - ec.gpu_memory_fraction) * total - activations - sampling
    return max(0, int(budget))
