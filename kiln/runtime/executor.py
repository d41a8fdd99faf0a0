"""The executor: one step loop over the scheduler, the model runner, the sampler and the detokenizer.

Each ``step()`` schedules by token counters, runs the model once for the whole mixed batch, samples
the requests that reached their last known token, detokenizes incrementally, applies stop strings,
and returns what changed. ``LLM`` drives it to completion; ``AsyncLLM`` drives it in the background.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

import torch

from kiln.engine import read_engine
from kiln.errors import RequestError
from kiln.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.runtime.tokenizer import EngineTokenizer

# The most a KV pool takes on the CPU when no budget is given.
_CPU_KV_CAP_BYTES = 4 << 30


@dataclass(frozen=True)
class ExecutorConfig:
    device: str | None = None
    # KV cache budget in bytes. Or, on a GPU, the fraction of its memory kiln may fill (weights
    # included), all of it given to the pool. Neither: twice a full batch at max length, within 90%.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float | None = None
    policy: str = "max_utilization"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # CUDA graphs for decode steps: "auto" (on a GPU when the plan allows), "on", "off", or "static"
    # (their padded fixed-shape path without capture, to test it on a CPU).
    decode_graphs: str = "auto"
    # Runtime limits at or below the engine's build limits (None: the build limit).
    max_batch_size: int | None = None
    max_num_tokens: int | None = None


@dataclass(slots=True)
class _Completion:
    """The text side of one sequence: detokenizer, stop strings, what has been sent."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""
    sent_text: int = 0
    sent_tokens: int = 0
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class _Group:
    """A caller's request: one prompt, ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    # Completions 2..n join once the first has computed the prompt, so they reuse its KV blocks.
    pending: list[Request] = field(default_factory=list)


class Executor:
    def __init__(self, engine_dir: str, config: ExecutorConfig | None = None):
        config = config or ExecutorConfig()
        self.config = config
        self.engine = read_engine(engine_dir)
        build = self.engine.build
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = EngineTokenizer(self.engine)
        self.runner = ModelRunner(self.engine, self.device, config.decode_graphs)
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, build.kv_block_size, config.enable_prefix_caching)
        self.max_seq_len = build.max_seq_len
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_tokens=min(config.max_num_tokens or build.max_num_tokens, build.max_num_tokens),
                max_batch_size=min(config.max_batch_size or build.max_batch_size, build.max_batch_size),
                max_seq_len=build.max_seq_len,
                policy=config.policy,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.sampler = Sampler()
        self._groups: dict[str, _Group] = {}
        self._by_seq: dict[str, tuple[_Group, _Completion]] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    # ----- requests -----
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if request_id in self._groups or any(s in self._by_seq for s in seq_ids):
            raise RequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.runner.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        group = _Group(request_id, text, ids)
        requests = []
        for i, seq_id in enumerate(seq_ids):
            child = params if params.n == 1 else _child_params(params, i)
            req = Request(seq_id, ids, child, eos_token_ids=self.tokenizer.eos_token_ids,
                          arrival_time=group.arrival_time)
            requests.append(req)
            group.completions.append(_Completion(
                req, i, IncrementalDetokenizer(self.tokenizer.tokenizer, ids), StopStringMatcher(child.stop),
                logprobs=[] if child.logprobs is not None else None,
            ))
        self.scheduler.add_request(requests[0])
        group.pending = requests[1:]
        for req, completion in zip(requests, group.completions):
            self._by_seq[req.request_id] = (group, completion)
        self._groups[request_id] = group
        return request_id

    def abort(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        group.pending.clear()
        for c in group.completions:
            self.scheduler.abort(c.request.request_id)
            self.sampler.free(c.request.request_id)
            self._by_seq.pop(c.request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    # ----- the step -----
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        batch = [(req, n) for req, n in zip(out.requests, out.num_new_tokens)]
        sampled: dict[str, int] = {}
        touched: dict[str, _Group] = {}
        if batch:
            logits = self.runner.execute(batch)
            to_sample = out.requests_to_sample
            result = self.sampler(logits, to_sample)
            for i, req in enumerate(to_sample):
                sampled[req.request_id] = result.token_ids[i]
                if result.logprobs is not None and result.logprobs[i] is not None:
                    group, completion = self._by_seq[req.request_id]
                    if completion.logprobs is not None:
                        completion.logprobs.append(result.logprobs[i])
        finished = self.scheduler.update(out, sampled)
        self.num_steps += 1
        now = time.monotonic()
        for req_id, token in sampled.items():
            group, completion = self._by_seq[req_id]
            req = completion.request
            if req.first_token_time is None:
                req.first_token_time = now
            emit, hit = completion.stops.feed(completion.detokenizer.add([token]))
            completion.text += emit
            if hit is not None:
                if req.is_finished:  # the same token also hit the length limit: the stop string names the end
                    req.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish_request(req_id, RequestStatus.FINISHED_STOPPED)
                    finished.append(req)
            touched[group.request_id] = group
        for req in finished:
            group, completion = self._by_seq[req.request_id]
            if req.finished_time is None:
                req.finished_time = now
            self._close_text(completion)
            self.sampler.free(req.request_id)
            touched[group.request_id] = group
        self._admit_forks()
        outputs = [self._output(g) for g in touched.values()]
        for o in outputs:
            if o.finished:
                group = self._groups.pop(o.request_id)
                for c in group.completions:
                    self._by_seq.pop(c.request.request_id, None)
        return outputs

    @staticmethod
    def _close_text(c: _Completion) -> None:
        """Release held-back text at the end: an unfinished character, a stop-string prefix that never completed."""
        stops = c.stops
        if not stops.stopped:
            emit, _ = stops.feed(c.detokenizer.flush())
            c.text += emit
            c.text += stops.flush()
        req = c.request
        if stops.hit is not None:
            c.stop_reason = stops.hit
        elif req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids:
            c.stop_reason = req.output_token_ids[-1]

    def _admit_forks(self) -> None:
        for group in self._groups.values():
            first = group.completions[0].request
            if group.pending and (first.num_computed_tokens >= first.num_prompt_tokens or first.is_finished):
                for req in group.pending:
                    self.scheduler.add_request(req)
                group.pending.clear()

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for c in group.completions:
            req = c.request
            ids = req.output_token_ids
            completions.append(CompletionOutput(
                index=c.index, text=c.text, token_ids=list(ids),
                finish_reason=req.status.value if req.is_finished else None, stop_reason=c.stop_reason,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                delta_text=c.text[c.sent_text:], delta_token_ids=list(ids[c.sent_tokens:]),
            ))
            c.sent_text, c.sent_tokens = len(c.text), len(ids)
        finished = all(c.request.is_finished for c in group.completions)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             self._metrics(group))

    def _metrics(self, group: _Group) -> RequestMetrics:
        reqs = [c.request for c in group.completions]
        first = reqs[0]
        m = RequestMetrics(arrival_time=group.arrival_time, num_prompt_tokens=len(group.prompt_token_ids),
                           num_cached_tokens=first.num_cached_tokens,
                           num_generated_tokens=sum(r.num_output_tokens for r in reqs),
                           num_preemptions=sum(r.num_preemptions for r in reqs))
        if first.scheduled_time is not None:
            m.queue_time = first.scheduled_time - group.arrival_time
        if first.first_token_time is not None:
            m.time_to_first_token = first.first_token_time - group.arrival_time
        if all(r.finished_time is not None for r in reqs):
            end = max(r.finished_time for r in reqs)
            m.e2e_latency = end - group.arrival_time
            if first.first_token_time is not None and first.num_output_tokens > 1:
                m.time_per_output_token = (first.finished_time - first.first_token_time) / (first.num_output_tokens - 1)
        return m

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            steps=self.num_steps,
        )

    def _num_kv_blocks(self) -> int:
        """Blocks for the KV pool: the budget given, else room for every batch slot at full length
        (twice over, for the prefix cache) within the free memory of a GPU or a cap on the CPU."""
        spec = self.runner.kv_spec
        build = self.engine.build
        full_batch = -(-build.max_seq_len // build.kv_block_size) * build.max_batch_size
        budget = self.config.kv_cache_memory
        fraction = self.config.gpu_memory_utilization
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * (fraction or 0.9)) - (total - free)
            if fraction is None:
                budget = min(budget, 2 * full_batch * spec.bytes_per_block)
        elif budget is None:
            budget = min(_CPU_KV_CAP_BYTES, 2 * full_batch * spec.bytes_per_block)
        blocks = budget // spec.bytes_per_block
        if blocks < 1:
            raise RequestError(f"the KV cache budget of {budget} bytes holds no block "
                               f"(one block of {build.kv_block_size} tokens needs {spec.bytes_per_block} bytes)")
        return blocks


def _child_params(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n completions: its own seed (seed + i) so completions differ yet stay reproducible."""
    seed = None if params.seed is None else params.seed + i
    return replace(params, n=1, seed=seed)
