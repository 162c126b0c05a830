"""The serving engine: continuous batching over the paged latent cache (docs/serving.md, "Engine").

One `step()`: the scheduler picks decodes and prefill chunks under the token budget (scheduler.py),
their tokens go through the model as one flat batch (batch.py; decode tokens on the absorbed MLA path
over the paged cache, prefill chunks on the naive path), the rows that end a prompt or decode sample
their next token (sampling.py), or, with MTP speculation, verify the drafts and draft again
(speculative.py). Decode-only steps replay CUDA graphs captured per batch size (graphs.py).

The interface (EngineConfig, SamplingParams, RequestOutput, EngineStats, Engine) is the contract shared
with the HTTP server (coscale.serve). The Engine is not thread-safe: one thread calls its methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from coscale.errors import ConfigError
from coscale.infer import speculative
from coscale.infer.batch import Batch, build_batch
from coscale.infer.cache import KV_CACHE_DTYPES, BlockAllocator, PagedLatentCache, blocks_for, bytes_per_token
from coscale.infer.layers import DECODE_KERNELS, use_decode_kernels
from coscale.infer.sampling import SamplingParams, logprobs_on_device, sample, sampling_probs, token_logprobs
from coscale.infer.scheduler import PLACEHOLDER, Request, ScheduledRequest, Scheduler, SchedulerConfig, Status
from coscale.infer.transfer import HostCopy, StepTimer, to_device

logger = logging.getLogger("coscale.infer")

CPU_CACHE_BYTES = 1 << 30  # the default cache on CPU: 1 GiB worth of tokens ...
CPU_CACHE_MAX_TOKENS = 65536  # ... at most this many


@dataclass
class EngineConfig:
    max_model_len: int | None = None  # None: from the model config (max_position_embeddings)
    block_size: int = 64  # tokens per KV-cache block
    kv_cache_dtype: str = "bf16"  # "bf16" | "fp8" (1x128-tile e4m3 latent + fp32 scales, RoPE part bf16)
    num_blocks: int | None = None  # None: sized from free memory (CUDA) or a small default (CPU)
    gpu_memory_fraction: float = 0.9
    max_num_seqs: int = 128  # running requests at most
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    speculative: bool = False  # MTP drafts (depth from the checkpoint); exact for greedy
    cuda_graphs: bool = True  # decode steps captured per batch size (CUDA only)
    # torch.compile of the graphed decode forward (CUDA graphs only): Inductor fuses the thousands of
    # small kernels between the GEMMs (norms, RoPE, router, casts). None: on where graphs are, unless
    # the model has FP8 inference layers (graph breaks: coscale.infer.graphs).
    compile: bool | None = None
    # Overlapped schedule: launch step N + 1 before reading step N's tokens back (docs/serving.md).
    # None: on for CUDA without speculation (drafts make the next step's shape depend on the last).
    overlap: bool | None = None
    # "auto": the linear layers and routers take coscale's decode kernels where they measured faster (a
    # Triton GEMM that streams the largest weights at a few rows, the fused router for routers up to
    # V2-Lite's size: coscale.infer.layers.use_decode_kernels); "torch": PyTorch's (cuBLAS, the reference
    # router), for comparison.
    decode_kernels: str = "auto"

    def validate(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ConfigError(f"num_blocks must be a positive integer or None, got {self.num_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap must be True, False or None (automatic), got {self.overlap!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True, False or None (automatic), got {self.compile!r}")
        if self.overlap and self.speculative:
            raise ConfigError("the overlapped schedule does not combine with speculative decoding (how many drafts "
                              "a step accepts decides the next step's positions); set overlap=False or None")
        if self.decode_kernels not in DECODE_KERNELS:
            raise ConfigError(f"decode_kernels must be one of {DECODE_KERNELS}, got {self.decode_kernels!r}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first, len = SamplingParams.logprobs


@dataclass
class RequestOutput:  # what one step produced for one request
    request_id: str
    new_token_ids: list[int]  # 0, 1 or (speculative) several tokens
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    prompt_tokens: int
    completion_tokens: int  # so far
    draft_tokens: int = 0  # MTP drafts proposed for this request so far
    accepted_tokens: int = 0  # of which accepted


@dataclass
class EngineStats:
    waiting: int
    running: int
    num_blocks: int
    used_blocks: int
    cache_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions_total: int
    draft_tokens_total: int
    accepted_tokens_total: int


def model_dtype(model) -> torch.dtype:
    """The compute dtype: the embedding's (FP8 checkpoints keep their linear weights in float8)."""
    return model.model.embed_tokens.weight.dtype


class Engine:
    """Continuous batching over a DeepseekForCausalLM (module docstring, docs/serving.md). The model is
    moved to `device` and put in eval mode."""

    def __init__(self, model, config: EngineConfig | None = None, *, device=None) -> None:
        config = config or EngineConfig()
        config.validate()
        cfg = model.config
        self.device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
        self.model = model.to(self.device).eval()
        use_decode_kernels(self.model, config.decode_kernels)
        self.config = config
        self.depth = cfg.num_nextn_predict_layers if config.speculative else 0
        if config.speculative and not len(model.mtp):
            raise ConfigError("speculative decoding drafts with the checkpoint's MTP modules and this model has "
                              "none (num_nextn_predict_layers = 0); set speculative=False")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(f"max_model_len ({self.max_model_len}) exceeds the model's context length "
                              f"({cfg.max_position_embeddings} positions)")
        if config.max_num_batched_tokens < 1 + self.depth:
            raise ConfigError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must fit one decode "
                              f"of {1 + self.depth} tokens")
        self.dtype = model_dtype(model)
        num_blocks = config.num_blocks or self._default_num_blocks()
        self.cache = PagedLatentCache(cfg.num_hidden_layers + self.depth, num_blocks, config.block_size,
                                      cfg.kv_lora_rank, cfg.qk_rope_head_dim, config.kv_cache_dtype, self.dtype,
                                      self.device)
        if self.cache.num_tokens - self.depth < 2:
            raise ConfigError(f"a KV cache of {self.cache.num_tokens} tokens cannot hold a request; raise num_blocks")
        if self.cache.num_tokens - self.depth < self.max_model_len:
            logger.warning("the KV cache holds %d tokens: max_model_len lowered from %d", self.cache.num_tokens,
                           self.max_model_len)
            self.max_model_len = self.cache.num_tokens - self.depth
        self.table_width = blocks_for(self.max_model_len + self.depth, config.block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.block_size, self.depth), self.allocator)
        self.requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.kernel_backend = "auto"
        self._counters = dict(prompt=0, generation=0, drafts=0, accepted=0)
        self.overlap = config.overlap if config.overlap is not None else (
            self.device.type == "cuda" and not self.depth)
        self._in_flight: _Launched | None = None
        self.step_timer = StepTimer()  # host seconds per phase, GPU time per step (benchmarks enable it)
        self.graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            from coscale.infer.graphs import DecodeGraphs
            from coscale.infer.layers import FP8InferenceExperts, FP8InferenceLinear

            fp8 = any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in self.model.modules())
            self.graphs = DecodeGraphs(self, compile=not fp8 if config.compile is None else config.compile)
        elif config.compile:
            logger.warning("compile=True applies to CUDA-graphed decode steps only (%s); decode runs eagerly",
                           "cuda_graphs is off" if self.device.type == "cuda" else f"device {self.device}")
        logger.info("%s", self.describe())

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, config: EngineConfig | None = None, *, device=None, dtype=None) -> Engine:
        """Load an HF-format checkpoint directory (FP8 checkpoints keep their FP8 weights: infer/loading.py)
        or a `coscale train` run directory, and start an engine on it."""
        from coscale.infer.loading import load_for_inference

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return cls(load_for_inference(str(path), dtype, device), config, device=device)

    def _default_num_blocks(self) -> int:
        cfg, bs = self.model.config, self.config.block_size
        per_token = bytes_per_token(cfg.num_hidden_layers + self.depth, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                    self.config.kv_cache_dtype, self.dtype.itemsize)
        if self.device.type == "cuda":
            from coscale.infer.graphs import free_cache_bytes

            budget = free_cache_bytes(self)
            blocks = int(budget // (per_token * bs))
            if blocks < blocks_for(self.max_model_len + self.depth, bs):
                raise ConfigError(
                    f"the GPU has room for {blocks * bs} cache tokens, fewer than one sequence of max_model_len "
                    f"{self.max_model_len}: lower max_model_len or max_num_batched_tokens, or raise "
                    "gpu_memory_fraction")
            return blocks
        tokens = max(self.max_model_len + self.depth, min(CPU_CACHE_MAX_TOKENS, CPU_CACHE_BYTES // per_token))
        return blocks_for(tokens, bs)

    def describe(self) -> str:
        c = self.cache
        return (f"KV cache: {c.num_blocks} blocks x {c.block_size} tokens = {c.num_tokens} tokens "
                f"({c.nbytes() / 2**30:.2f} GiB, {c.kv_cache_dtype}, {c.bytes_per_token()} bytes/token); "
                f"max_model_len {self.max_model_len}; speculative depth {self.depth}; decode steps: "
                f"{self.decode_mode()}")

    def decode_mode(self) -> str:
        """How decode-only steps run: eager, or replayed from CUDA graphs of the compiled or eager forward
        (the compiled one until compiling fails: coscale.infer.graphs)."""
        if self.graphs is None:
            return "eager"
        return "compiled, CUDA graphs" if self.graphs.compiled else "CUDA graphs"

    # ---- the contract ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token ids must be integers in [0, {vocab}); got {bad[0]!r}")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ConfigError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"limit of {self.max_model_len} tokens")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(request_id, list(prompt_token_ids), params, generator)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        _drop_placeholders(request)  # a token in flight is dropped when it lands
        self.scheduler.finish(request, "abort")
        self._aborted.append(self._output(request, [], None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
            num_blocks=self.allocator.num_blocks, used_blocks=self.allocator.num_used,
            cache_tokens=self.cache.num_tokens, prompt_tokens_total=c["prompt"],
            generation_tokens_total=c["generation"],
            preemptions_total=self.scheduler.preemptions_total, draft_tokens_total=c["drafts"],
            accepted_tokens_total=c["accepted"],
        )

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one step. With the overlapped schedule it launches the next step and then returns what
        the step before it produced (so outputs come one call later; has_unfinished() stays true until
        the last step in flight has landed)."""
        outputs, self._aborted = self._aborted, []
        timer = self.step_timer
        with timer.phase("schedule"):
            scheduled = self.scheduler.schedule()
        if self.depth:
            if scheduled:
                outputs += self._run_speculative(scheduled)
            return outputs
        launched = self._launch(scheduled) if scheduled else None
        if not self.overlap:
            return outputs + (self._land(launched) if launched else [])
        landing, self._in_flight = self._in_flight, launched
        return outputs + (self._land(landing) if landing else [])

    # ---- one step ------------------------------------------------------------------------------
    def _forward(self, batch: Batch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model.hidden_states_paged(batch.input_ids, batch.positions, batch.meta)

    def _launch(self, scheduled: list[ScheduledRequest]) -> _Launched:
        """Queue a step on the device (batch, forward, sampling, the copy of its tokens to the host)
        without waiting for it, and advance the requests' host state with a placeholder per token."""
        timer, prev = self.step_timer, self._in_flight
        with timer.phase("build"):
            pad_to = self.graphs.pad_size(scheduled) if self.graphs is not None else None
            batch = build_batch(scheduled, self.cache, self.device, self.table_width, self.kernel_backend,
                                pad_to=pad_to, pending=prev.row_of if prev else None,
                                pending_tokens=prev.tokens if prev else None)
        start = timer.event(self.device)
        with timer.phase("forward"):
            h = self._forward(batch)
        after_forward = timer.event(self.device)
        with timer.phase("sample"):
            samplers = [s for s in batch.scheduled if s.samples]
            reqs = [s.request for s in samplers]
            params = [r.params for r in reqs]
            h = h[: len(samplers)] if batch.sample_rows is None else h.index_select(0, batch.sample_rows)
            logits = self.model.logits(h)  # (R, V) float32
            tokens = sample(logits, params, [r.generator for r in reqs], self.generator) if reqs else None
            copies = [tokens] if reqs else []
            wants = [j for j, p in enumerate(params) if p.logprobs is not None]
            k = max((params[j].logprobs for j in wants), default=0)
            if wants:
                lp_rows = to_device(wants, torch.long, self.device)
                copies += logprobs_on_device(logits.index_select(0, lp_rows), tokens.index_select(0, lp_rows), k)
            landed = HostCopy(copies)
        end = timer.event(self.device)
        if start is not None:
            timer.gpu.append((start, after_forward, end))
        with timer.phase("advance"):
            row_of, slots = {}, []
            for s in batch.scheduled:
                r = s.request
                if s.start == 0 and not r.preemptions:
                    self._counters["prompt"] += len(r.prompt_ids)
                r.num_computed += s.num_tokens
                if s.samples:
                    row_of[r] = len(slots)
                    r.output_ids.append(PLACEHOLDER)
                    slots.append((r, len(r.output_ids) - 1))
                    done = len(r.output_ids)
                    r.last_in_flight = done >= r.params.max_tokens or len(r.prompt_ids) + done >= self.max_model_len
        return _Launched(slots, row_of, tokens, landed, wants, k)

    def _land(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens and turn them into outputs: stop tokens and length limits
        finish requests here (a request that stopped may have a step in flight after this one; that
        step's token for it is dropped when it lands)."""
        timer = self.step_timer
        with timer.phase("wait"):
            host = launched.copy.wait()
        with timer.phase("land"):
            if not launched.slots:
                return []
            tokens = host[0].tolist()
            logprobs = {}
            if launched.wants:
                chosen = host[1].tolist()
                ids, values = (host[2].tolist(), host[3].tolist()) if launched.k else (None, None)
                for n, j in enumerate(launched.wants):
                    k = launched.slots[j][0].params.logprobs
                    top = list(zip(ids[n][:k], values[n][:k])) if k else []
                    logprobs[j] = [TokenLogprob(tokens[j], chosen[n], top)]
            outputs = []
            for j, (r, at) in enumerate(launched.slots):
                if r.status is Status.FINISHED:  # aborted, or stopped by a token of an earlier step
                    continue
                t = tokens[j]
                r.output_ids[at] = t
                self._counters["generation"] += 1
                done = at + 1
                reason = None
                if t in r.params.stop_token_ids:
                    reason = "stop"
                elif done >= r.params.max_tokens or len(r.prompt_ids) + done >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    del r.output_ids[done:]  # placeholders of a step launched after this one
                    self.requests.pop(r.request_id, None)
                    self.scheduler.finish(r, reason)
                outputs.append(self._output(r, [t], logprobs.get(j), completion_tokens=done))
        return outputs

    def _run_speculative(self, scheduled: list[ScheduledRequest]) -> list[RequestOutput]:
        """A step with MTP drafts: verify, commit, draft again (synchronous: the accepted count decides
        the next step's positions)."""
        batch = build_batch(scheduled, self.cache, self.device, self.table_width, self.kernel_backend)
        h = self._forward(batch)
        for s in batch.scheduled:
            if s.start == 0 and not s.request.preemptions:
                self._counters["prompt"] += len(s.request.prompt_ids)
        sampling = [i for i, s in enumerate(batch.scheduled) if s.samples]
        emitted = self._sample(batch, h, sampling)
        outputs, draft_rows = [], [None] * len(batch.scheduled)
        for i, s in enumerate(batch.scheduled):
            r = s.request
            if i not in emitted:  # a prefill chunk that does not end its prompt
                r.num_computed += s.num_tokens
                continue
            tokens, logprobs, accepted = emitted[i]
            r.num_computed += s.num_tokens if not s.is_decode else 1 + accepted
            tokens, logprobs, reason = self._truncate(r, tokens, logprobs)
            r.output_ids += tokens
            self._counters["generation"] += len(tokens)
            if reason is None:
                draft_rows[i] = batch.rows[i].start + (r.num_computed - 1 - s.start)
            else:
                self.requests.pop(r.request_id, None)
                self.scheduler.finish(r, reason)
            outputs.append(self._output(r, tokens, logprobs))
        self._draft(batch, h, draft_rows)
        return outputs

    def _sample(self, batch: Batch, h: torch.Tensor, sampling: list[int]) -> dict:
        """Per sampling request index: (tokens, logprobs or None, accepted drafts)."""
        if not sampling:
            return {}
        rows = [r for i in sampling for r in self._logit_rows(batch, i)]
        # index tensors through pinned memory (transfer.py): a Python-list index would wait for the forward
        logits = self.model.logits(h.index_select(0, to_device(rows, torch.long, h.device)))  # (R, V) float32
        spans, at = {}, 0
        for i in sampling:
            n = len(self._logit_rows(batch, i))
            spans[i] = range(at, at + n)
            at += n
        spec = [i for i in sampling if batch.scheduled[i].is_decode and self.depth]
        plain = [i for i in sampling if i not in spec]
        chosen: dict[int, tuple[list[int], int]] = {}
        if plain:
            reqs = [batch.scheduled[i].request for i in plain]
            starts = to_device([spans[i].start for i in plain], torch.long, logits.device)
            tokens = sample(logits.index_select(0, starts), [r.params for r in reqs],
                            [r.generator for r in reqs], self.generator).tolist()
            chosen.update({i: ([t], 0) for i, t in zip(plain, tokens)})
        if spec:
            chosen.update(self._verify(batch, logits, spans, spec))
        out = {}
        for i, (tokens, accepted) in chosen.items():
            r = batch.scheduled[i].request
            logprobs = None
            if r.params.logprobs is not None:
                rows_i = logits[spans[i].start: spans[i].start + len(tokens)]
                chosen_lp, top = token_logprobs(rows_i, to_device(tokens, torch.long, logits.device), r.params.logprobs)
                logprobs = [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen_lp, top)]
            out[i] = (tokens, logprobs, accepted)
        return out

    def _logit_rows(self, batch: Batch, i: int) -> range:
        s, rows = batch.scheduled[i], batch.rows[i]
        return rows if s.is_decode and self.depth else range(rows.stop - 1, rows.stop)

    def _verify(self, batch: Batch, logits: torch.Tensor, spans: dict, spec: list[int]) -> dict:
        k, V = self.depth, logits.shape[-1]
        reqs = [batch.scheduled[i].request for i in spec]
        params = [r.params for r in reqs]
        row_idx = to_device([list(spans[i]) for i in spec], torch.long, logits.device)  # [B, k + 1]
        drafts = to_device([r.drafts for r in reqs], torch.long, logits.device)
        if all(p.greedy for p in params):
            best = logits[row_idx].argmax(dim=-1)  # [B, k + 1]
            accepted = (best[:, :k] == drafts).long().cumprod(dim=1).sum(dim=1)
            nxt = best.gather(1, accepted[:, None])[:, 0]
        else:
            target = sampling_probs(logits[row_idx.flatten()], [p for p in params for _ in range(k + 1)])
            q = torch.stack([r.draft_probs if r.draft_probs is not None
                             else speculative.one_hot_drafts(drafts[j: j + 1], V)[0]
                             for j, r in enumerate(reqs)])
            accepted, nxt = speculative.verify(target.view(len(spec), k + 1, V), drafts, q,
                                               [r.generator for r in reqs], self.generator)
        out = {}
        accepted, nxt = torch.stack([accepted, nxt]).tolist()  # one wait for the device, not two
        for i, r, a, t in zip(spec, reqs, accepted, nxt):
            r.draft_tokens += k
            r.accepted_tokens += a
            self._counters["drafts"] += k
            self._counters["accepted"] += a
            out[i] = (r.drafts[:a] + [t], a)
        return out

    def _truncate(self, r: Request, tokens: list[int], logprobs):
        """Cut the new tokens at a stop token or the length limits; returns (tokens, logprobs, reason)."""
        reason = None
        keep = len(tokens)
        for j, t in enumerate(tokens):
            done = len(r.output_ids) + j + 1
            if t in r.params.stop_token_ids:
                reason, keep = "stop", j + 1
                break
            if done >= r.params.max_tokens or len(r.prompt_ids) + done >= self.max_model_len:
                reason, keep = "length", j + 1
                break
        return tokens[:keep], (logprobs[:keep] if logprobs is not None else None), reason

    def _draft(self, batch: Batch, h: torch.Tensor, draft_rows: list[int | None]) -> None:
        # What the MTP rows read: positions start + 1 .. start + rows + depth - 1 (up to the last token)
        extended = [s.request.tokens(s.start + 1, min(s.request.num_tokens, s.start + len(rows) + self.depth))
                    for s, rows in zip(batch.scheduled, batch.rows)]
        reqs = [s.request for s in batch.scheduled]
        graphed = self.graphs is not None and self.graphs.can_run(batch)  # then the main forward was graphed
        mtp_forward = partial(self.graphs.run_mtp, batch) if graphed else None
        results = speculative.draft(self.model, batch, h, extended, draft_rows, [r.params for r in reqs],
                                    [r.generator for r in reqs], self.generator, mtp_forward)
        for r, res in zip(reqs, results):
            if res is not None and r.status is Status.RUNNING:
                r.drafts, r.draft_probs = res

    def _output(self, r: Request, tokens: list[int], logprobs, completion_tokens: int | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=r.request_id, new_token_ids=tokens, new_logprobs=logprobs,
            finished=r.status is Status.FINISHED, finish_reason=r.finish_reason, prompt_tokens=len(r.prompt_ids),
            completion_tokens=len(r.output_ids) if completion_tokens is None else completion_tokens,
            draft_tokens=r.draft_tokens, accepted_tokens=r.accepted_tokens,
        )


@dataclass
class _Launched:
    """A step queued on the device whose tokens the host has not read yet."""

    slots: list[tuple[Request, int]]  # per sampled token: its request and index in output_ids
    row_of: dict  # request -> its row in `tokens` (where the next step's batch takes the token from)
    tokens: torch.Tensor | None  # [R] int64 on the device
    copy: HostCopy  # tokens (then logprob tensors) on their way to the host
    wants: list[int]  # rows with logprobs
    k: int  # top logprobs computed for them (the most any of them asked for)


def _drop_placeholders(r: Request) -> None:
    while r.output_ids and r.output_ids[-1] == PLACEHOLDER:
        r.output_ids.pop()
