"""The engine core: requests of token ids in, new token ids out, one step at a time.

It owns the scheduler, the KV block manager, the model runner and the sampler, and nothing of text:
detokenization, stop strings, n>1 merging and streaming are the output processor's, in the caller's
thread (vLLM v1's split). ``EngineCoreProcess`` runs it in a process of its own, ``EngineCoreThread`` in a
thread, ``InlineCore`` in the caller's thread.

A step schedules by token counters, runs the model once for the whole mixed batch and samples the
requests that reached their last known token; the same pass scores the prompt tokens of requests that
ask for prompt logprobs (``prompt_logprobs``). If the batch raises, each of its requests is run again
alone: the ones that still raise finish with ``finish_reason="error"`` and their message, their KV
blocks freed; the others continue as if nothing happened.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from kiln.engine import Engine, read_engine
from kiln.engine.format import TOKENIZER_FILE
from kiln.errors import RequestError
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.kv_pool import batch_the_pool_holds, num_kv_blocks
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.outputs import EngineStats, TokenLogprob
from kiln.runtime.prompt_logprobs import PendingPromptLogprobs, prompt_spans
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampler import PendingSample, Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, admission_error
from kiln.runtime.step_inputs import Batch, PrevTokens
from kiln.runtime.structured_output import Grammars
from kiln.runtime.to_device import moved_to

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreRequest:
    """One sequence to generate, as the front end hands it over (already validated)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float
    # Held back until the named request has computed its prompt, so that n>1 completions share the
    # prompt's KV blocks instead of computing it n times.
    after: str | None = None


@dataclass(slots=True)
class _Launched:
    """A step whose sampled tokens may still be on the device."""

    requests: list[Request]  # those that hold a placeholder for this step's token
    pending: PendingSample | None
    rows: dict[str, int]  # request id -> its row in the sampled tokens
    # When the step was run request by request (after an error), its tokens are already on the host.
    host_ids: torch.Tensor | None = None
    host_logprobs: list[TokenLogprob | None] | None = None
    # The prompt logprobs the step computed, for the requests that asked.
    prompt: list[PendingPromptLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did for one sequence: its new token (if any) and how it ended (if it did)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    # With the first new token of a request that asked: its prompt tokens' logprobs (from the second).
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "error" ("abort" is decided by the front end)
    stop_token_id: int | None = None  # the EOS or stop token that ended it
    error: str | None = None
    scheduled_time: float | None = None  # first time it was scheduled
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class CoreFacts:
    """What a front end reads of a built core: fixed for its life, so it crosses a process boundary once."""

    vocab_size: int
    device: str
    limits: SchedulerConfig
    num_blocks: int
    block_size: int

    def admission_error(self, num_prompt_tokens: int, max_tokens: int) -> RequestError | None:
        return admission_error(self.limits, self.num_blocks, self.block_size, num_prompt_tokens, max_tokens)


class EngineCore:
    def __init__(self, engine: str | Engine, config: RuntimeConfig | None = None):
        config = config or RuntimeConfig()
        self.config = config
        self.engine = engine if isinstance(engine, Engine) else read_engine(engine)
        build = self.engine.build
        self.device = config.torch_device()
        max_batch = min(config.max_batch_size or build.max_batch_size, build.max_batch_size)
        max_tokens = min(config.max_num_tokens or build.max_num_tokens, build.max_num_tokens)
        self.runner = ModelRunner(self.engine, self.device, config.cuda_graphs, max_batch, max_tokens,
                                  config.verify_weights)
        # On a GPU the pool takes what is left after the weights and a measured step's peak memory.
        reserved = self.runner.profile_step_memory() if config.kv_cache_memory is None else 0
        num_blocks = num_kv_blocks(self.runner.kv_spec, build, self.device, config.kv_cache_memory,
                                   config.gpu_memory_utilization, reserved)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, build.kv_block_size, config.enable_prefix_caching)
        if config.max_batch_size is None and config.kv_cache_memory is None:
            # Both sized here: as many sequences as the pool holds, the build's limit as the ceiling. (A pool
            # sized by hand is taken as meant: the scheduler preempts when requests outgrow it.)
            max_batch = min(max_batch, batch_the_pool_holds(num_blocks, build.kv_block_size, build.max_seq_len))
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_tokens=max_tokens, max_batch_size=max_batch, max_seq_len=build.max_seq_len,
                            policy=config.policy, enable_chunked_prefill=config.enable_chunked_prefill),
            self.block_manager,
        )
        self.sampler = Sampler()
        self.vocab_size = self.runner.config.vocab_size
        self.grammars = Grammars(self.engine.path / TOKENIZER_FILE, self.vocab_size,
                                 self.engine.tokenizer.get("eos_token_ids") or [])
        # Requests waiting for another to compute its prompt: that request's id -> (it, the waiting ones).
        self._deferred: dict[str, tuple[Request, list[Request]]] = {}
        self._requests: dict[str, Request] = {}
        # The launched step whose sampled tokens are still on the device (async scheduling).
        self._inflight: _Launched | None = None
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self.num_steps = 0

    # ----- requests -----
    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request; RequestError if it could never be served here (the front end checks first)."""
        r = core_request
        req = Request(r.request_id, r.prompt_token_ids, r.sampling_params, eos_token_ids=r.eos_token_ids,
                      arrival_time=r.arrival_time)
        if r.sampling_params.structured is not None:
            req.grammar = self.grammars.matcher(r.sampling_params.structured)
        leader = self._requests.get(r.after) if r.after is not None else None
        if leader is not None and not _prompt_done(leader):
            problem = self.scheduler.admission_error(req.num_prompt_tokens, req.sampling_params.max_tokens)
            if problem:
                raise type(problem)(f"request {req.request_id!r}: {problem}")
            self._deferred.setdefault(r.after, (leader, []))[1].append(req)
        else:
            self.scheduler.add_request(req)
        self._requests[req.request_id] = req

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            req = self._requests.pop(rid, None)
            if req is None:
                continue
            for leader_id, (_, waiting) in list(self._deferred.items()):
                if req in waiting:
                    waiting.remove(req)
            self.scheduler.abort(rid)
            self.sampler.free(rid)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or self._inflight is not None

    def request_ids(self) -> list[str]:
        return list(self._requests)

    # ----- the step -----
    def step(self) -> list[EngineCoreOutput]:
        """Schedule and launch a step; return the outputs whose tokens are known.

        With async scheduling the step's sampled tokens stay on the device while the next step is
        scheduled and launched (its inputs take them from the device), so they come back one call
        later; otherwise they come back in the same call.
        """
        clock = self.runner.clock
        with clock.phase("schedule"):
            out = self.scheduler.schedule()
        outputs: list[EngineCoreOutput] = []
        launched = self._launch(out, outputs) if out.requests else None
        if self._inflight is not None:
            outputs += self._resolve(self._inflight)
            self._inflight = None
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                outputs += self._resolve(launched)
        self.num_steps += 1
        with clock.phase("output"):
            self._admit_deferred()
        return outputs

    def _launch(self, out: SchedulerOutput, outputs: list[EngineCoreOutput]) -> _Launched | None:
        """Queue the step's forward pass and sampling on the device; on an error, find the requests at
        fault by running each alone (they fail with their message, the others go on)."""
        batch = list(zip(out.requests, out.num_new_tokens))
        to_sample = out.requests_to_sample
        clock = self.runner.clock
        try:
            with clock.phase("forward"):
                logits, prompt = self.runner.execute_and_score(batch, prompt_spans(batch), self._prev_tokens())
            if self._inflight is not None and any(self.sampler.needs_history(r) for r in to_sample):
                # Penalties and grammars read earlier tokens' values: take the step in flight's tokens first.
                outputs += self._resolve(self._inflight)
                self._inflight = None
                keep = [i for i, r in enumerate(to_sample) if not r.is_finished]
                logits, to_sample = logits[keep], [to_sample[i] for i in keep]
            with clock.phase("sample"):
                pending = self.sampler.sample(logits, to_sample)
        except Exception as e:
            return self._launch_alone(out, batch, e, outputs)
        sampling = self.scheduler.advance(out)
        return _Launched(sampling, pending, {r.request_id: i for i, r in enumerate(to_sample)},
                         prompt=[prompt] if prompt is not None else [])

    def _launch_alone(self, out: SchedulerOutput, batch: Batch, error: Exception,
                      outputs: list[EngineCoreOutput]) -> _Launched | None:
        if self._inflight is not None:
            outputs += self._resolve(self._inflight)
            self._inflight = None
        prompt: list[PendingPromptLogprobs] = []
        if len(batch) == 1:
            log.exception("a step failed for request %s", batch[0][0].request_id)
            failed = {batch[0][0].request_id: _message(error)}
            sampled: dict[str, int] = {}
            logprobs: dict[str, TokenLogprob] = {}
        else:
            log.warning("a step of %d requests failed (%s); running each alone to find the failing ones",
                        len(batch), _message(error))
            failed, sampled, logprobs = {}, {}, {}
            for (req, n), will_sample in zip(batch, out.will_sample):
                if req.is_finished:
                    continue
                try:
                    logits, scored = self.runner.execute_and_score([(req, n)], prompt_spans([(req, n)]))
                    if scored is not None:
                        prompt.append(scored)
                    if will_sample:
                        result = self.sampler(logits, [req])
                        sampled[req.request_id] = result.token_ids[0]
                        if result.logprobs is not None and result.logprobs[0] is not None:
                            logprobs[req.request_id] = result.logprobs[0]
                except Exception as e:
                    log.exception("request %s failed", req.request_id)
                    failed[req.request_id] = _message(e)
        for rid, message in failed.items():
            req = self._fail(rid)
            outputs.append(self._output(req, [], None, error=message))
        sampling = self.scheduler.advance(out)
        ids = torch.tensor([sampled[r.request_id] for r in sampling], dtype=torch.long)
        parts = [logprobs.get(r.request_id) for r in sampling]
        return _Launched(sampling, None, {r.request_id: i for i, r in enumerate(sampling)}, ids, parts, prompt)

    def _resolve(self, launched: _Launched) -> list[EngineCoreOutput]:
        """Wait for a launched step's tokens; record them; the outputs of the requests that took one."""
        clock = self.runner.clock
        try:
            with clock.phase("wait"):
                for scored in launched.prompt:
                    scored.deliver()
                if launched.pending is not None:
                    result = launched.pending.result()
                    token_ids, logprobs = result.token_ids, result.logprobs
                else:
                    token_ids, logprobs = launched.host_ids.tolist(), launched.host_logprobs
        except Exception as e:  # an error the device reported late: it cannot be pinned on one request
            log.exception("a step failed on the device")
            return [self._output(self._fail(r.request_id), [], None, error=_message(e))
                    for r in launched.requests if not r.is_finished]
        with clock.phase("output"):
            return self._record(launched, token_ids, logprobs)

    def _record(self, launched: _Launched, token_ids: list[int], logprobs) -> list[EngineCoreOutput]:
        """Record a step's tokens in its requests; the outputs of those that took one."""
        rows = launched.rows
        tokens = [(r, token_ids[rows[r.request_id]]) for r in launched.requests]
        took, finished = self.scheduler.resolve(tokens)
        outputs = []
        for req in took:
            i = rows[req.request_id]
            lp = logprobs[i] if logprobs is not None else None
            outputs.append(self._output(req, [token_ids[i]], [lp] if lp is not None else None))
        for req in finished:
            self._requests.pop(req.request_id, None)
            self.sampler.free(req.request_id)
        return outputs

    def _prev_tokens(self) -> PrevTokens | None:
        if self._inflight is None:
            return None
        inflight = self._inflight
        ids = inflight.pending.token_ids if inflight.pending is not None else moved_to(inflight.host_ids, self.device)
        return ids, inflight.rows

    def _fail(self, request_id: str) -> Request:
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
        req = self._requests.pop(request_id)
        req.drop_placeholders()
        self.sampler.free(request_id)
        return req

    def _output(self, req: Request, tokens: list[int], lps: list[TokenLogprob] | None,
                error: str | None = None) -> EngineCoreOutput:
        finish = req.status.value if req.is_finished else None
        stop_token = None
        if req.status == RequestStatus.FINISHED_STOPPED and tokens and (
                tokens[-1] in req.eos_token_ids or tokens[-1] in req.sampling_params.stop_token_ids):
            stop_token = tokens[-1]  # (a completed structured output stops on an ordinary token)
        first = bool(tokens) and req.num_known_tokens - req.num_prompt_tokens == len(tokens)
        prompt = req.prompt_logprobs if first and req.sampling_params.prompt_logprobs is not None else None
        return EngineCoreOutput(req.request_id, tokens, lps, prompt, finish, stop_token, error, req.scheduled_time,
                                req.num_cached_tokens, req.num_preemptions)

    def _admit_deferred(self) -> None:
        for leader_id, (leader, waiting) in list(self._deferred.items()):
            if _prompt_done(leader) or leader.request_id not in self._requests:
                del self._deferred[leader_id]
                for req in waiting:
                    self.scheduler.add_request(req)

    # ----- what others may read -----
    def facts(self) -> CoreFacts:
        bm = self.block_manager
        return CoreFacts(self.vocab_size, str(self.device), self.scheduler.config, bm.num_blocks, bm.block_size)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            steps=self.num_steps, step_seconds=self.runner.clock.snapshot(),
        )

    def checked_stats(self) -> EngineStats:
        """``check_integrity``, then the figures: what a client asks of an idle core (``call``; it pickles)."""
        self.check_integrity()
        return self.stats()

    def check_integrity(self) -> None:
        """The scheduler's and KV block manager's checks, plus: every live request is known to the core."""
        self.scheduler.check_integrity()
        deferred = {r.request_id for _, waiting in self._deferred.values() for r in waiting}
        queued = {r.request_id for r in self.scheduler.running} | {r.request_id for r in self.scheduler.waiting}
        if queued | deferred != set(self._requests):
            raise RuntimeError(f"engine core integrity check failed: it tracks {sorted(self._requests)[:8]} but "
                               f"the scheduler holds {sorted(queued)[:8]} and {sorted(deferred)[:8]} are deferred")


def _prompt_done(req: Request) -> bool:
    return req.num_computed_tokens >= req.num_prompt_tokens or req.is_finished


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def child_params(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n completions: its own seed (seed + i) so completions differ yet stay reproducible.
    Only the first computes prompt logprobs (they are the request's, not a completion's)."""
    seed = None if params.seed is None else (params.seed + i) % 2**64
    return replace(params, n=1, seed=seed, prompt_logprobs=params.prompt_logprobs if i == 0 else None)
