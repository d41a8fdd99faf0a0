"""The metrics page (``:8002/metrics``): Triton's metric names, labels and meanings, in Prometheus text
format, read from the same per-model statistics the statistics API reports.

Per model version (labels ``model``, ``version``): request success and failure (failure also by
``reason``), inference and execution counts, cumulative request, queue and compute durations in
microseconds, pending requests, load time, and the time-to-first-response histogram. Machine-wide: CPU
utilization and memory, and GPU utilization and memory (label ``gpu_uuid``) when a GPU exists.
Backends add their own families through ``Backend.metric_families()``.

prometheus_client builds the families; the page itself is written here because its text writer
renames every counter ``*_total`` (the OpenMetrics convention), and Triton's counters, which
dashboards query by name, have no such suffix.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from kiln.server.devices import cuda_devices
from kiln.server.repository import ModelRepository
from kiln.server.stats import FAILURE_REASONS

log = logging.getLogger("kiln.server")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ["model", "version"]

_COUNTERS = [  # (name, help, value of a ModelStats)
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds "
     "(includes cached requests)", lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds "
     "(includes cached requests)", lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds (does not "
     "include cached requests)", lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds (does "
     "not include cached requests)", lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in "
     "microseconds (does not include cached requests)", lambda s: s.compute_output.ns // 1000),
]


class TritonMetrics:
    """A prometheus_client collector over a model repository."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        psutil.cpu_percent(interval=None)  # start the utilization window

    def collect(self) -> Iterator[Metric]:
        models = self.repository.served()
        for name, doc, value in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            for m in models:
                family.add_metric([m.name, str(m.version)], value(m.stats))
            yield family
        failure = CounterMetricFamily("nv_inference_request_failure",
                                      "Number of failed inference requests, all batch sizes",
                                      labels=LABELS + ["reason"])
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Instantaneous number of pending requests awaiting execution per-model.",
                                    labels=LABELS)
        load = GaugeMetricFamily("nv_model_load_duration_secs", "Model load time in seconds", labels=LABELS)
        first = HistogramMetricFamily("nv_inference_first_response_histogram_ms",
                                      "Duration from request to first response in milliseconds", labels=LABELS)
        for m in models:
            labels = [m.name, str(m.version)]
            for reason in FAILURE_REASONS:
                failure.add_metric(labels + [reason], m.stats.fail_reasons[reason])
            pending.add_metric(labels, m.stats.pending)
            load.add_metric(labels, m.load_seconds)
            first.add_metric(labels, m.stats.first_response_ms.cumulative(), m.stats.first_response_ms.sum)
        yield from (failure, pending, load, first)
        yield from _cpu()
        yield from _gpu()
        # Models of one backend report the same families: one family a name, with every model's samples.
        merged: dict[str, Metric] = {}
        for m in models:
            if m.backend is not None:
                for family in m.backend.metric_families():
                    if family.name in merged:
                        merged[family.name].samples.extend(family.samples)
                    else:
                        merged[family.name] = family
        yield from merged.values()


def render(families: Iterable[Metric]) -> bytes:
    """Prometheus text format 0.0.4, names as the families give them."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.documentation)}")
        lines.append(f"# TYPE {f.name} {'untyped' if f.type == 'unknown' else f.type}")
        for s in f.samples:
            name = f.name if (f.type == "counter" and s.name == f.name + "_total") else s.name
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
            lines.append(f"{name}{{{labels}}} {floatToGoString(s.value)}" if labels
                         else f"{name} {floatToGoString(s.value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _cpu() -> Iterator[Metric]:
    mem = psutil.virtual_memory()
    yield GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]",
                            value=psutil.cpu_percent(interval=None) / 100.0)
    yield GaugeMetricFamily("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", value=mem.total)
    yield GaugeMetricFamily("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes",
                            value=mem.total - mem.available)


def _gpu() -> Iterator[Metric]:
    devices = cuda_devices()
    if not devices:
        return
    util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"])
    total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
    used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
    try:
        import torch

        for d in devices:
            uuid = str(torch.cuda.get_device_properties(d).uuid)
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            free, size = torch.cuda.mem_get_info(d)
            total.add_metric([uuid], size)
            used.add_metric([uuid], size - free)
            with contextlib.suppress(Exception):  # utilization needs pynvml (nvidia-ml-py)
                util.add_metric([uuid], torch.cuda.utilization(d) / 100.0)
    except Exception as e:  # the page must render even when the GPU query fails
        log.warning("GPU metrics unavailable: %s", e)
        return
    yield from (util, total, used)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
