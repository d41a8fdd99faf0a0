"""The engine core: requests of token ids in, new token ids out, one step at a time.

It owns the scheduler, the KV block manager, the model runner and the sampler, and nothing of text:
detokenization, stop strings, n>1 merging and streaming are the output processor's, in the caller's
thread (vLLM v1's split). ``EngineCoreThread`` runs it in a thread of its own.

A step schedules by token counters, runs the model once for the whole mixed batch and samples the
requests that reached their last known token. If the batch raises, each of its requests is run again
alone: the ones that still raise finish with ``finish_reason="error"`` and their message, their KV
blocks freed; the others continue as if nothing happened.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from kiln.engine import Engine, read_engine
from kiln.errors import RequestError
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.kv_pool import num_kv_blocks
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.outputs import EngineStats, TokenLogprob
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kiln.runtime.step_inputs import Batch

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
class EngineCoreOutput:
    """What one step did for one sequence: its new token (if any) and how it ended (if it did)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "error" ("abort" is decided by the front end)
    stop_token_id: int | None = None  # the EOS or stop token that ended it
    error: str | None = None
    scheduled_time: float | None = None  # first time it was scheduled
    num_cached_tokens: int = 0
    num_preemptions: int = 0


class EngineCore:
    def __init__(self, engine: str | Engine, config: RuntimeConfig | None = None):
        config = config or RuntimeConfig()
        self.config = config
        self.engine = engine if isinstance(engine, Engine) else read_engine(engine)
        build = self.engine.build
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        max_batch = min(config.max_batch_size or build.max_batch_size, build.max_batch_size)
        max_tokens = min(config.max_num_tokens or build.max_num_tokens, build.max_num_tokens)
        self.runner = ModelRunner(self.engine, self.device, config.decode_graphs, max_batch, max_tokens,
                                  config.verify_weights)
        num_blocks = num_kv_blocks(self.runner.kv_spec, build, self.device, config.kv_cache_memory,
                                   config.gpu_memory_utilization)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, build.kv_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_tokens=max_tokens, max_batch_size=max_batch, max_seq_len=build.max_seq_len,
                            policy=config.policy, enable_chunked_prefill=config.enable_chunked_prefill),
            self.block_manager,
        )
        self.sampler = Sampler()
        self.vocab_size = self.runner.config.vocab_size
        # Requests waiting for another to compute its prompt: that request's id -> (it, the waiting ones).
        self._deferred: dict[str, tuple[Request, list[Request]]] = {}
        self._requests: dict[str, Request] = {}
        self.num_steps = 0

    # ----- requests -----
    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request; RequestError if it could never be served here (the front end checks first)."""
        r = core_request
        req = Request(r.request_id, r.prompt_token_ids, r.sampling_params, eos_token_ids=r.eos_token_ids,
                      arrival_time=r.arrival_time)
        leader = self._requests.get(r.after) if r.after is not None else None
        if leader is not None and not _prompt_done(leader):
            problem = self.scheduler.admission_error(req.num_prompt_tokens, req.sampling_params.max_tokens)
            if problem:
                raise RequestError(f"request {req.request_id!r}: {problem}")
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
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    # ----- the step -----
    def step(self) -> list[EngineCoreOutput]:
        out = self.scheduler.schedule()
        outputs: list[EngineCoreOutput] = []
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        if out.requests:
            failed = self._run(out, sampled, logprobs)
            for rid, message in failed.items():
                self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR)
                req = self._requests.pop(rid)
                self.sampler.free(rid)
                outputs.append(self._output(req, [], None, error=message))
        finished = self.scheduler.update(out, sampled)
        self.num_steps += 1
        for req in out.requests:
            token = sampled.get(req.request_id)
            if token is None:
                continue
            lp = logprobs.get(req.request_id)
            outputs.append(self._output(req, [token], [lp] if lp is not None else None))
        for req in finished:
            self._requests.pop(req.request_id, None)
            self.sampler.free(req.request_id)
        self._admit_deferred()
        return outputs

    def _run(self, out: SchedulerOutput, sampled: dict[str, int], logprobs: dict[str, TokenLogprob]) -> dict[str, str]:
        """Run the step; on an error, run each request alone. Returns the messages of those that fail."""
        batch = list(zip(out.requests, out.num_new_tokens))
        try:
            self._execute(batch, out.requests_to_sample, sampled, logprobs)
            return {}
        except Exception as e:
            if len(batch) == 1:
                log.exception("a step failed for request %s", batch[0][0].request_id)
                return {batch[0][0].request_id: _message(e)}
            log.warning("a step of %d requests failed (%s); running each alone to find the failing ones",
                        len(batch), _message(e))
        failed: dict[str, str] = {}
        for (req, n), will_sample in zip(batch, out.will_sample):
            try:
                self._execute([(req, n)], [req] if will_sample else [], sampled, logprobs)
            except Exception as e:
                log.exception("request %s failed", req.request_id)
                failed[req.request_id] = _message(e)
        return failed

    def _execute(self, batch: Batch, to_sample: list[Request], sampled: dict[str, int],
                 logprobs: dict[str, TokenLogprob]) -> None:
        logits = self.runner.execute(batch)
        if not to_sample:
            return
        result = self.sampler(logits, to_sample)
        for i, req in enumerate(to_sample):
            sampled[req.request_id] = result.token_ids[i]
            if result.logprobs is not None and result.logprobs[i] is not None:
                logprobs[req.request_id] = result.logprobs[i]

    def _output(self, req: Request, tokens: list[int], lps: list[TokenLogprob] | None,
                error: str | None = None) -> EngineCoreOutput:
        finish = req.status.value if req.is_finished else None
        stop_token = tokens[-1] if req.status == RequestStatus.FINISHED_STOPPED and tokens else None
        return EngineCoreOutput(req.request_id, tokens, lps, finish, stop_token, error, req.scheduled_time,
                                req.num_cached_tokens, req.num_preemptions)

    def _admit_deferred(self) -> None:
        for leader_id, (leader, waiting) in list(self._deferred.items()):
            if _prompt_done(leader) or leader.request_id not in self._requests:
                del self._deferred[leader_id]
                for req in waiting:
                    self.scheduler.add_request(req)

    # ----- what others may read -----
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            steps=self.num_steps,
        )

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
    """The i-th of n completions: its own seed (seed + i) so completions differ yet stay reproducible."""
    seed = None if params.seed is None else (params.seed + i) % 2**64
    return replace(params, n=1, seed=seed)
