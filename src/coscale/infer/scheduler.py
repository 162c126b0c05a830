"""Continuous batching: which requests run in the next step, how many tokens each, and their cache blocks.

A request's tokens are its prompt followed by what it has generated; `num_computed` of them have their
latent in the cache. Each step spends a token budget (max_num_batched_tokens) so that requests catch
up (vLLM v1's scheduler, in short):

1. Running requests first, oldest first. One whose tokens are all computed but the last sampled one
   decodes: that token (plus its MTP drafts when speculating). One still prefilling gets the next chunk
   of its prompt, as much as the budget allows. Blocks for the new positions are taken from the
   allocator; when none are left, the newest running request is preempted: its blocks are freed, it
   goes back to the front of the queue and will recompute its prompt and what it generated so far.
2. Then waiting requests, oldest first, while budget, blocks and max_num_seqs allow (none in a step
   that preempted).

Requests join (`add`) and leave (`finish`, on a stop, the length limit or abort) between steps.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from coscale.infer.cache import BlockAllocator, blocks_for
from coscale.infer.sampling import SamplingParams

# An output token that the GPU has sampled but the host has not seen yet (the engine's overlapped
# schedule): the next step's batch takes it from the device (batch.py).
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None  # seeded requests sample from their own
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latent is in the cache (positions 0 .. num_computed - 1)
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    drafts: list[int] = field(default_factory=list)  # MTP drafts for the positions after the last token
    draft_probs: torch.Tensor | None = None  # [k, V] the distributions the drafts were drawn from
    draft_tokens: int = 0
    accepted_tokens: int = 0
    preemptions: int = 0
    last_in_flight: bool = False  # its final token (the length limit) is in flight: schedule nothing more

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens start .. end - 1 of prompt + output (without joining the two lists)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p: end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def is_decoding(self) -> bool:
        """All tokens but the last sampled one are in the cache."""
        return self.num_computed > 0 and self.num_computed == self.num_tokens - 1


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens processed this step: positions start .. start + num_tokens - 1
    is_decode: bool  # decode step (the last token, plus drafts) rather than a prefill chunk
    start: int = -1  # the request's num_computed when scheduled
    samples: bool = False  # whether this step yields a new token (a decode, or a prompt's last chunk)

    def __post_init__(self):
        self.start = self.request.num_computed
        self.samples = self.start + self.num_tokens >= self.request.num_tokens


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_lookahead: int = 0  # MTP drafts verified with each decode


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions_total = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Stop a request (stop token, length, abort) and free its blocks at once."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        self.allocator.free(request.blocks)
        request.blocks = []
        request.status, request.finish_reason = Status.FINISHED, reason

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the blocks, forget the cached tokens and drafts, queue at the front."""
        self.running.remove(request)
        self.allocator.free(request.blocks)
        request.blocks, request.num_computed = [], 0
        request.drafts, request.draft_probs = [], None
        request.status = Status.WAITING
        request.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(request)

    def _decode_tokens(self, request: Request) -> int:
        return 1 + self.config.num_lookahead

    def _blocks_needed(self, request: Request, num_tokens: int) -> int:
        return blocks_for(request.num_computed + num_tokens, self.config.block_size) - len(request.blocks)

    def schedule(self) -> list[ScheduledRequest]:
        """The next step's work; decodes first, then prefill chunks (the order of the flat batch)."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.last_in_flight:
                i += 1
                continue
            # With speculation a decode carries its drafts; a prompt whose last token was left over by a
            # chunk has none yet and runs that token as a one-token prefill chunk (which drafts).
            decode = request.is_decoding and len(request.drafts) == self.config.num_lookahead
            n = self._decode_tokens(request) if decode else min(request.num_tokens - request.num_computed, budget)
            if n > budget:
                i += 1
                continue
            need = self._blocks_needed(request, n)
            while need > self.allocator.num_free and self.running[-1] is not request:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.allocator.num_free:  # nothing newer left to preempt: this one waits
                self._preempt(request)
                preempted = True
                break
            request.blocks += self.allocator.allocate(need)
            (decodes if decode else prefills).append(ScheduledRequest(request, n, decode))
            budget -= n
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed, budget)
            need = self._blocks_needed(request, n)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            request.blocks += self.allocator.allocate(need)
            prefills.append(ScheduledRequest(request, n, False))
            budget -= n
        return decodes + prefills
