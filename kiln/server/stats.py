"""Per model version statistics, in the shape of Triton's statistics extension.

One owner for the numbers: the statistics API reports them as they are, and the metrics page
(``metrics.py``) reads the same objects when scraped, so the two always agree. As in Triton, a request
counts once it has its final response and its execution is over: a success adds to the request,
queue and compute durations and to the inference count (its batch size); an execution adds to the
execution count and the per-batch-size statistics. Updated only on the event loop thread, so no lock.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString
from tritonclient.grpc import service_pb2 as pb

# Triton's failure reasons (the ``reason`` label of nv_inference_request_failure).
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)
# Triton's default buckets for nv_inference_first_response_histogram_ms.
FIRST_RESPONSE_BUCKETS_MS = (100.0, 500.0, 2000.0, 5000.0)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass(slots=True)
class ComputeTimes:
    """What an execution spent preparing inputs, running the model and producing outputs."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, non-cumulative; the last is +Inf
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @classmethod
    def merged(cls, histograms: list[Histogram]) -> Histogram:
        """The sum of histograms with the same bounds."""
        out = cls(histograms[0].bounds)
        for h in histograms:
            out.counts = [a + b for a, b in zip(out.counts, h.counts)]
            out.sum += h.sum
        return out

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus writes them: cumulative counts by ``le`` bound, +Inf last."""
        out, total = [], 0
        for bound, count in zip(list(self.bounds) + [float("inf")], self.counts):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class ModelStats:
    def __init__(self, name: str, version: int):
        self.name = name
        self.version = version
        self.success = Duration()
        self.fail = Duration()
        self.fail_reasons = {r: 0 for r in FAILURE_REASONS}
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, tuple[Duration, Duration, Duration]] = {}
        self.first_response_ms = Histogram(FIRST_RESPONSE_BUCKETS_MS)
        self.pending = 0  # requests queued, not yet executing

    def record_execution(self, batch_size: int, times: ComputeTimes) -> None:
        """One model execution holding ``batch_size`` inferences."""
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        per_batch = self.batches.setdefault(batch_size, (Duration(), Duration(), Duration()))
        for d, ns in zip(per_batch, (times.input_ns, times.infer_ns, times.output_ns)):
            d.add(ns)

    def record_first_response(self, ns: int) -> None:
        self.first_response_ms.observe(ns / 1e6)

    def record_success(self, batch_size: int, request_ns: int, queue_ns: int, times: ComputeTimes) -> None:
        self.inference_count += max(batch_size, 1)
        self.success.add(request_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(times.input_ns)
        self.compute_infer.add(times.infer_ns)
        self.compute_output.add(times.output_ns)

    def record_failure(self, request_ns: int, reason: str) -> None:
        self.fail.add(request_ns)
        self.fail_reasons[reason] += 1

    def proto(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.name, version=str(self.version), last_inference=self.last_inference_ms,
            inference_count=self.inference_count, execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.proto(), fail=self.fail.proto(), queue=self.queue.proto(),
                compute_input=self.compute_input.proto(), compute_infer=self.compute_infer.proto(),
                compute_output=self.compute_output.proto(), cache_hit=pb.StatisticDuration(),
                cache_miss=pb.StatisticDuration()),
            batch_stats=[
                pb.InferBatchStatistics(batch_size=size, compute_input=d[0].proto(), compute_infer=d[1].proto(),
                                        compute_output=d[2].proto())
                for size, d in sorted(self.batches.items())])
