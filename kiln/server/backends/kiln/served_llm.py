"""One engine as the server runs it: an ``AsyncLLM`` plus the LLM metrics of every request it serves.

Both protocols reach the engine through this object, by the kiln backend's ``execute`` (``submit``, for tensors
and for the OpenAI routes' typed requests alike), so the metrics count every request once, whichever way it
came. The metric families it reports (prefix ``kiln_``, labels ``model`` and ``version``; units in
the names, as Prometheus asks):

- gauges ``kiln_num_requests_running`` / ``kiln_num_requests_waiting``, ``kiln_kv_cache_blocks_used`` /
  ``_free`` / ``_total``, ``kiln_kv_cache_usage_ratio``, ``kiln_prefix_cache_hit_rate``;
- counters ``kiln_prompt_tokens``, ``kiln_generation_tokens``, ``kiln_request_finished`` (label
  ``finish_reason``), ``kiln_num_preemptions``;
- histograms ``kiln_time_to_first_token_seconds``, ``kiln_time_per_output_token_seconds``,
  ``kiln_e2e_request_latency_seconds`` (vLLM's buckets).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from kiln.server.stats import Histogram

if TYPE_CHECKING:  # the runtime (and torch) load with the first kiln model, not with the server
    from kiln.runtime import RequestOutput, SamplingParams
    from kiln.runtime.input_processor import Prompt

# vLLM's buckets, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
LABELS = ["model", "version"]


@dataclass
class LLMMetrics:
    """What finished requests add up to (updated on the event loop only, so no lock)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Counter = field(default_factory=Counter)  # finish_reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def record(self, out: RequestOutput, ended: str | None = None) -> None:
        """Count a request by its last output; ``ended`` overrides its finish reason (a consumer that left)."""
        m = out.metrics
        self.prompt_tokens += m.num_prompt_tokens
        self.generation_tokens += m.num_generated_tokens
        self.finished[ended or out.outputs[0].finish_reason or "abort"] += 1
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self.tpot.observe(m.time_per_output_token)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)


class ServedLLM:
    """An ``AsyncLLM`` over ``engine`` on ``device``; ``options`` are RuntimeConfig's fields."""

    def __init__(self, engine: Path, device: str | None, options: dict):
        from kiln.runtime import AsyncLLM

        self.llm = AsyncLLM(engine, device, **options)
        self.tokenizer = self.llm.tokenizer
        self.max_seq_len = self.llm.max_seq_len
        self.metrics = LLMMetrics()
        self._last: dict[str, RequestOutput | None] = {}  # submitted requests running: their latest output

    @property
    def load(self) -> int:
        """Requests in the engine (running and waiting), to pick the least busy instance."""
        stats = self.llm.stats()
        return stats.num_running + stats.num_waiting

    async def submit(self, prompt: Prompt, params: SamplingParams, request_id: str,
                     put: Callable[[RequestOutput], None]) -> None:
        """``AsyncLLM.submit``: each output to ``put``, on the loop; counted in the metrics when it ends, or when
        it is dropped (``drop``)."""
        self._last[request_id] = None

        def deliver(out: RequestOutput) -> None:
            if out.finished:
                self._last.pop(request_id, None)
                self.metrics.record(out)
            else:
                self._last[request_id] = out
            put(out)

        try:
            await self.llm.submit(prompt, params, request_id, _Put(deliver))
        except BaseException:
            self._last.pop(request_id, None)
            raise

    def drop(self, request_id: str) -> None:
        """End a submitted request early (its consumer left), counted as aborted."""
        if request_id in self._last:
            last = self._last.pop(request_id)
            self.llm.drop(request_id)
            if last is not None:
                self.metrics.record(last, "abort")

    def shutdown(self) -> None:
        self.llm.shutdown()


@dataclass(slots=True)
class _Put:
    """A sink (``AsyncLLM.submit``) that calls a function."""

    put_nowait: Callable


def metric_families(llms: list[ServedLLM], labels: list[str]) -> Iterator[Metric]:
    """The families of one model version (labels: model, version), summed over its instances' engines."""
    stats = [llm.llm.stats() for llm in llms]

    def total(name: str) -> int:
        return sum(getattr(s, name) for s in stats)

    blocks, used = total("kv_blocks_total"), total("kv_blocks_used")
    gauges = [
        ("kiln_num_requests_running", "Requests in the engine's running batch", total("num_running")),
        ("kiln_num_requests_waiting", "Requests waiting for the engine's running batch", total("num_waiting")),
        ("kiln_kv_cache_blocks_used", "KV cache blocks held by requests", used),
        ("kiln_kv_cache_blocks_free", "KV cache blocks free (unused prefix-cache blocks included)",
         total("kv_blocks_free")),
        ("kiln_kv_cache_blocks_total", "KV cache blocks in the pool", blocks),
        ("kiln_kv_cache_usage_ratio", "Share of the KV cache blocks in use [0.0 - 1.0]", used / blocks if blocks else 0.0),
        ("kiln_prefix_cache_hit_rate", "Share of admitted prompt tokens served from the prefix cache (mean of "
         "the instances)", sum(s.prefix_cache_hit_rate for s in stats) / len(stats)),
    ]
    for name, doc, value in gauges:
        family = GaugeMetricFamily(name, doc, labels=LABELS)
        family.add_metric(labels, value)
        yield family
    ms = [llm.metrics for llm in llms]
    for name, doc, value in [
        ("kiln_prompt_tokens", "Prompt tokens of finished requests", sum(m.prompt_tokens for m in ms)),
        ("kiln_generation_tokens", "Tokens generated for finished requests", sum(m.generation_tokens for m in ms)),
        ("kiln_num_preemptions", "Requests preempted to free KV cache blocks", total("num_preemptions")),
    ]:
        family = CounterMetricFamily(name, doc, labels=LABELS)
        family.add_metric(labels, value)
        yield family
    finished = CounterMetricFamily("kiln_request_finished", "Finished requests by finish reason",
                                   labels=LABELS + ["finish_reason"])
    reasons = sum((m.finished for m in ms), Counter())
    for reason in sorted(set(reasons) | {"stop", "length", "abort"}):
        finished.add_metric(labels + [reason], reasons[reason])
    yield finished
    for name, doc, attr in [
        ("kiln_time_to_first_token_seconds", "Time from arrival to the first generated token", "ttft"),
        ("kiln_time_per_output_token_seconds", "Mean time between generated tokens, per request", "tpot"),
        ("kiln_e2e_request_latency_seconds", "Time from arrival to the last token", "e2e"),
    ]:
        h = Histogram.merged([getattr(m, attr) for m in ms])
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        family.add_metric(labels, h.cumulative(), h.sum)
        yield family
