"""A user's plugin file, as the README shows it: tested against the op's reference, timed by the
builder among kiln's own implementations, carried by the engine and imported when it loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.builder import build
from kiln.engine import BuildConfig, read_engine
from kiln.errors import KilnError
from kiln.ops import get_op
from kiln.ops.user_plugins import load_plugin_file

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_ops.py"
# kiln's own CPU kernel of silu_and_mul, a candidate beside the user's where it compiled.
KILN_CPU_PLUGINS = {"cpu"} if get_op("silu_and_mul").impls["cpu"].supports(torch.device("cpu"), torch.float32) else set()


def test_the_example_plugin_matches_its_reference():
    load_plugin_file(EXAMPLE)
    op = get_op("silu_and_mul")
    x = torch.randn(7, 2 * 48)
    torch.testing.assert_close(op.impls["one_buffer"].fn(x.clone()), op.reference.fn(x.clone()))
    assert load_plugin_file(EXAMPLE) == load_plugin_file(EXAMPLE)  # imported once, registered once


def test_the_builder_times_it_and_the_engine_carries_it(hf_model_dir, tmp_path):
    out = build(hf_model_dir("llama"), tmp_path / "engine", BuildConfig(max_seq_len=128, max_batch_size=4,
                                                                         max_num_tokens=32),
                progress=False, tune=True, plugins=[EXAMPLE])
    engine = read_engine(out)
    assert engine.plugins == ["plugins/my_ops.py"] and (out / "plugins/my_ops.py").is_file()
    entry = engine.plan["silu_and_mul"]
    timed = {c["impl"] for c in entry["tuning"]["candidates"] if c["ms"] is not None}
    assert timed == {"reference", "one_buffer"} | KILN_CPU_PLUGINS
    assert entry["impl"] == min(entry["tuning"]["candidates"], key=lambda c: c["ms"] or 1e9)["impl"]
    # A fresh process imports the engine's copy of the plugin before binding the plan, and the plugin
    # gives the reference's tokens.
    engine_json = json.loads((out / "engine.json").read_text())
    engine_json["plan"]["silu_and_mul"] = {"impl": "one_buffer", "config": {}}
    (out / "engine.json").write_text(json.dumps(engine_json))
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING);"
            "from kiln import LLM, SamplingParams;"
            f"llm = LLM({str(out)!r});"
            "print(llm.engine.call(lambda c: c.runner.ops.choices['silu_and_mul']));"
            "print(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    choice, tokens = proc.stdout.strip().splitlines()[-2:]
    assert choice == "one_buffer" and "fall back" not in proc.stderr
    from kiln import LLM, SamplingParams

    engine_json["plan"]["silu_and_mul"] = {"impl": "reference", "config": {}}
    (out / "engine.json").write_text(json.dumps(engine_json))
    ref = LLM(out).generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert tokens == str(ref.token_ids)


def test_a_broken_plugin_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad_ops.py"
    bad.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(KilnError, match="bad_ops.py failed to import: RuntimeError: oops"):
        load_plugin_file(bad)
    with pytest.raises(KilnError, match="not a Python file"):
        load_plugin_file(tmp_path / "missing.py")


def test_a_plugin_loaded_for_one_build_stays_out_of_the_next(hf_model_dir, tmp_path):
    load_plugin_file(EXAMPLE)
    out = build(hf_model_dir("llama"), tmp_path / "engine", BuildConfig(max_seq_len=128), progress=False, tune=True)
    plan = read_engine(out).plan["silu_and_mul"]
    timed = {c["impl"] for c in plan.get("tuning", {}).get("candidates", [])}
    assert plan["impl"] != "one_buffer" and timed <= {"reference"} | KILN_CPU_PLUGINS
