"""The front end's output side: the engine core's new token ids turned into what callers read.

For each request it keeps the detokenizer and stop-string matcher of every completion, merges the
``n`` completions into one ``RequestOutput``, and keeps the request's metrics. It runs in the
caller's thread (an asyncio loop, or ``LLM.generate``), never in the engine core's, so a slow
consumer never stalls a step. Work per new token is O(1): deltas are appended to lists and the
cumulative fields of an output are views of them (see ``outputs``).

A stop string is seen here, not in the core: the completion ends at once and ``ProcessedOutputs``
names it so that the caller aborts it in the core. A request the core failed ends with
``finish_reason="error"`` and its message in ``RequestOutput.error``; the clients raise it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiln.errors import RequestError
from kiln.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kiln.runtime.engine_core import EngineCoreOutput
from kiln.runtime.input_processor import NewRequest
from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from kiln.runtime.tokenizer import EngineTokenizer


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    # Core sequences that ended here (a stop string, or a sibling's failure) and must be aborted there.
    to_abort: list[str] = field(default_factory=list)


class _Completion:
    __slots__ = ("seq_id", "index", "group", "detokenizer", "stops", "pieces", "tokens", "logprobs",
                 "finish_reason", "stop_reason", "first_token_time", "last_token_time")

    def __init__(self, seq_id: str, index: int, group: _Group, tokenizer: EngineTokenizer):
        params = group.request.params
        self.seq_id = seq_id
        self.index = index
        self.group = group
        self.detokenizer = IncrementalDetokenizer(tokenizer.tokenizer, group.request.prompt_token_ids,
                                                  params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop)
        self.pieces: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    def finish(self, reason: str, stop_reason: str | int | None, close_text: bool = True) -> str:
        """End the completion; return the held-back text it releases (an unfinished character, or a
        stop-string prefix that never completed, cut at a stop string it holds)."""
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if not close_text or self.stops.stopped:
            return ""
        emit, _ = self.stops.feed(self.detokenizer.flush())
        emit += self.stops.flush()
        if self.stops.hit is not None:
            self.finish_reason, self.stop_reason = "stop", self.stops.hit
        return emit


class _Group:
    __slots__ = ("request", "completions", "scheduled_time", "num_cached_tokens", "num_preemptions", "error",
                 "prompt_logprobs")

    def __init__(self, request: NewRequest):
        self.request = request
        self.error: str | None = None
        self.completions: list[_Completion] = []
        self.scheduled_time: float | None = None
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        for c in self.completions:  # (a loop: all() over a generator cost more than the rest of the check)
            if c.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: EngineTokenizer):
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._seqs: dict[str, _Completion] = {}

    def add(self, request: NewRequest) -> None:
        """Track a request; RequestError if its id, or one of its completions' ids, is in use."""
        clash = [i for i in (request.request_id, *request.seq_ids) if i in self._groups or i in self._seqs]
        if clash:
            raise RequestError(f"request id {clash[0]!r} is already in use")
        group = _Group(request)
        for i, seq_id in enumerate(request.seq_ids):
            completion = _Completion(seq_id, i, group, self.tokenizer)
            group.completions.append(completion)
            self._seqs[seq_id] = completion
        self._groups[request.request_id] = group

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def seq_ids(self, request_id: str) -> list[str]:
        group = self._groups.get(request_id)
        return [] if group is None else [c.seq_id for c in group.completions]

    def request_id_of(self, seq_id: str) -> str | None:
        completion = self._seqs.get(seq_id)
        return None if completion is None else completion.group.request.request_id

    def abort(self, request_id: str) -> tuple[RequestOutput | None, list[str]]:
        """End a request as aborted: its final output (None if unknown) and the core sequences to abort."""
        group = self._groups.get(request_id)
        if group is None:
            return None, []
        deltas: dict[_Completion, list] = {}
        for c in group.completions:
            if c.finish_reason is None:
                c.finish("abort", None, close_text=False)
            deltas[c] = ["", [], []]
        return self._request_output(group, deltas, time.monotonic()), [c.seq_id for c in group.completions]

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """The outputs of one or more steps (in order) as one ``RequestOutput`` per request they touched."""
        result = ProcessedOutputs()
        now = time.monotonic()
        # Per touched group, per completion: [delta text, delta token ids, delta logprobs].
        touched: dict[_Group, dict[_Completion, list]] = {}
        for out in merge_steps(core_outputs):
            c = self._seqs.get(out.request_id)
            if c is None or c.finish_reason is not None:
                continue  # aborted or stopped here already; the core has been told
            group = c.group
            delta = touched.setdefault(group, {}).setdefault(c, ["", [], []])
            if out.error is not None:
                group.error = out.error
                for sibling in group.completions:
                    if sibling.finish_reason is None:
                        sibling.finish("error", None, close_text=False)
                        if sibling is not c:
                            result.to_abort.append(sibling.seq_id)
                continue
            if group.scheduled_time is None:
                group.scheduled_time = out.scheduled_time
            group.num_cached_tokens = max(group.num_cached_tokens, out.num_cached_tokens)
            group.num_preemptions = max(group.num_preemptions, out.num_preemptions)
            if out.prompt_logprobs is not None:
                group.prompt_logprobs = [None, *out.prompt_logprobs]
            tokens = out.new_token_ids
            if tokens:
                if c.first_token_time is None:
                    c.first_token_time = now
                c.last_token_time = now
            logprobs = out.new_logprobs if c.logprobs is not None else None
            if not c.stops.stop:  # all of them at once: one decode for the step's (or steps') tokens
                c.tokens.extend(tokens)
                delta[1].extend(tokens)
                if logprobs is not None:
                    c.logprobs.extend(logprobs)
                    delta[2].extend(logprobs)
                emit = c.detokenizer.add(tokens)
                if emit:
                    c.pieces.append(emit)
                    delta[0] += emit
            else:  # one at a time: no token past a stop string is kept
                for i, token in enumerate(tokens):
                    c.tokens.append(token)
                    delta[1].append(token)
                    if logprobs is not None:
                        c.logprobs.append(logprobs[i])
                        delta[2].append(logprobs[i])
                    emit, hit = c.stops.feed(c.detokenizer.add([token]))
                    if emit:
                        c.pieces.append(emit)
                        delta[0] += emit
                    if hit is not None:
                        c.finish("stop", hit)
                        if out.finish_reason is None:
                            result.to_abort.append(c.seq_id)
                        break
            if c.finish_reason is None and out.finish_reason is not None:
                emit = c.finish(out.finish_reason, out.stop_token_id)
                if emit:
                    c.pieces.append(emit)
                    delta[0] += emit
        for group, deltas in touched.items():
            if group.request.request_id in self._groups:
                result.outputs.append(self._request_output(group, deltas, now))
        return result

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request.request_id, None)
        for c in group.completions:
            self._seqs.pop(c.seq_id, None)

    def _request_output(self, group: _Group, deltas: dict[_Completion, list], now: float) -> RequestOutput:
        completions = []
        for c in group.completions:
            text, tokens, lps = deltas.get(c) or ("", [], [])
            completions.append(CompletionOutput(c.index, c.pieces, c.tokens, c.logprobs, c.finish_reason,
                                                c.stop_reason, text, tokens,
                                                lps if c.logprobs is not None else None))
        finished = group.finished
        if finished:
            self._forget(group)
        req = group.request
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished,
                             self._metrics(group, finished, now), group.error, group.prompt_logprobs)

    @staticmethod
    def _metrics(group: _Group, finished: bool, now: float) -> RequestMetrics:
        req = group.request
        first = group.completions[0]
        m = RequestMetrics(arrival_time=req.arrival_time, num_prompt_tokens=len(req.prompt_token_ids),
                           num_cached_tokens=group.num_cached_tokens,
                           num_generated_tokens=sum(len(c.tokens) for c in group.completions),
                           num_preemptions=group.num_preemptions)
        if group.scheduled_time is not None:
            m.queue_time = max(0.0, group.scheduled_time - req.arrival_time)
        if first.first_token_time is not None:
            m.time_to_first_token = first.first_token_time - req.arrival_time
            if len(first.tokens) > 1:
                m.time_per_output_token = (first.last_token_time - first.first_token_time) / (len(first.tokens) - 1)
        if finished:
            m.e2e_latency = now - req.arrival_time
        return m


def merge_steps(outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
    """Several steps' outputs (in step order) with one per sequence: its new tokens and logprobs in order,
    the first prompt logprobs and scheduling time, the last step's ending."""
    by_seq: dict[str, list[EngineCoreOutput]] = {}
    for out in outputs:
        by_seq.setdefault(out.request_id, []).append(out)
    if len(by_seq) == len(outputs):
        return outputs
    merged = []
    for steps in by_seq.values():
        if len(steps) == 1:
            merged.append(steps[0])
            continue
        last = steps[-1]
        logprobs = [s.new_logprobs for s in steps if s.new_logprobs is not None]
        merged.append(EngineCoreOutput(
            last.request_id, [t for s in steps for t in s.new_token_ids],
            [lp for part in logprobs for lp in part] if logprobs else None,
            next((s.prompt_logprobs for s in steps if s.prompt_logprobs is not None), None),
            last.finish_reason, last.stop_token_id, last.error,
            next((s.scheduled_time for s in steps if s.scheduled_time is not None), None),
            max(s.num_cached_tokens for s in steps), max(s.num_preemptions for s in steps)))
    return merged
