"""The scheduler: picks, each step, which requests compute how many tokens, by token counters alone."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, get_args

from kiln.errors import PromptTooLong, RequestError
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime import structured_output
from kiln.runtime.request import Request, RequestStatus

Policy = Literal["max_utilization", "guaranteed_no_evict"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one step and of the running batch.

    ``max_utilization`` admits whatever fits now and preempts (recomputes) the newest requests when the
    pool runs out; ``guaranteed_no_evict`` admits a request only if every running request can still
    reach its ``max_total_tokens``, so it never preempts.
    """

    max_num_tokens: int
    max_batch_size: int
    max_seq_len: int
    policy: Policy = "max_utilization"
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_tokens", "max_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.policy not in get_args(Policy):
            raise ValueError(f"policy must be one of {', '.join(get_args(Policy))}, got {self.policy!r}")


@dataclass(slots=True)
class SchedulerOutput:
    """One step: ``requests[i]`` computes ``num_new_tokens[i]`` tokens from its ``num_computed_tokens``.

    ``will_sample[i]`` is true when that reaches the request's last known token, so its logits are sampled.
    """

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    will_sample: list[bool] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def requests_to_sample(self) -> list[Request]:
        return [r for r, s in zip(self.requests, self.will_sample) if s]

    def __len__(self) -> int:
        return len(self.requests)


def context_length_error(num_prompt_tokens: int, max_tokens: int, max_seq_len: int) -> PromptTooLong | None:
    """The context-length rule, the one every protocol applies: the prompt and the tokens to generate fit in
    ``max_seq_len``. The error (APIs report it as ``context_length_exceeded``), or None."""
    total = num_prompt_tokens + max_tokens
    if total <= max_seq_len:
        return None
    return PromptTooLong(f"This model's maximum context length is {max_seq_len} tokens, but the prompt "
                         f"({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {total} tokens; shorten "
                         "the prompt or lower max_tokens")


def admission_error(cfg: SchedulerConfig, num_blocks: int, block_size: int, num_prompt_tokens: int,
                    max_tokens: int) -> RequestError | None:
    """Why a request of this size could never be served under these limits and a pool of ``num_blocks``
    blocks (the error to raise), or None. Fixed facts only, so a front end may ask from another thread or
    process."""
    too_long = context_length_error(num_prompt_tokens, max_tokens, cfg.max_seq_len)
    if too_long is not None:
        return too_long
    total = num_prompt_tokens + max_tokens
    need = -(-total // block_size)
    if need > num_blocks:
        return RequestError(f"{total} tokens need {need} KV blocks of {block_size} tokens, but the whole KV cache "
                            f"has {num_blocks} blocks ({num_blocks * block_size} tokens); shorten the request or "
                            "give the KV cache more memory")
    if not cfg.enable_chunked_prefill and num_prompt_tokens > cfg.max_num_tokens:
        return RequestError(f"the prompt has {num_prompt_tokens} tokens but a step computes at most "
                            f"max_num_tokens={cfg.max_num_tokens} and chunked prefill is off")
    return None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        # Admission order: index 0 is the oldest, the last is the first to be preempted.
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ----- requests -----
    def add_request(self, req: Request) -> None:
        """Queue a request, or raise RequestError if it could never be served under this configuration."""
        rid = req.request_id
        if rid in self._requests:
            raise RequestError(f"request id {rid!r} is already in use")
        if req.status != RequestStatus.WAITING or req.block_ids or req.num_computed_tokens:
            raise ValueError(f"request {rid!r} is not a fresh waiting request (status {req.status.value})")
        problem = self.admission_error(req.num_prompt_tokens, req.sampling_params.max_tokens)
        if problem:
            raise type(problem)(f"request {rid!r}: {problem}")
        self._requests[rid] = req
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        """Behind every waiting request of its priority or a lower value (``SamplingParams.priority``)."""
        priority = req.sampling_params.priority
        i = len(self.waiting)
        while i and self.waiting[i - 1].sampling_params.priority > priority:
            i -= 1
        self.waiting.insert(i, req)

    def admission_error(self, num_prompt_tokens: int, max_tokens: int) -> RequestError | None:
        """Why a request of this size could never be served here, or None (``admission_error``)."""
        bm = self.block_manager
        return admission_error(self.config, bm.num_blocks, bm.block_size, num_prompt_tokens, max_tokens)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Finish a request for a reason decided outside (a stop string, an abort); unknown ids are ignored."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        req = self._requests.get(request_id)
        if req is None:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, status)

    def abort(self, request_id: str) -> None:
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----- the step -----
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        bm = self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_tokens

        # Running requests first, oldest first: each gets what it still lacks, up to the budget.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._ends_when_known(req):
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate_slots(req, n):
                if cfg.policy == "guaranteed_no_evict":
                    raise RuntimeError(f"guaranteed_no_evict: no KV blocks for running request {req.request_id!r}; "
                                       "the admission reserve is broken")
                # The newest loses its blocks and recomputes later; the oldest always progresses.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._schedule(out, req, n)
                budget -= n
                i += 1

        # Then waiting requests in order (priority, then arrival); none after a preemption, since the pool is short.
        if out.preempted:
            return out
        reserved = 0
        if cfg.policy == "guaranteed_no_evict":
            reserved = sum(bm.blocks_for_tokens(r.max_total_tokens) for r in self.running)
        while self.waiting and budget > 0 and len(self.running) < cfg.max_batch_size:
            req = self.waiting[0]
            if req.num_placeholders:
                break  # preempted while its last token was on its way: its values are needed to recompute
            own = bm.blocks_for_tokens(req.max_total_tokens)
            # Reserve every running request's whole future, so the running loop can never run short.
            if cfg.policy == "guaranteed_no_evict" and reserved + own > bm.num_blocks:
                break
            # NOTE: a request that still needs prompt logprobs takes no prefix hit: it needs the logits
            # of every prompt position, and cached blocks hold keys and values, not logits.
            computed_blocks, num_hit = ([], 0) if req.lacks_prompt_logprobs else bm.get_computed_blocks(req)
            remaining = req.num_tokens - num_hit
            # Without chunked prefill a request is split only if it could never fit a step whole (the
            # recompute of a preempted request, which has grown past its prompt).
            if not cfg.enable_chunked_prefill and budget < remaining <= cfg.max_num_tokens:
                break
            n = min(remaining, budget)
            req.num_computed_tokens = num_hit
            if not bm.allocate_slots(req, n, computed_blocks):
                req.num_computed_tokens = 0
                break
            req.num_cached_tokens = min(num_hit, req.num_prompt_tokens)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            reserved += own
            self._schedule(out, req, n)
            budget -= n
        return out

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Account for a finished step whose sampled tokens are on the host (``advance``, then
        ``resolve``); return the requests that finished."""
        waiting_for = self.advance(output)
        missing = [r.request_id for r in waiting_for if r.request_id not in sampled]
        if missing:
            raise ValueError(f"requests {missing[:5]} reached their last token but no sampled token came back")
        return self.resolve([(r, sampled[r.request_id]) for r in waiting_for])[1]

    def advance(self, output: SchedulerOutput) -> list[Request]:
        """Account for a launched step: its tokens are computed, and each request that reached its last
        token holds a placeholder for the token being sampled. Returns those requests, in batch order."""
        bm = self.block_manager
        sampling: list[Request] = []
        for req, n in zip(output.requests, output.num_new_tokens):
            # Finished or aborted since it was scheduled: its blocks are gone, nothing to record.
            if req.status != RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += n
            bm.cache_blocks(req, min(req.num_computed_tokens, req.num_known_tokens))
            if req.num_computed_tokens == req.num_tokens:
                req.append_placeholder()
                sampling.append(req)
        return sampling

    def resolve(self, tokens: list[tuple[Request, int]]) -> tuple[list[Request], list[Request]]:
        """Sampled values are on the host: fill the placeholders and stop the requests they end.
        Returns (the requests that took their token, those of them that finished)."""
        bm = self.block_manager
        took: list[Request] = []
        finished: list[Request] = []
        for req, token in tokens:
            if req.is_finished or not req.num_placeholders:
                continue  # aborted or finished since the step was launched
            req.resolve_placeholder(token)
            if req.grammar is not None:
                structured_output.accept(req.grammar, token)
            took.append(req)
            status = self._stop_status(req, token)
            if status is None:
                bm.cache_blocks(req, min(req.num_computed_tokens, req.num_known_tokens))
                continue
            req.drop_placeholders()  # a token sampled after the end is never used
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:  # preempted while its token was on its way
                self.waiting.remove(req)
            self._finish(req, status)
            finished.append(req)
        return took, finished

    # ----- internals -----
    def _schedule(self, out: SchedulerOutput, req: Request, n: int) -> None:
        if req.scheduled_time is None:
            req.scheduled_time = time.monotonic()
        out.requests.append(req)
        out.num_new_tokens.append(n)
        out.will_sample.append(req.num_computed_tokens + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        # At the front, so it resumes before anything newer; its outputs stay and are recomputed.
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.block_manager.free(req)
        req.status = status
        if req.finished_time is None:
            req.finished_time = time.monotonic()
        del self._requests[req.request_id]

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        """Whether ``token``, the request's latest known token, ends it."""
        params = req.sampling_params
        known_outputs = req.num_known_tokens - req.num_prompt_tokens
        if req.grammar is not None and structured_output.is_done(req.grammar):
            return RequestStatus.FINISHED_STOPPED  # its constraint is complete: nothing more may follow
        if known_outputs >= params.min_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in req.eos_token_ids):
                return RequestStatus.FINISHED_STOPPED
        if known_outputs >= params.max_tokens or req.num_known_tokens >= self.config.max_seq_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _ends_when_known(self, req: Request) -> bool:
        """A request whose placeholders reach its length limit: nothing more to compute for it."""
        return req.num_placeholders > 0 and (req.num_output_tokens >= req.sampling_params.max_tokens
                                             or req.num_tokens >= self.config.max_seq_len)

    # ----- checks -----
    def check_integrity(self) -> None:
        """The block manager's checks plus the scheduler's; raise RuntimeError naming what is broken."""
        bm = self.block_manager
        problems: list[str] = []
        try:
            bm.check_integrity()
        except RuntimeError as e:
            problems.append(str(e))
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        if len(running_ids) != len(self.running) or len(waiting_ids) != len(self.waiting):
            problems.append("a request is queued twice")
        if running_ids & waiting_ids:
            problems.append(f"requests both running and waiting: {sorted(running_ids & waiting_ids)}")
        if running_ids | waiting_ids != set(self._requests):
            problems.append("the request table disagrees with the running and waiting queues")
        if len(self.running) > self.config.max_batch_size:
            problems.append(f"{len(self.running)} running requests exceed max_batch_size={self.config.max_batch_size}")
        for req in self.running:
            if req.status != RequestStatus.RUNNING:
                problems.append(f"running request {req.request_id!r} has status {req.status.value}")
            if len(req.block_ids) * bm.block_size < req.num_computed_tokens:
                problems.append(f"running request {req.request_id!r} has {req.num_computed_tokens} computed tokens "
                                f"but {len(req.block_ids)} blocks")
            if not 0 <= req.num_computed_tokens <= req.num_tokens:
                problems.append(f"running request {req.request_id!r} has {req.num_computed_tokens} computed of "
                                f"{req.num_tokens} tokens")
        for req in self.waiting:
            if req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                problems.append(f"waiting request {req.request_id!r} has status {req.status.value}")
            if req.block_ids or req.num_computed_tokens or bm.holds(req.request_id):
                problems.append(f"waiting request {req.request_id!r} holds blocks or computed tokens")
        stray = bm.held_request_ids - running_ids
        if stray:
            problems.append(f"the block manager holds blocks for requests not running: {sorted(stray)[:8]}")
        if self.config.policy == "guaranteed_no_evict":
            reserved = sum(bm.blocks_for_tokens(r.max_total_tokens) for r in self.running)
            if reserved > bm.num_blocks:
                problems.append(f"running requests reserve {reserved} blocks of {bm.num_blocks}")
        if problems:
            raise RuntimeError("scheduler integrity check failed:\n  " + "\n  ".join(problems))
