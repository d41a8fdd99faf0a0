"""The load-time choice of op implementations: timing, the robust pick, the per-machine cache, the runner's table."""
from __future__ import annotations

import json
import logging
import time

import pytest
import torch
import torch.nn.functional as F

from kiln.engine import read_engine
from kiln.errors import KilnError
from kiln.models import ModelConfig
from kiln.ops import REFERENCE, Implementation, Op, get_op
from kiln.ops import tuning
from kiln.ops.tuning import Tuner, WeightWorkload, _targets, candidates, most_robust
from kiln.runtime.tuned_plan import TUNING_ENV, load_op_table, weights_read

CPU = torch.device("cpu")
WORK = WeightWorkload(((48, 32), (32, 48), (48, 32)), rows=(1, 3))
MACHINE = {"device_type": "cpu", "name": "test CPU", "torch": torch.__version__, "threads": 2}


def burn(seconds: float) -> None:
    """Work the CPU for ``seconds`` of this thread's CPU time (one thread is timed by its CPU time)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def tuner(machine: dict, folder) -> Tuner:
    return Tuner(CPU, torch.float32, machine, folder, budget_s=0.05)


class FakeOp:
    """An op (never registered) whose reference is slow, with a fast plugin and one that cannot run here."""

    def __init__(self, slow_s: float = 0.002):
        self.calls = {"reference": 0, "quick": 0, "gpu_only": 0}

        def counted(name, fn):
            def call(x, w, **config):
                self.calls[name] += 1
                return fn(x, w, **config)
            return call

        def slow(x, w):
            burn(slow_s)
            return F.linear(x, w)

        def never(x, w):  # pragma: no cover - must never run on the CPU
            raise AssertionError("a plugin that does not support the device was run")

        self.op = Op("fake_linear", "a test op")
        for name, fn, supports in (("reference", slow, lambda d, t: True),
                                   ("quick", F.linear, lambda d, t: True),
                                   ("gpu_only", never, lambda d, t: d.type == "cuda")):
            self.op.impls[name] = Implementation("fake_linear", name, counted(name, fn), supports)

    def timed(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def always_stable(monkeypatch):
    # On a shared machine one preempted pass with two threads can read as a busy machine, which is
    # never cached; the cache logic is what is tested.
    monkeypatch.setattr(tuning, "COLLAPSE", 1e9)


def test_the_faster_candidate_wins_and_one_that_cannot_run_is_never_tried(tmp_path):
    fake = FakeOp()
    choice = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    assert choice.impl == "quick" and not choice.cached
    assert fake.calls["gpu_only"] == 0 and fake.calls["reference"] > 0 and fake.calls["quick"] > 0
    # Timed with one thread and with all, at each row count. (On a busy machine the multi-thread
    # conditions may stop early: their passes time the machine, not the candidates.)
    threads = torch.get_num_threads()
    alone = {"threads=1 rows=1", "threads=1 rows=3"} if threads > 1 else {"rows=1", "rows=3"}
    every = alone | {f"threads={threads} rows={r}" for r in (1, 3)}
    assert alone <= set(choice.seconds) <= every
    for cond in alone:
        assert choice.seconds[cond]["quick"] < choice.seconds[cond]["reference"]


def test_a_choice_is_cached_per_machine_and_work(tmp_path, always_stable):
    fake = FakeOp()
    first = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"] == MACHINE
    timed = fake.timed()

    again = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    assert again.cached and again.impl == first.impl and again.seconds == {}
    assert fake.timed() == timed  # a hit runs nothing

    other_shapes = WeightWorkload(((64, 32),), rows=(1,))
    assert not tuner(MACHINE, tmp_path).choose(fake.op, other_shapes).cached
    other_machine = dict(MACHINE, name="another CPU")
    assert not tuner(other_machine, tmp_path).choose(fake.op, WORK).cached
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert fake.timed() > timed


def test_a_choice_that_noise_decided_is_not_reused(tmp_path, always_stable):
    calls = {"flaky": 0}

    def flaky(x, w):  # one pass in three is fast: its best rounds win, its typical rounds lose
        calls["flaky"] += 1
        if (calls["flaky"] - 1) // len(WORK.weight_shapes) % 3:
            burn(0.003)
        return F.linear(x, w)

    def steady(x, w):
        burn(0.001)
        return F.linear(x, w)

    op = Op("fake_linear", "a test op")
    op.impls["reference"] = Implementation("fake_linear", "reference", steady, lambda d, t: True)
    op.impls["flaky"] = Implementation("fake_linear", "flaky", flaky, lambda d, t: True)
    every_round = Tuner(CPU, torch.float32, MACHINE, tmp_path, budget_s=10)
    first = every_round.choose(op, WORK)
    assert first.impl == "flaky" and not first.stable and "will be timed again" in first.describe()
    assert not tuner(MACHINE, tmp_path).choose(op, WORK).cached


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two threads")
def test_a_busy_machine_stops_multi_thread_timing_and_is_not_cached(tmp_path):
    calls = {"threads>1": 0}

    def fragile(x, w):  # with two threads, it waits for a busy core
        if torch.get_num_threads() > 1:
            calls["threads>1"] += 1
            time.sleep(0.02)
        return F.linear(x, w)

    def steady(x, w):
        burn(0.001)
        return F.linear(x, w)

    op = Op("fake_linear", "a test op")
    op.impls["reference"] = Implementation("fake_linear", "reference", steady, lambda d, t: True)
    op.impls["fragile"] = Implementation("fake_linear", "fragile", fragile, lambda d, t: True)
    choice = tuner(MACHINE, tmp_path).choose(op, WORK)
    # One slow multi-thread pass is enough to stop them all (none of fragile's, if another
    # candidate's pass with two threads found the machine busy first: this one may well be).
    assert calls["threads>1"] in (0, len(WORK.weight_shapes))
    assert not choice.stable and not list(tmp_path.glob("*.json"))
    # Judged on one thread, which is what the runtime uses on a busy machine: fragile is faster there.
    assert choice.impl == "fragile"


def test_a_cache_naming_a_candidate_that_cannot_run_here_is_ignored(tmp_path, always_stable, caplog):
    fake = FakeOp()
    first = tuner(MACHINE, tmp_path)
    first.choose(fake.op, WORK)
    doc = json.loads(first.cache_file.read_text())
    doc["choices"][0]["choice"] = "gpu_only"
    first.cache_file.write_text(json.dumps(doc))
    choice = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    assert not choice.cached and choice.impl == "quick"

    first.cache_file.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        choice = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    assert choice.impl == "quick" and "unreadable tuning cache" in caplog.text
    assert json.loads(first.cache_file.read_text())["choices"]  # rewritten whole


def test_only_candidate_is_taken_without_timing(tmp_path):
    fake = FakeOp()
    del fake.op.impls["quick"]
    choice = tuner(MACHINE, tmp_path).choose(fake.op, WORK)
    assert choice.impl == REFERENCE and choice.seconds == {} and fake.timed() == 0
    assert not list(tmp_path.glob("*.json"))


def test_the_robust_pick_never_takes_a_kernel_that_wins_only_on_an_idle_machine():
    # "fragile" is 10% faster with every core free and twice as slow on one thread.
    quiet = {"fragile": 0.9, "steady": 1.0}
    busy = {"fragile": 2.0, "steady": 1.0}
    assert most_robust([quiet, busy]) == "steady"
    assert most_robust([quiet]) == "fragile"
    # The plan's own choice stays unless clearly worse: noise alone never moves a plan.
    assert most_robust([quiet, busy], prefer="fragile") == "steady"
    assert most_robust([{"a": 1.0, "b": 1.05}], prefer="b") == "b"
    assert most_robust([{"a": 1.0, "b": 1.2}], prefer="b") == "a"
    # Ties on the worst ratio go to the smaller total, then to the first listed.
    assert most_robust([{"a": 1.0, "b": 1.0}]) == "a"
    # Per row count: the best thread count (a quiet machine) and one thread (a busy one).
    seconds = {(2, 1): {"x": 1.0, "y": 3.0}, (1, 1): {"x": 2.0, "y": 1.5}}
    assert _targets(seconds, (2, 1), (1,)) == [{"x": 1.0, "y": 1.5}, {"x": 2.0, "y": 1.5}]
    # A condition abandoned as collapsed may lack candidates.
    seconds = {(2, 1): {"x": 9.0}, (1, 1): {"x": 2.0, "y": 1.5}}
    assert _targets(seconds, (2, 1), (1,)) == [{"x": 2.0, "y": 1.5}, {"x": 2.0, "y": 1.5}]


def test_workload_needs_weights_and_rows():
    with pytest.raises(ValueError):
        WeightWorkload((), (1,))
    assert WORK.describe() == {"weights": [[48, 32, 2], [32, 48, 1]], "rows": [1, 3]}


# ----- the runner's table -----
def test_the_weights_each_op_reads_come_from_the_model(engine_dir):
    engine = read_engine(engine_dir("llama"))
    c = ModelConfig.from_dict(engine.model)
    weights = weights_read(engine)
    qkv = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size)
    assert weights["linear"][0] == qkv
    assert len(weights["linear"]) == 4 * c.num_layers
    assert weights["logits"] == [(c.vocab_size, c.hidden_size)]


def test_load_op_table_times_the_ops_with_a_choice(engine_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    engine = read_engine(engine_dir("llama"))
    table, choices = load_op_table(engine, CPU, torch.float32)
    expected = [name for name in ("linear", "logits") if len(candidates(get_op(name), CPU, torch.float32)) > 1]
    assert sorted(c.op for c in choices) == sorted(expected)
    for c in choices:
        assert table.choices[c.op] == c.impl
    # Ops without a workload keep the engine's plan.
    assert table.choices["paged_attention"] == engine.plan["paged_attention"]["impl"]
    # The engine's own record is untouched.
    assert read_engine(engine.path).plan == engine.plan

    monkeypatch.setenv(TUNING_ENV, "off")
    table, choices = load_op_table(engine, CPU, torch.float32)
    assert choices == [] and table.choices["linear"] == engine.plan["linear"]["impl"]
    monkeypatch.setenv(TUNING_ENV, "sometimes")
    with pytest.raises(KilnError, match="KILN_TUNING must be on or off"):
        load_op_table(engine, CPU, torch.float32)
