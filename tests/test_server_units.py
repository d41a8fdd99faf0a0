"""The server's plain parts without a server: configs and version policies, data type conversions,
request admission, the dynamic batcher's rules, protobuf JSON and the metrics page format."""
from __future__ import annotations

import os
import struct

import ml_dtypes
import numpy as np
import pytest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from kiln.server import config as cfg
from kiln.server import datatypes
from kiln.server.core import InferenceRequest, Tensor
from kiln.server.errors import Code, ServerError
from kiln.server.metrics import render
from kiln.server.protocols.proto_json import to_json
from kiln.server.scheduling.dynamic_batcher import BatchPolicy
from kiln.server.shm import SharedMemoryManager
from kiln.server.stats import ComputeTimes, ModelStats
from kiln.server.validation import Admission

SIMPLE = """
name: "m"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ -1, 4 ] },
        { name: "B" data_type: TYPE_INT32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } optional: true } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
"""


def parsed(text: str = SIMPLE) -> cfg.ModelConfig:
    config = cfg.parse_text(text)
    cfg.normalize(config)
    cfg.validate(config)
    return config


# -- config ---------------------------------------------------------------------------------------------

def test_normalize_fills_triton_defaults():
    config = parsed(SIMPLE + "dynamic_batching { }")
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert [g.name for g in config.instance_group] == ["m_0"]
    cfg.resolve_instances(config, gpus=[], default_cpu_count=2)
    group = config.instance_group[0]
    assert group.kind == cfg.mc.ModelInstanceGroup.KIND_CPU and group.count == 2


def test_gpu_instances_need_a_gpu():
    config = parsed(SIMPLE + "instance_group [ { kind: KIND_GPU } ]")
    config.backend = "onnxruntime"
    with pytest.raises(ServerError, match="asks for KIND_GPU but the 'onnxruntime' backend sees no GPU"):
        cfg.resolve_instances(config, gpus=[], default_cpu_count=1)
    cfg.resolve_instances(config, gpus=[0, 1], default_cpu_count=1)
    assert list(config.instance_group[0].gpus) == [0, 1] and config.instance_group[0].count == 1


@pytest.mark.parametrize("change,message", [
    (("dims: [ -1, 4 ]", "dims: [ 0, 4 ]"), "'A' dimension must be integer >= 1, or -1"),
    (('data_type: TYPE_FP32 dims: [ -1, 4 ] },', "dims: [ -1, 4 ] },"), "'A' must specify 'data_type'"),
    (("reshape: { shape: [ 4 ] }", "reshape: { shape: [ 5 ] }"), "'B' has different size for dims"),
    (('name: "B"', 'name: "A"'), "two inputs named 'A'"),
    (("max_batch_size: 8", "max_batch_size: -1"), "'max_batch_size' of model 'm' must be >= 0"),
])
def test_invalid_configs_are_refused_with_the_reason(change, message):
    with pytest.raises(ServerError, match=message):
        parsed(SIMPLE.replace(*change))


def test_settings_kiln_does_not_do_are_refused_by_name(tmp_path):
    """A config field kiln's scheduling does not implement is refused at load, naming it, never ignored."""
    from kiln.server.scheduling.sequence_batcher import SequencePolicy

    stateful = parsed(SIMPLE + "sequence_batching { max_sequence_idle_microseconds: 5000000 }")
    stateful.backend = "onnxruntime"
    with pytest.raises(ServerError, match="kiln runs stateful models on the python backend, not 'onnxruntime'"):
        SequencePolicy.from_config(stateful, tmp_path)
    stateful.backend = "python"
    stateful.sequence_batching.iterative_sequence = True
    with pytest.raises(ServerError, match="sets sequence_batching.iterative_sequence, which kiln does not implement"):
        SequencePolicy.from_config(stateful, tmp_path)
    with pytest.raises(ServerError, match='"dynamic_batching" is specified along with field "sequence_batching"'):
        parsed(SIMPLE + "sequence_batching { } dynamic_batching { }")  # one scheduler: protobuf's oneof says so
    with pytest.raises(ServerError, match="ensemble scheduling cannot be set for model 'm' whose platform is not"):
        parsed(SIMPLE + 'ensemble_scheduling { step [ { model_name: "a" model_version: -1 } ] }')
    with pytest.raises(ServerError, match="ensemble scheduling must be set for ensemble 'm'"):
        parsed(SIMPLE + "platform: \"ensemble\"")


@pytest.mark.parametrize("batching,message", [
    ("priority_levels: 2", r"default priority level must be in range \[1, 2\]"),
    ("priority_levels: 2 default_priority_level: 3", r"default priority level must be in range \[1, 2\]"),
    ("priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 3 value: { max_queue_size: 2 } }",
     r"priority queue policy must have priority level in range \[1, 2\]"),
    ("default_priority_level: 1", "need 'priority_levels' > 0"),
])
def test_priority_settings_are_checked_as_triton_checks_them(batching, message):
    with pytest.raises(ServerError, match=message):
        parsed(SIMPLE + f"dynamic_batching {{ {batching} }}")
    parsed(SIMPLE + "dynamic_batching { priority_levels: 2 default_priority_level: 2 default_queue_policy { "
           "timeout_action: DELAY default_timeout_microseconds: 100 allow_timeout_override: true } "
           "priority_queue_policy { key: 1 value: { max_queue_size: 2 } } preserve_ordering: true }")


def queued(priority: int = 0, name: str = "") -> InferenceRequest:
    return InferenceRequest("m", id=name, parameters={"priority": priority})


def test_priority_queue_serves_levels_in_order_and_applies_each_levels_policy():
    from kiln.server.scheduling.queue_policy import DELAY, REJECT, PriorityQueue, QueueConfig
    config = QueueConfig.from_config(parsed(SIMPLE + """dynamic_batching { priority_levels: 3 default_priority_level: 2
        default_queue_policy { default_timeout_microseconds: 500 allow_timeout_override: true }
        priority_queue_policy { key: 1 value: { max_queue_size: 1 timeout_action: DELAY
                                                default_timeout_microseconds: 100 } } }"""))
    q = PriorityQueue(config)
    low, default, out_of_range = queued(3, name="low"), queued(name="default"), queued(9, name="nine")
    high = queued(1, name="high")
    assert q.push(low, 3) == 500 and q.push(default, 0) == 500 and q.push(out_of_range, 9) == 500
    assert q.push(high, 1) == 100  # level 1's own policy: no override allowed there
    with pytest.raises(ServerError, match=r"Exceeds maximum queue size \(1\).* at priority level 1"):
        q.push(queued(1), 1)
    assert [r.id for r in q] == ["high", "default", "nine", "low"] and len(q) == 4
    # DELAY: the expired request stays queued (and counts against its level's size), behind its level's
    # unexpired requests but before every lower level's; REJECT takes it out.
    assert q.expire(high) == DELAY and len(q) == 4
    with pytest.raises(ServerError, match="Exceeds maximum queue size"):
        q.push(queued(1), 1)
    assert q.expire(high) is None  # already delayed: expires once
    assert q.expire(default) == REJECT and len(q) == 3 and q.expire(default) is None
    assert [q.pop().id for _ in range(3)] == ["high", "nine", "low"] and len(q) == 0
    # Per-request timeouts: taken only where allowed and shorter than the default (0: no default limit).
    assert QueueConfig.from_config(parsed(SIMPLE + "dynamic_batching { }")).policy(0).timeout_us(300) == 0
    no_default = parsed(SIMPLE + "dynamic_batching { default_queue_policy { allow_timeout_override: true } }")
    assert QueueConfig.from_config(no_default).policy(0).timeout_us(300) == 300
    assert config.policy(2).timeout_us(900) == 500 and config.policy(2).timeout_us(300) == 300
    assert QueueConfig().policy(0).timeout_us(300) == 300  # no dynamic batcher: the request's own timeout


def test_a_full_queue_counts_what_a_free_worker_is_about_to_take():
    """Two requests that reach an idle one-at-a-time model in the same turn of the loop: one runs and one
    waits (max_queue_size 1), as when the worker had taken the first before the second came; the third is
    refused, and so is the next once the worker holds the first."""
    import asyncio

    from kiln.server.backends.base import InstanceSpec, ModelInstance
    from kiln.server.scheduling.queue_policy import QueueConfig
    from kiln.server.scheduling.scheduler import Scheduler
    from kiln.server.stats import ModelStats

    class Held(ModelInstance):
        def __init__(self):
            super().__init__(InstanceSpec("m_0", "cpu", None))
            self.go, self.ran = asyncio.Event(), []

        async def execute(self, requests):
            self.ran += [r.id for r in requests]
            await self.go.wait()
            for r in requests:
                r.respond({}, final=True)

    async def main():
        config = QueueConfig.from_config(parsed(SIMPLE + "dynamic_batching { default_queue_policy { "
                                                          "max_queue_size: 1 } }"))
        instance = Held()
        scheduler = Scheduler("m", [instance], None, ModelStats("m", 1), False, lambda r: None, config)
        scheduler.start()
        await asyncio.sleep(0)  # the worker waits for the first request
        scheduler.submit(queued(name="a"))
        scheduler.submit(queued(name="b"))  # a is still in the queue, but the free worker is about to take it
        with pytest.raises(ServerError, match="Exceeds maximum queue size"):
            scheduler.submit(queued(name="c"))
        await asyncio.sleep(0.01)
        assert instance.ran == ["a"]
        with pytest.raises(ServerError, match="Exceeds maximum queue size"):
            scheduler.submit(queued(name="d"))  # a runs, b waits: full
        instance.go.set()
        await asyncio.sleep(0.01)
        assert instance.ran == ["a", "b"]
        await scheduler.stop()

    asyncio.run(main())


def test_an_instance_takes_calls_ahead_but_a_request_with_a_wait_limit_stays_queued():
    """An instance with ``calls_ahead`` (a Python model's process) gets the next request while its call runs;
    a request whose wait has a limit (its ``timeout``) is not handed ahead: it stays queued, where it expires,
    and the requests behind it wait with it; once the instance has a call free it takes the head again."""
    import asyncio

    from kiln.server.backends.base import InstanceSpec, ModelInstance
    from kiln.server.scheduling.scheduler import Scheduler
    from kiln.server.stats import ModelStats

    class Pipelined(ModelInstance):
        calls_ahead = 1

        def __init__(self):
            super().__init__(InstanceSpec("m_0", "cpu", None))
            self.go, self.taken = {}, []

        async def execute(self, requests):
            (r,) = requests
            self.taken.append(r.id)
            self.go[r.id] = asyncio.Event()
            await self.go[r.id].wait()
            r.respond({}, final=True)

    async def main():
        loop = asyncio.get_running_loop()

        def request(name: str, timeout_us: int = 0) -> InferenceRequest:
            r = InferenceRequest("m", id=name, parameters={"timeout": timeout_us} if timeout_us else {})
            r.attach(loop)
            return r

        instance = Pipelined()
        scheduler = Scheduler("m", [instance], None, ModelStats("m", 1), False, lambda r: None)
        scheduler.start()
        await asyncio.sleep(0)
        scheduler.submit(request("a"))
        scheduler.submit(request("b"))
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b"]  # b handed ahead while a runs
        instance.go["a"].set()
        await asyncio.sleep(0.01)
        limited, after = request("limited", timeout_us=30_000), request("after")
        scheduler.submit(limited)
        scheduler.submit(after)
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b"]  # b runs; the limited head is not handed ahead, nor what waits behind
        await asyncio.sleep(0.05)
        reply = await limited.next_reply()
        assert reply.error is not None and "Request timeout expired" in reply.error.message
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b", "after"]  # the head gone, the next one goes ahead again
        second = request("second", timeout_us=1_000_000)
        scheduler.submit(second)
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b", "after"]  # b runs and after is ahead: second waits
        instance.go["b"].set()
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b", "after"]  # after runs now: still no call free for a limited head
        instance.go["after"].set()
        await asyncio.sleep(0.01)
        assert instance.taken == ["a", "b", "after", "second"]  # a call free: the limited head runs
        instance.go["second"].set()
        assert (await second.next_reply()).error is None
        await scheduler.stop()

        # The sequence batcher forms its batches from an instance's free slots: it hands nothing ahead.
        from kiln.server.scheduling.sequence_batcher import SequenceBatcher
        assert scheduler._worker_count(instance) == 2 and SequenceBatcher._worker_count(scheduler, instance) == 1

        # Two instances: nothing goes ahead to a busy one while the other has a call free.
        one, two = Pipelined(), Pipelined()
        scheduler = Scheduler("m", [one, two], None, ModelStats("m", 1), False, lambda r: None)
        scheduler.start()
        await asyncio.sleep(0)
        for name in ("x", "y", "z"):
            scheduler.submit(request(name))
            await asyncio.sleep(0.01)
        assert sorted(map(len, (one.taken, two.taken))) == [1, 2]  # x and y on one each, z ahead of one of them
        assert {one.taken[0], two.taken[0]} == {"x", "y"}
        for instance in (one, two):
            for event in instance.go.values():
                event.set()
        await asyncio.sleep(0.01)
        await scheduler.stop()

    asyncio.run(main())


def test_response_order_hands_the_turn_on_in_queue_order():
    import asyncio

    from kiln.server.scheduling.response_order import ResponseOrder

    async def main() -> list[int]:
        order, out = ResponseOrder(), []
        tickets = [order.take() for _ in range(3)]

        async def respond(ticket: int, delay: float) -> None:
            await asyncio.sleep(delay)
            await order.turn(ticket)
            out.append(ticket)
            order.finish(ticket)

        await asyncio.gather(respond(tickets[2], 0), respond(tickets[1], 0.01), respond(tickets[0], 0.02))
        late = order.take()
        order.finish(late)  # a request whose client left hands the turn on without responding
        await asyncio.wait_for(order.turn(order.take()), 1)
        return out

    assert asyncio.run(main()) == [0, 1, 2]
def test_reshape_with_variable_dims_checks_each_segment():
    ok = SIMPLE.replace("dims: [ 2, 2 ] reshape: { shape: [ 4 ] }", "dims: [ -1, 4 ] reshape: { shape: [ -1, 2, 2 ] }")
    parsed(ok)
    bad = SIMPLE.replace("dims: [ 2, 2 ] reshape: { shape: [ 4 ] }", "dims: [ -1, 4 ] reshape: { shape: [ 2, -1 ] }")
    with pytest.raises(ServerError, match="different size for dims"):
        parsed(bad)


def test_parse_errors_name_the_file():
    with pytest.raises(ServerError, match=r"failed to parse m/config.pbtxt: .*"):
        cfg.parse_text("name: 'm' max_batch_size: eight", "m/config.pbtxt")
    with pytest.raises(ServerError, match="model configuration JSON"):
        cfg.parse_json('{"max_batch_size": "x"')


@pytest.mark.parametrize("policy,available,expected", [
    ("", [1, 2, 3], [3]),
    ("version_policy { latest { num_versions: 2 } }", [1, 5, 3], [3, 5]),
    ("version_policy { all { } }", [2, 1], [1, 2]),
    ("version_policy { specific { versions: [ 1, 3, 9 ] } }", [1, 2, 3], [1, 3]),
])
def test_version_policies(policy, available, expected):
    assert cfg.versions_to_load(parsed(SIMPLE + policy), available) == expected


def test_version_policy_that_selects_nothing():
    with pytest.raises(ServerError, match="at least one version must be available.*version folders: none"):
        cfg.versions_to_load(parsed(), [])
    with pytest.raises(ServerError, match="at least one version"):
        cfg.versions_to_load(parsed(SIMPLE + "version_policy { specific { versions: [ 4 ] } }"), [1])


def test_version_folders(tmp_path):
    for name in ("1", "2", "010", "latest", "0"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file, not a folder")
    assert list(cfg.version_dirs(tmp_path)) == [0, 1, 2]


# -- data types -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(datatypes.BY_NAME))
def test_raw_round_trip_of_every_datatype(name):
    dtype = datatypes.BY_NAME[name]
    if name == "BYTES":
        array = np.array([b"", b"\x00\xff", "é".encode()] * 2, dtype=object).reshape(2, 3)
    elif name == "BOOL":
        array = np.array([[True, False, True], [False, False, True]])
    else:
        array = (np.arange(6) * 3 - 5).astype(np.float32).astype(dtype.numpy).reshape(2, 3)
    raw = datatypes.to_raw(array, dtype)
    assert len(raw) == datatypes.byte_size(array, dtype)
    back = datatypes.from_raw(dtype, [2, 3], raw, "input 'X'")
    assert back.dtype == dtype.numpy
    np.testing.assert_array_equal(back, array)


def test_bf16_is_ml_dtypes_bfloat16_on_the_wire():
    dtype = datatypes.BY_NAME["BF16"]
    raw = datatypes.to_raw(np.array([1.0, -2.0], dtype=ml_dtypes.bfloat16), dtype)
    assert raw == struct.pack("<HH", 0x3F80, 0xC000)
    back = datatypes.from_list(dtype, [2], [1.0, 0.1], "input 'X'")
    assert back.dtype == ml_dtypes.bfloat16 and float(back[1]) == pytest.approx(0.1, rel=1e-2)


def test_bytes_decoding_errors():
    dtype = datatypes.BY_NAME["BYTES"]
    with pytest.raises(ServerError, match="incomplete string length indicator for input 'X'"):
        datatypes.from_raw(dtype, [1], b"\x01\x00", "input 'X'")
    with pytest.raises(ServerError, match="element 0 says 9 bytes but only 2 remain"):
        datatypes.from_raw(dtype, [1], struct.pack("<I", 9) + b"ab", "input 'X'")
    with pytest.raises(ServerError, match="unexpected number of string elements 2 for input 'X', expecting 3"):
        datatypes.from_raw(dtype, [3], struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), "input 'X'")
    with pytest.raises(ServerError, match="not UTF-8 text; request it as binary data"):
        datatypes.to_list(np.array([b"\xff"], dtype=object), dtype, "output 'Y'")


@pytest.mark.parametrize("name,data,message", [
    ("INT8", [1, 300], "unable to parse the data of input 'X' as INT8"),
    ("BOOL", [1, 0], "not booleans"),
    ("FP32", [1.0, 2.0, 3.0], r"shape \[2\] needs 2, got 3"),
    ("BYTES", ["a", 5], "element 1 is int, not a string"),
    ("FP32", [[1.0], [2.0, 3.0]], "unable to parse"),
])
def test_list_data_errors(name, data, message):
    with pytest.raises(ServerError, match=message):
        datatypes.from_list(datatypes.BY_NAME[name], [2], data, "input 'X'")


def test_unknown_datatype():
    with pytest.raises(ServerError, match="invalid datatype 'FP8'"):
        datatypes.by_name("FP8")


# -- admission ------------------------------------------------------------------------------------------

def request(**inputs: Tensor) -> InferenceRequest:
    return InferenceRequest("m", inputs=list(inputs.values()))


def test_admission_decodes_reshapes_and_allows_optional_inputs():
    config = parsed()
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.arange(8, dtype=np.int32).reshape(2, 2, 2)
    r = request(A=Tensor("A", "FP32", [2, 3, 4], a.tobytes()),
                B=Tensor("B", "INT32", [2, 2, 2], b.reshape(-1).tolist()))
    Admission(config, SharedMemoryManager()).admit(r)
    assert r.batch_size == 2 and r.output_names == ["Y"]
    np.testing.assert_array_equal(r.input("A"), a)
    assert r.input("B").shape == (2, 4)  # the config's reshape
    only_a = request(A=Tensor("A", "FP32", [1, 5, 4], [0.0] * 20))
    Admission(config, SharedMemoryManager()).admit(only_a)
    assert only_a.input("B") is None


@pytest.mark.parametrize("tensors,message", [
    ([Tensor("B", "INT32", [1, 2, 2], [0] * 4)],
     r"expected number of inputs between 1 and 2 but got 1 inputs for model 'm'. Got input\(s\) \['B'\], but missing "
     r"required input\(s\) \['A'\]"),
    ([Tensor("A", "FP32", [1, 2, 4], [0.0] * 8), Tensor("B", "INT32", [3, 2, 2], [0] * 12)],
     "input 'B' batch size does not match other inputs for 'm'"),
    ([Tensor("A", "FP32", [1, -1, 4], [])], "All input dimensions should be specified for input 'A'"),
    ([Tensor("A", "FP32", [], [])], "input 'A' has no shape but model requires batch dimension for 'm'"),
    ([Tensor("A", "FP32", [1, 2, 4], b"\x00" * 12)],
     "input byte size mismatch for input 'A' for model 'm'. Expected 32, got 12"),
])
def test_admission_errors_name_the_input(tensors, message):
    with pytest.raises(ServerError, match=message) as e:
        Admission(parsed(), SharedMemoryManager()).admit(InferenceRequest("m", inputs=tensors))
    assert e.value.code == Code.INVALID_ARG


def test_duplicate_inputs_are_refused():
    with pytest.raises(ServerError, match="input 'A' already exists in request"):
        InferenceRequest("m", inputs=[Tensor("A", "FP32", [1], [1.0]), Tensor("A", "FP32", [1], [1.0])])


# -- dynamic batcher --------------------------------------------------------------------------------------

def test_batcher_sends_full_or_preferred_batches_at_once():
    policy = BatchPolicy(max_batch_size=8, preferred=(4, 8), max_queue_delay_ns=10**9)
    assert policy.plan([1, 1], blocked=False, oldest_wait_ns=0) == 0  # wait for more
    assert policy.plan([4, 4], blocked=False, oldest_wait_ns=0) == 2  # the largest preferred size, 8
    assert policy.plan([3, 3, 3], blocked=False, oldest_wait_ns=0) == 2  # the next one would not fit
    assert policy.plan([1, 2], blocked=True, oldest_wait_ns=0) == 2  # an incompatible request follows


def test_batcher_after_the_delay_prefers_a_preferred_size():
    policy = BatchPolicy(max_batch_size=8, preferred=(2, 4), max_queue_delay_ns=1000)
    assert policy.plan([1, 1, 1], blocked=False, oldest_wait_ns=1000) == 2  # 2 is preferred, 3 is not
    assert policy.plan([3], blocked=False, oldest_wait_ns=1000) == 1
    no_delay = BatchPolicy(max_batch_size=8, preferred=(8,), max_queue_delay_ns=0)
    assert no_delay.plan([1, 1, 1], blocked=False, oldest_wait_ns=0) == 3  # no delay: what is queued


def test_batch_policy_from_config():
    assert BatchPolicy.from_config(parsed()) is None
    policy = BatchPolicy.from_config(parsed(SIMPLE + "dynamic_batching { max_queue_delay_microseconds: 50 }"))
    assert policy == BatchPolicy(8, (8,), 50_000)


# -- wire formats ---------------------------------------------------------------------------------------

def test_proto_json_writes_64_bit_integers_as_numbers():
    config = parsed(SIMPLE + "version_policy { specific { versions: [ 1, 3 ] } }")
    data = to_json(config, defaults=True)
    assert data["input"][0]["dims"] == [-1, 4] and data["version_policy"]["specific"]["versions"] == [1, 3]
    assert data["input"][1]["reshape"]["shape"] == [4]
    stats = ModelStats("m", 1)
    stats.record_execution(2, ComputeTimes(1, 2, 3))
    stats.record_success(2, 10, 4, ComputeTimes(1, 2, 3))
    s = to_json(stats.proto(), defaults=True)
    assert s["inference_count"] == 2 and s["inference_stats"]["success"] == {"count": 1, "ns": 10}
    assert s["batch_stats"][0]["compute_infer"] == {"count": 1, "ns": 2} and s["version"] == "1"


def test_metrics_page_keeps_triton_counter_names():
    counter = CounterMetricFamily("nv_inference_count", "Number of inferences", labels=["model", "version"])
    counter.add_metric(['we"ird\\name', "1"], 3)
    histogram = HistogramMetricFamily("nv_inference_first_response_histogram_ms", "first", labels=["model"])
    histogram.add_metric(["m"], [("100.0", 1), ("+Inf", 2)], 150.0)
    page = render([counter, histogram]).decode()
    assert "# TYPE nv_inference_count counter\n" in page
    assert 'nv_inference_count{model="we\\"ird\\\\name",version="1"} 3.0' in page
    assert 'nv_inference_first_response_histogram_ms_bucket{model="m",le="+Inf"} 2.0' in page
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert families["nv_inference_count"].samples[0].labels["model"] == 'we"ird\\name'
    assert [s.value for s in families["nv_inference_first_response_histogram_ms"].samples][-2:] == [2.0, 150.0]


def test_an_unexpected_error_is_answered_and_logged_once(caplog):
    """A route's fault: 500 in the protocol's shape, one traceback in the log (not a second from uvicorn)."""
    import asyncio
    import logging

    from starlette.applications import Starlette
    from starlette.routing import Route

    from kiln.server.access import AccessPolicy
    from kiln.server.limits import Limits
    from kiln.server.protocols import kserve_http
    from kiln.server.protocols.http_edge import EdgeMiddleware

    async def broken(request):
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/x", broken)], exception_handlers={Exception: kserve_http._unexpected_error})
    sent: list[dict] = []

    async def call() -> None:  # one ASGI request, as uvicorn makes it; an exception here is what uvicorn logs
        scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x", "query_string": b"",
                 "headers": [(b"host", b"127.0.0.1")], "scheme": "http", "root_path": "", "http_version": "1.1"}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await EdgeMiddleware(app, Limits(), AccessPolicy())(scope, receive, send)

    with caplog.at_level(logging.INFO):
        asyncio.run(call())  # raises nothing: uvicorn has nothing left to log
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[0]["status"] == 500 and b"RuntimeError" in body
    assert b"a bug" not in body  # the details are the log's, not the client's
    assert sum(r.exc_info is not None for r in caplog.records) == 1


def test_shared_memory_opens_only_regular_files_of_its_folder(tmp_path):
    """Keys name files directly in the shm folder: no link, no path, no FIFO; reads and writes check the size."""
    from kiln.server.core import ShmRef

    (tmp_path / "real").write_bytes(b"0123456789abcdef")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")
    manager = SharedMemoryManager(max_regions=2, max_bytes=32, shm_dir=tmp_path)
    for key, words in (("/link", "symbolic link"), ("/fifo", "not a shared memory object"),
                       ("/../real", "POSIX shm key"), ("/a\0b", "POSIX shm key"), ("/missing", "No such file")):
        with pytest.raises(ServerError, match=words):
            manager.register("r", key, 0, 4)
    manager.register("r", "/real", 4, 8)
    assert manager.read(ShmRef("r", 4, 2), "input") == b"6789"
    manager.write(ShmRef("r", 4, 0), b"WXYZ", "output")
    assert (tmp_path / "real").read_bytes() == b"0123WXYZ89abcdef"
    with pytest.raises(ServerError, match="max-bytes"):
        manager.register("big", "/real", 0, 30)
    manager.register("r2", "/real", 0, 4)
    with pytest.raises(ServerError, match="max-regions"):
        manager.register("r3", "/real", 0, 4)
    os.truncate(tmp_path / "real", 6)
    with pytest.raises(ServerError, match="smaller than when it was registered"):
        manager.read(ShmRef("r", 4, 0), "input")
    with pytest.raises(ServerError, match="smaller than when it was registered"):
        manager.write(ShmRef("r", 4, 0), b"abcd", "output")
    assert (tmp_path / "real").stat().st_size == 6  # a write never grows the client's object
    manager.close()


def test_kiln_serve_writes_runtime_parameters_the_kiln_backend_reads(tmp_path):
    """`kiln serve --engine-core thread` reaches the engine's RuntimeConfig through the model's config.pbtxt."""
    from kiln.cli.serve import write_model_folder
    from kiln.server.backends.kiln.backend import _runtime_options

    write_model_folder(tmp_path, "m", tmp_path / "engine dir", {"engine_core": "thread"})
    params = cfg.parameters(cfg.read_config(tmp_path / "m"))
    assert params == {"engine_dir": str(tmp_path / "engine dir"), "engine_core": "thread"}
    assert _runtime_options(params, "m") == {"engine_core": "thread"}


def test_python_wire_ring_hands_large_buffers_over_in_shared_memory_and_reuses_what_is_released():
    """A Ring over one memfd, a writer and a reader (as the server and a model's process map it): buffers
    come out as arrays over the shared memory itself, 64-byte aligned; space is reused only once every older
    buffer's arrays are gone (whatever order they go in); a full ring refuses (the sender uses the socket);
    a buffer that does not fit before the end starts at the beginning. Through encode and the Decoder, large
    arrays ride the ring and small ones the stream."""
    import gc
    import os

    from kiln.server.backends.python.stub import kiln_python_wire as wire

    size = 1 << 20
    writer = wire.Ring.create(size)
    reader = wire.Ring(os.dup(writer.fd), size)
    writer.close_fd()
    reader.close_fd()
    chunk = np.arange(300_000 // 4, dtype=np.float32)  # 300,000 bytes: three fit
    raw = memoryview(chunk).cast("B")
    starts = [writer.put(raw) for _ in range(3)]
    assert starts == [0, 300_032, 600_064]  # each at a multiple of 64
    assert writer.put(raw) is None  # full until the reader lets go
    taken = [reader.take(start, raw.nbytes) for start in starts]
    views = [t.view(np.float32) for t in taken]
    assert all(np.array_equal(v, chunk) for v in views)
    views[0][0] = 7.0  # the reader's array is the shared memory itself (the writer's mapping sees it), writable
    assert bytes(writer._data[:4]) == np.float32(7.0).tobytes()
    del taken[1:], views[1:]  # the newer buffers go first: nothing before the oldest is reusable yet
    gc.collect()
    assert writer.put(raw) is None
    del taken[0], views[0]
    gc.collect()
    again = writer.put(raw)  # the end has no room left for it: from the beginning
    assert again == size and again % size == 0
    with pytest.raises(ValueError, match="does not lie in the ring"):
        reader.take(size - 8, 64)

    # Through the wire: a 2 MiB array in the ring (its frame on the stream is its position), a small one inline.
    messages = [{"op": "response", "key": i, "big": np.full(1 << 19, i, dtype=np.int32),
                 "small": np.arange(10, dtype=np.int64)} for i in range(3)]
    big_writer = wire.Ring.create(6 << 20)  # room for the three
    big_reader = wire.Ring(os.dup(big_writer.fd), 6 << 20)
    stream = b"".join(bytes(p) for m in messages for p in wire.encode(m, big_writer))
    assert len(stream) < 10_000  # the big arrays did not travel on the stream
    decoder = wire.Decoder(big_reader)
    window = decoder.buffer()
    window[:len(stream)] = stream
    got = decoder.filled(len(stream))
    for sent, received in zip(messages, got):
        assert np.array_equal(received["big"], sent["big"]) and np.array_equal(received["small"], sent["small"])
    assert wire.encode(messages[0], big_writer) and len(b"".join(bytes(p) for p in wire.encode(
        messages[0], big_writer))) > 1 << 21  # the ring is full (the decoded arrays still held): on the stream


def test_python_wire_carries_arrays_of_every_kind_and_reads_ahead():
    """Arrays travel as ``ndarray(shape, dtype, buffer)`` (small ones inside the pickle, large ones out of
    band): values, dtype and shape come back for every kind a model sends, writable where the sender's was
    (read-only stays so), C-ordered where it was not; ml_dtypes' bfloat16 and object arrays the numpy way.
    A blocking Connection reads what the socket holds at once, and hands what it read ahead to the reader
    that takes the socket over."""
    import socket

    import ml_dtypes

    from kiln.server.backends.python.stub import kiln_python_wire as wire

    base = np.arange(48, dtype=np.int32).reshape(3, 16)
    frozen = np.arange(5, dtype=np.float64)
    frozen.flags.writeable = False
    arrays = {"int32": base[:1], "bool": base % 3 == 0, "f16": base.astype(np.float16), "be": base.astype(">i4"),
              "bf16": base.astype(ml_dtypes.bfloat16), "bytes": np.array([b"ab", b""], dtype=object),
              "empty": np.zeros((0, 16), np.float32), "strided": base[:, ::2], "fortran": np.asfortranarray(base),
              "scalar": np.array(7, np.int64), "frozen": frozen, "large": np.arange(1 << 15, dtype=np.float32)}
    pieces = wire.encode({"op": "x", "a": {k: v for k, v in arrays.items() if k != "large"}})
    assert len(pieces) == 1  # no buffer out of band: one piece
    message = {"op": "x", "a": arrays}
    pieces = wire.encode(message)
    assert len(pieces) == 2 and memoryview(pieces[1]).nbytes == arrays["large"].nbytes  # the large one apart
    stream = b"".join(bytes(p) for p in pieces)
    decoder, decoded, pos = wire.Decoder(), [], 0
    while pos < len(stream):
        window = decoder.buffer()
        n = min(len(window), len(stream) - pos)
        window[:n] = stream[pos:pos + n]
        pos += n
        decoded += decoder.filled(n)
    (got,) = decoded
    for name, sent in arrays.items():
        back = got["a"][name]
        assert back.dtype == sent.dtype and back.shape == sent.shape, name
        assert np.array_equal(back, sent), name
        assert back.flags.writeable == (name != "frozen"), name
        assert back.flags.c_contiguous, name

    ours, theirs = socket.socketpair()
    sender, receiver = wire.Connection(ours), wire.Connection(theirs)
    try:
        for i in range(3):
            sender.send({"op": "n", "i": i, "a": base})
        assert receiver.recv()["i"] == 0
        decoder, pending = receiver.hand_over()  # the two read with the first one
        assert [m["i"] for m in pending] == [1, 2] and all(np.array_equal(m["a"], base) for m in pending)
        sender.send({"op": "n", "i": 3})
        assert receiver.recv()["i"] == 3  # what comes later is still read
    finally:
        sender.close()
        receiver.close()


def test_a_model_process_reads_its_own_commands_and_ends_when_the_server_goes_mid_call(tmp_path):
    """The model's process reads its commands in its main thread (queued ones first), and a watchdog ends it
    once the server's end of the socket closes, even in a long call while nobody reads the socket."""
    import time

    from kiln.server.backends.python.process import StubProcess

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text(
        "import time\nimport triton_python_backend_utils as pb_utils\n\n\n"
        "class TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        r = requests[0]\n"
        "        x = pb_utils.get_input_tensor_by_name(r, 'X').as_numpy()\n"
        "        time.sleep(float(x[0]))\n"
        "        return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', x * 2)])]\n")
    process = StubProcess("model 'm' instance 'm_0'", ring_bytes=0)
    try:
        init = {"op": "init", "name": "m", "version_dir": str(tmp_path / "1"), "model_file": "model.py",
                "decoupled": False, "args": {"model_config": "{}"}}
        assert process.request(init, "init_done")["error"] is None

        def execute(call: int, seconds: float) -> dict:
            return {"op": "execute", "call": call, "requests": [
                {"key": call, "id": "", "correlation_id": 0, "inputs": [("X", np.array([seconds], np.float32))],
                 "outputs": ["Y"], "parameters": "{}", "flags": 0}]}

        process.conn.send(execute(1, 0.0))
        process.conn.send(execute(2, 0.0))  # sent ahead: read after the first call, in order
        for call in (1, 2):
            done = process.conn.recv()
            assert done["op"] == "execute_done" and done["call"] == call and done["error"] is None
            assert done["responses"][0]["outputs"][0][1].tolist() == [0.0]
        process.conn.send(execute(3, 30.0))  # a long call, no reply awaited: nobody reads the socket
        time.sleep(0.3)
        process.conn.close()
        started = time.monotonic()
        process.proc.wait(10)
        assert time.monotonic() - started < 5
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def test_python_wire_decoder_reads_messages_however_the_bytes_are_cut():
    """The server reads a Python model's messages as the socket hands over bytes (asyncio's BufferedProtocol):
    any split of the stream, frames small and large (read into a buffer of their own), many messages per
    read, arrays writable as a model expects."""
    import random

    from kiln.server.backends.python.stub import kiln_python_wire as wire

    rng = random.Random(0)
    sizes = [0, 3, 16, 4000, 9000, 70_000, 300_000]
    messages = [{"op": "response", "key": i, "outputs": [("OUT", np.arange(rng.choice(sizes), dtype=np.int32)),
                                                         ("S", np.array([b"x" * i], dtype=object))]}
                for i in range(120)]
    stream = b"".join(b"".join(bytes(piece) for piece in wire.encode(m)) for m in messages)
    for _ in range(8):
        decoder, got, pos = wire.Decoder(), [], 0
        while pos < len(stream):
            window = decoder.buffer()
            n = min(len(window), rng.choice([1, 5, 64, 4096, 65536, 1 << 20]), len(stream) - pos)
            window[:n] = stream[pos:pos + n]
            pos += n
            got += decoder.filled(n)
        assert [m["key"] for m in got] == list(range(120))
        for sent, received in zip(messages, got):
            out, text = dict(received["outputs"])["OUT"], dict(received["outputs"])["S"]
            assert np.array_equal(out, dict(sent["outputs"])["OUT"]) and out.flags.writeable
            assert text[0] == b"x" * sent["key"]


def test_a_streaming_relay_joins_the_deltas_its_reader_has_not_read():
    """The kiln backend's streamed tensor responses: a reply read before the next output stays one delta; outputs
    that arrive while a reply waits unread join it (text, ids and logprobs in order, the context of the first),
    so a reader that falls behind gets one longer delta instead of one reply per token."""
    import asyncio
    from types import SimpleNamespace

    from kiln.runtime import SamplingParams
    from kiln.runtime.outputs import TokenLogprob
    from kiln.server.backends.kiln.backend import _TensorRelay
    from kiln.server.backends.kiln.tensors import Job, Jobs

    prompt = [11, 12, 13]

    async def run():
        request = InferenceRequest("m", id="r")
        request.attach(asyncio.get_running_loop())
        request.output_names = ["text_output", "output_ids", "sequence_length", "context_ids", "output_log_probs"]
        job = Job(0, prompt, SamplingParams(), exclude_input=True, return_log_probs=True, pad_id=0)
        relay = _TensorRelay(request, None, Jobs([job], stream=True), batched=True)
        ids: list[int] = []

        def step(token: int, finished: bool = False) -> None:
            ids.append(token)
            completion = SimpleNamespace(delta_text=f"<{token}>", delta_token_ids=[token], token_ids=list(ids),
                                         text="".join(f"<{t}>" for t in ids),
                                         delta_logprobs=[TokenLogprob(token, -0.5 * token, {})])
            relay.put(0, SimpleNamespace(error=None, finished=finished, prompt_token_ids=prompt,
                                         outputs=[completion], request_id="r-0"))

        step(5)
        first = await request.next_reply()
        step(6)
        step(7)
        step(8, finished=True)
        joined = await request.next_reply()
        assert not request._replies
        return first, joined

    first, joined = asyncio.run(run())
    assert not first.final and first.outputs["text_output"][0, 0] == b"<5>"
    assert joined.final and joined.outputs["text_output"][0, 0] == b"<6><7><8>"
    assert joined.outputs["output_ids"].tolist() == [[[6, 7, 8]]]
    assert joined.outputs["sequence_length"].tolist() == [[3]]
    assert joined.outputs["output_log_probs"].tolist() == [[[-3.0, -3.5, -4.0]]]
    assert joined.outputs["context_ids"][0, 0, -4:].tolist() == [11, 12, 13, 5]  # the tokens before the first


def test_amend_refuses_a_reply_already_read_or_one_that_ends_with_an_error():
    import asyncio

    async def run():
        request = InferenceRequest("m", id="r")
        request.attach(asyncio.get_running_loop())
        assert not request.amendable()  # nothing sent yet
        request.respond({"x": np.zeros(1)}, final=False)
        assert request.amendable()
        request.amend({"x": np.ones(1)}, final=False)
        assert (await request.next_reply()).outputs["x"].tolist() == [1.0]
        assert not request.amendable()  # read already
        with pytest.raises(RuntimeError, match="no unread reply"):
            request.amend({"x": np.ones(2)}, final=False)
        request.fail(ServerError.internal("gone"))
        assert not request.amendable()
        reply = await request.next_reply()
        assert reply.final and reply.error is not None

    asyncio.run(run())
