"""``kiln bench throughput`` / ``kiln bench latency`` on the tiny llama engine: fields, counts, errors, baseline."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln.bench.dataset import load_jsonl
from kiln.bench.measure import percentile, summarize_ms
from kiln.bench.neighbours import busy_neighbours
from kiln.cli.main import main
from kiln.engine import read_engine
from kiln.errors import KilnError
from kiln.runtime.kv_pool import kv_cache_spec
from kiln.runtime.tokenizer import EngineTokenizer
from conftest import DEVICE

PCT_KEYS = ("p50", "p90", "p99", "mean", "min", "max")
# A small fixed KV pool: on a GPU the default (90% of its memory) is millions of blocks of the tiny
# model, which take the block manager seconds to set up in every test.
KV_GIB = 0.05
COMMON = ["--device", DEVICE, "--kv-cache-memory", str(KV_GIB)]


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a shared 2-core box a second OpenMP thread
    # that waits on a busy core makes every op tens of times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine(engine_dir):
    return engine_dir("llama")


def run_json(capsys, args: list[str], tmp_path) -> dict:
    out = tmp_path / "bench.json"
    assert main([*args, *COMMON, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "kiln bench" in table
    return json.loads(out.read_text())


def check_percentiles(s: dict, positive: bool = True) -> None:
    assert set(s) == set(PCT_KEYS)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["min"] <= s["mean"] <= s["max"]
    if positive:
        assert s["min"] > 0


def test_percentile_interpolates_like_numpy():
    v = [1.0, 2.0, 3.0, 4.0]
    assert percentile(v, 50) == 2.5
    assert percentile(v, 0) == 1.0 and percentile(v, 100) == 4.0
    assert summarize_ms([])["p50"] is None
    assert summarize_ms([0.001])["p99"] == pytest.approx(1.0)


def test_throughput_synthetic_reports_every_field(engine, capsys, tmp_path):
    doc = run_json(capsys, ["bench", "throughput", str(engine), "--input-len", "20", "--output-len", "6",
                            "--num-requests", "7", "--max-batch-size", "3", "--warmup", "1", "--seed", "3"], tmp_path)
    assert doc["benchmark"] == "throughput"
    assert doc["command"].startswith("kiln bench throughput ") and "--num-requests 7" in doc["command"]
    env = doc["environment"]
    assert env["dtype"] == "float32" and env["threads"] == 1 and env["torch"] == torch.__version__
    assert env["device"] == DEVICE and env["device_name"]
    assert doc["engine"]["path"] == str(engine.resolve()) and doc["engine"]["max_batch_size"] == 3
    assert doc["dataset"]["kind"] == "synthetic" and doc["dataset"]["seed"] == 3
    assert doc["dataset"]["num_requests"] == 7 and doc["dataset"]["input_len"]["max"] == 20
    assert doc["settings"] == {"request_rate": "inf", "warmup": 1, "seed": 3, "busy_neighbours": 0}
    # What ran: the plan as built, the implementations bound here, the steps' thread counts.
    assert set(doc["plan"]) == {"built", "ran", "chosen_at_load"}
    assert doc["plan"]["built"]["linear"] and doc["plan"]["ran"]["linear"]
    assert doc["threads"]["max_threads"] == 1
    assert doc["hf"] is None
    r = doc["results"]
    assert r["num_requests"] == 7
    assert r["total_input_tokens"] == 7 * 20 and r["total_output_tokens"] == 7 * 6
    assert r["duration_s"] > 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert r[key] > 0
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
    assert r["total_token_throughput"] > r["output_throughput"] > r["request_throughput"]
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        check_percentiles(r[key])
    assert r["ttft_ms"]["max"] <= r["e2e_latency_ms"]["max"]
    assert r["kv_blocks_total"] == int(KV_GIB * 2**30) // kv_cache_spec(read_engine(engine)).bytes_per_block
    # 20 + 6 tokens fit in 2 blocks of 16, and at most 3 requests run at once.
    assert 0 < r["kv_blocks_peak_used"] <= 3 * 2
    assert 0.0 <= r["prefix_cache_hit_rate"] <= 1.0
    assert r["num_preemptions"] == 0
    # Three at a time: 7 requests need at least 3 rounds of 6 tokens.
    assert r["num_steps"] >= 3 * 6
    # The steps' time per phase: every phase, none negative, together no more than the run took.
    host = r["host_ms_per_step"]
    assert list(host) == ["schedule", "prepare", "forward", "sample", "wait", "output"]
    assert all(v >= 0 for v in host.values()) and host["forward"] > 0 and host["schedule"] > 0
    assert sum(host.values()) * r["num_steps"] <= r["duration_s"] * 1e3


def test_throughput_with_the_core_in_a_process_of_its_own(engine, capsys, tmp_path):
    """--engine-core process, as kiln serve runs it: the same document, what ran and each step's phases read
    from the core's process (calls into it take only functions that pickle)."""
    doc = run_json(capsys, ["bench", "throughput", str(engine), "--input-len", "12", "--output-len", "4",
                            "--num-requests", "5", "--max-batch-size", "3", "--engine-core", "process"], tmp_path)
    assert "--engine-core process" in doc["command"]
    assert doc["plan"]["ran"]["linear"] and doc["threads"]["max_threads"] >= 1
    r = doc["results"]
    assert r["total_output_tokens"] == 5 * 4 and r["num_steps"] >= 2 * 4
    host = r["host_ms_per_step"]
    assert host["forward"] > 0 and host["schedule"] > 0


def test_throughput_dataset_with_text_and_ids_and_poisson_arrivals(engine, capsys, tmp_path):
    lines = [
        {"task_id": 0, "prompt": "The quick brown fox jumps", "output_tokens": 5},
        {"task_id": 1, "input_ids": [10, 11, 12, 13, 14, 15, 16, 17], "output_tokens": 3},
        {"prompt": "def add(a, b):", "output_tokens": 4, "extra": "ignored"},
    ]
    dataset = tmp_path / "requests.jsonl"
    dataset.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    doc = run_json(capsys, ["bench", "throughput", str(engine), "--dataset", str(dataset), "--request-rate", "200",
                            "--warmup", "0"], tmp_path)
    r = doc["results"]
    assert doc["dataset"]["kind"] == "file" and doc["dataset"]["path"] == str(dataset.resolve())
    assert doc["settings"]["request_rate"] == 200
    assert r["num_requests"] == 3 and r["total_output_tokens"] == 5 + 3 + 4
    tokenizer = EngineTokenizer(read_engine(engine))
    prompt_lens = [len(tokenizer.encode(lines[0]["prompt"])), 8, len(tokenizer.encode(lines[2]["prompt"]))]
    assert r["total_input_tokens"] == sum(prompt_lens)
    assert doc["dataset"]["input_len"]["max"] == max(prompt_lens)
    assert doc["dataset"]["output_len"] == {"min": 3, "mean": 4.0, "max": 5}
    check_percentiles(r["ttft_ms"])
    check_percentiles(r["e2e_latency_ms"])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "output_tokens": 4', "not valid JSON"),
    ('{"output_tokens": 4}', 'exactly one of "prompt"'),
    ('{"input_ids": [1, 99999], "output_tokens": 4}', "outside the vocabulary"),
    ('{"input_ids": [1, 2], "output_tokens": 0}', '"output_tokens" must be a positive integer'),
    ('{"prompt": "hi"}', '"output_tokens" is missing'),
])
def test_bad_dataset_line_exits_1_naming_the_line(engine, capsys, tmp_path, line, message):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "fine", "output_tokens": 2}\n\n' + line + "\n")
    assert main(["bench", "throughput", str(engine), "--dataset", str(dataset), *COMMON]) == 1
    err = capsys.readouterr().err
    assert f"{dataset}, line 3:" in err and message in err


def test_dataset_limit_and_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [1, 2, 3], "output_tokens": 2}) + "\n" for _ in range(5)))
    assert len(load_jsonl(path, lambda t: [1], 100, limit=2)) == 2
    path.write_text("\n\n")
    with pytest.raises(KilnError, match="has no requests"):
        load_jsonl(path, lambda t: [1], 100)


def test_throughput_refuses_requests_longer_than_the_engine(engine, capsys):
    assert main(["bench", "throughput", str(engine), "--input-len", "250", "--output-len", "10",
                 "--num-requests", "2", *COMMON]) == 1
    assert "max_seq_len=256" in capsys.readouterr().err


def test_latency_compare_hf_reports_both_decode_rates(engine, capsys, tmp_path):
    doc = run_json(capsys, ["bench", "latency", str(engine), "--input-len", "16", "--output-len", "8",
                            "--batch-size", "2", "--iterations", "3", "--warmup", "1", "--compare-hf"], tmp_path)
    r, hf = doc["results"], doc["hf"]
    assert doc["benchmark"] == "latency"
    assert (r["batch_size"], r["input_len"], r["output_len"], r["iterations"]) == (2, 16, 8, 3)
    check_percentiles(r["ttft_ms"])
    check_percentiles(r["tpot_ms"])
    assert len(r["decode_tokens_per_s_per_iteration"]) == 3
    assert all(x > 0 for x in r["decode_tokens_per_s_per_iteration"])
    assert r["decode_tokens_per_s"] == pytest.approx(sum(r["decode_tokens_per_s_per_iteration"]) / 3)
    # The steps' phases, and those of the decode steps alone (after every sequence had its first token).
    decode = r["host_ms_per_decode_step"]
    assert list(decode) == list(r["host_ms_per_step"]) == ["schedule", "prepare", "forward", "sample", "wait", "output"]
    assert all(v >= 0 for v in decode.values()) and decode["forward"] > 0
    assert hf["batch_size"] == 2 and hf["transformers"]
    assert hf["source"] == doc["engine"]["source"]
    assert hf["decode_tokens_per_s"] > 0 and hf["kiln_decode_tokens_per_s"] == r["decode_tokens_per_s"]
    assert hf["ratio"] == pytest.approx(r["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
    # Greedy on the same float32 weights: the very same tokens.
    assert hf["token_match"] == 1.0


def test_throughput_compare_hf_reports_output_rates(engine, capsys, tmp_path):
    doc = run_json(capsys, ["bench", "throughput", str(engine), "--input-len", "12", "--output-len", "5",
                            "--num-requests", "5", "--max-batch-size", "2", "--warmup", "0", "--compare-hf"],
                   tmp_path)
    hf = doc["hf"]
    assert hf["batch_size"] == 2 and hf["num_batches"] == 3
    assert hf["output_throughput"] > 0 and math.isfinite(hf["ratio"]) and hf["ratio"] > 0
    assert hf["token_match"] == 1.0


def test_compare_hf_without_the_source_fails_clearly(engine, capsys, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    meta = json.loads((copy / "engine.json").read_text())
    meta["source"] = {"path": str(tmp_path / "gone"), "original": None}
    (copy / "engine.json").write_text(json.dumps(meta))
    assert main(["bench", "latency", str(copy), "--input-len", "4", "--output-len", "2", "--compare-hf",
                 *COMMON]) == 1
    assert "--compare-hf needs the Hugging Face folder" in capsys.readouterr().err


def test_json_dash_keeps_stdout_for_the_json(engine, capsys):
    assert main(["bench", "latency", str(engine), "--input-len", "8", "--output-len", "3", "--iterations", "2",
                 "--warmup", "0", *COMMON, "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["results"]["iterations"] == 2 and doc["results"]["batch_size"] == 1
    assert "decode tokens/s" in captured.err


# ----- busy neighbours -----
def _state(pid: int) -> str | None:
    """A process's state letter (R, S, Z, ...) and None once it is gone; the state follows the last ')'."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _children() -> set[int]:
    """This process's live (not zombie) children."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def test_neighbours_run_during_the_block_and_are_gone_after():
    before = _children()
    with busy_neighbours(2) as procs:
        assert len(procs) == 2 and {p.pid for p in procs} <= _children()
        assert all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs) and _children() == before
    assert all(_state(p.pid) is None for p in procs)  # reaped, not left as zombies

    with pytest.raises(RuntimeError):
        with busy_neighbours(1) as procs:
            raise RuntimeError("the benchmark failed")
    assert procs[0].returncode is not None and _children() == before


def test_neighbours_exit_by_themselves_when_the_benchmark_is_killed_hard():
    code = ("import time; from kiln.bench.neighbours import busy_neighbours\n"
            "with busy_neighbours(1) as p:\n    print(p[0].pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        neighbour = int(parent.stdout.readline())
        assert _state(neighbour) in ("R", "S")
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _state(neighbour) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(neighbour) in (None, "Z")


def test_latency_with_busy_neighbours_records_them_and_stops_them(engine, capsys, tmp_path):
    before = _children()
    doc = run_json(capsys, ["bench", "latency", str(engine), "--input-len", "8", "--output-len", "4",
                            "--iterations", "2", "--warmup", "0", "--busy-neighbours", "1"], tmp_path)
    assert doc["settings"]["busy_neighbours"] == 1 and "--busy-neighbours 1" in doc["command"]
    assert _children() == before
    from kiln.bench.report import format_latency

    assert " busy neighbours  1 (Python processes" in format_latency(doc)


def test_negative_neighbours_fail_clearly(engine, capsys):
    assert main(["bench", "latency", str(engine), "--input-len", "4", "--output-len", "2",
                 "--busy-neighbours", "-1", *COMMON]) == 1
    assert "--busy-neighbours must be at least 0" in capsys.readouterr().err
