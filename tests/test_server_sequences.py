"""The sequence batcher (``sequence_batching``): stateful Python models keep their implicit state per correlation
id, with sequences interleaved, over HTTP and a gRPC stream; the controls in each form; ids as integers and
strings; a request that starts nothing is refused; an idle sequence is released after its timeout."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest
from server_harness import ServerProcess, write_config

tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

# OUTPUT: the running sum of INPUT over the sequence, kept in the implicit state (so that sequences interleave on
# one instance); CONTROLS: what START, END and READY said, as floats; CORR: the correlation id as a string.
ACCUMULATE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            get = lambda name: pb_utils.get_input_tensor_by_name(r, name).as_numpy()
            start = float(get("START").reshape(-1)[0])
            total = get("INPUT") + (0 if start else get("INPUT_STATE"))
            controls = np.array([start, float(get("END").reshape(-1)[0]), float(get("READY").reshape(-1)[0])],
                                dtype=np.float32).reshape(get("INPUT").shape[:-1] + (3,))
            corrid = get("CORRID").reshape(-1)[0]
            corrid = corrid.decode() if isinstance(corrid, bytes) else str(int(corrid))
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", total.astype(np.int32)),
                pb_utils.Tensor("OUTPUT_STATE", total.astype(np.int32)),
                pb_utils.Tensor("CONTROLS", controls),
                pb_utils.Tensor("CORR", np.array([corrid.encode()], dtype=object).reshape(
                    get("INPUT").shape[:-1] + (1,))),
            ]))
        return responses
'''

CONFIG = '''
backend: "python"
max_batch_size: %(batch)d
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] },
         { name: "CONTROLS" data_type: TYPE_FP32 dims: [ 3 ] },
         { name: "CORR" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
sequence_batching {
  max_sequence_idle_microseconds: 1000000
  %(strategy)s
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %(corrid)s } ] }
  ]
  state [ { input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zero" } } ]
}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequences")
    for name, batch, strategy, corrid in (("acc_direct", 4, "direct { }", "TYPE_UINT64"),
                                          ("acc_oldest", 0, "oldest { max_candidate_sequences: 4 }", "TYPE_STRING")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1/model.py").write_text(ACCUMULATE)
        write_config(root / name, CONFIG % {"batch": batch, "strategy": strategy, "corrid": corrid})
    s = ServerProcess(root, ready_timeout=120)
    yield s
    s.stop()


def one(module, value: int, batched: bool):
    i = module.InferInput("INPUT", [1, 1] if batched else [1], "INT32")
    i.set_data_from_numpy(np.array([[value]] if batched else [value], dtype=np.int32))
    return [i]


def test_interleaved_sequences_keep_their_state_over_http(server):
    client = httpclient.InferenceServerClient(server.http)

    def send(seq: int, value: int, start=False, end=False):
        result = client.infer("acc_direct", one(httpclient, value, True), sequence_id=seq, sequence_start=start,
                              sequence_end=end)
        return (int(result.as_numpy("OUTPUT").reshape(-1)[0]), result.as_numpy("CONTROLS").reshape(-1).tolist(),
                result.as_numpy("CORR").reshape(-1)[0].decode())

    assert send(1, 5, start=True) == (5, [1.0, 0.0, 1.0], "1")
    assert send(2, 100, start=True)[0] == 100
    assert send(1, 3) == (8, [0.0, 0.0, 1.0], "1")
    assert send(2, 1)[0] == 101
    assert send(1, 2, end=True) == (10, [0.0, 1.0, 1.0], "1")
    # Sequence 1 ended: a request that does not start it again is refused; one that does starts from zero.
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        send(1, 1)
    assert send(1, 7, start=True)[0] == 7
    assert send(2, 1, end=True)[0] == 102
    with pytest.raises(InferenceServerException, match="must specify a non-zero or non-empty correlation ID"):
        client.infer("acc_direct", one(httpclient, 1, True))
    with pytest.raises(InferenceServerException, match="must be an integer"):
        client.infer("acc_direct", one(httpclient, 1, True), sequence_id="text", sequence_start=True)
    send(1, 0, end=True)


def test_interleaved_string_sequences_over_a_grpc_stream(server):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sends = [("a", 1, True, False), ("b", 10, True, False), ("a", 2, False, False), ("b", 20, False, False),
                 ("a", 3, False, True), ("b", 30, False, True)]
        for seq, value, start, end in sends:
            client.async_stream_infer("acc_oldest", one(grpcclient, value, False), sequence_id=seq,
                                      sequence_start=start, sequence_end=end, request_id=f"{seq}{value}")
        got = {}
        for _ in sends:
            result, error = results.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = (int(result.as_numpy("OUTPUT")[0]),
                                             result.as_numpy("CORR")[0].decode())
        assert got == {"a1": (1, "a"), "b10": (10, "b"), "a2": (3, "a"), "b20": (30, "b"), "a3": (6, "a"),
                       "b30": (60, "b")}
    finally:
        client.stop_stream()
        client.close()


def test_an_idle_sequence_is_released_after_its_timeout(server):
    client = httpclient.InferenceServerClient(server.http)
    client.infer("acc_oldest", one(httpclient, 4, False), sequence_id="idle", sequence_start=True)
    assert int(client.infer("acc_oldest", one(httpclient, 1, False), sequence_id="idle").as_numpy("OUTPUT")[0]) == 5
    time.sleep(2.0)  # max_sequence_idle_microseconds: 1 s
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        client.infer("acc_oldest", one(httpclient, 1, False), sequence_id="idle")
    assert int(client.infer("acc_oldest", one(httpclient, 2, False), sequence_id="idle", sequence_start=True,
                            sequence_end=True).as_numpy("OUTPUT")[0]) == 2  # started again: from zero
