"""Host values sent to the step's device: the same values as the plain calls, and on a GPU without waiting for
the work already queued there (the premise, a plain copy from pageable memory waiting, is checked beside it)."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import DEVICE
from kiln.runtime.to_device import moved_to, tensor_on


def test_values_arrive_as_the_plain_calls_give_them():
    device = torch.device(DEVICE)
    for values, dtype in (([3, 1, 4], torch.long), ([0.5, -2.0], torch.float32), ([], torch.long)):
        got = tensor_on(values, dtype, device)
        assert got.device.type == device.type and got.dtype == dtype and got.tolist() == values
    host = torch.arange(6).reshape(2, 3)
    for t in (host, host.T):  # strided too
        got = moved_to(t, device)
        assert got.device.type == device.type and torch.equal(got.cpu(), t)
    assert moved_to(got, device) is got or torch.equal(moved_to(got, device), got)


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU's stream is what the host must not wait for")
def test_the_host_does_not_wait_for_the_stream():
    torch.cuda.synchronize()
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1000 * 0.3)  # about 0.3 s of device time

    def host_seconds(send) -> float:
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        send()
        took = time.perf_counter() - start
        torch.cuda.synchronize()
        return took

    values = list(range(256))
    assert host_seconds(lambda: torch.tensor(values, device="cuda")) > 0.15  # the premise: pageable waits
    assert host_seconds(lambda: tensor_on(values, torch.long, "cuda")) < 0.05
    assert host_seconds(lambda: moved_to(torch.arange(256), "cuda")) < 0.05
