"""kiln convert / build / refit / inspect: the engine layout, checksums, refit and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.cli.main import main
from kiln.engine import read_engine, tensor_checksum
from kiln.runtime import LLM, SamplingParams


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name]


def test_engine_layout_and_checksums(engine_dir):
    path = engine_dir("llama")
    engine = read_engine(path)
    assert {p.name for p in path.iterdir()} == {"engine.json", "rank0.safetensors", "tokenizer.json",
                                                "tokenizer_config.json"}
    weights = load_file(str(path / "rank0.safetensors"))
    names = {m["name"] for m in engine.manifest}
    assert names == set(weights)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    for m in engine.manifest:
        assert m["sha256"] == tensor_checksum(weights[m["name"]])
    assert set(engine.plan) >= {"linear", "rms_norm", "add_rms_norm", "paged_attention", "rotary_and_write_kv_cache"}
    assert engine.target["torch"] == torch.__version__
    assert engine.tokenizer["eos_token_ids"] and engine.tokenizer["chat_template"]


def test_same_weights_converted_twice_give_same_checksums(hf_model_dir, tmp_path):
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(tmp_path / "a")]) == 0
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a/rank0.safetensors")), load_file(str(tmp_path / "b/rank0.safetensors"))
    assert {k: tensor_checksum(v) for k, v in a.items()} == {k: tensor_checksum(v) for k, v in b.items()}
    for src in ("a", "b"):
        assert main(["build", str(tmp_path / src), "-o", str(tmp_path / f"e{src}")]) == 0
    ma = read_engine(tmp_path / "ea").manifest
    assert ma == read_engine(tmp_path / "eb").manifest


def test_stripped_engine_refit_gives_same_outputs(hf_model_dir, engine_dir, tmp_path):
    ckpt, stripped = tmp_path / "ckpt", tmp_path / "stripped"
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(ckpt)]) == 0
    assert main(["build", str(ckpt), "-o", str(stripped), "--strip-weights", "--max-seq-len", "256", "--dtype", "float32"]) == 0
    assert not (stripped / "rank0.safetensors").exists()
    with pytest.raises(Exception, match="refit"):
        LLM(stripped)
    assert main(["refit", str(stripped), "--checkpoint", str(ckpt), "-o", str(tmp_path / "copy")]) == 0
    assert main(["refit", str(stripped), "--checkpoint", str(ckpt)]) == 0
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = LLM(engine_dir("llama")).generate(["Hello there", "def f(x):"], params)
    for path in (stripped, tmp_path / "copy"):
        refitted = LLM(path).generate(["Hello there", "def f(x):"], params)
        assert [o.token_ids for o in refitted] == [o.token_ids for o in full]
    assert read_engine(stripped).manifest == read_engine(engine_dir("llama")).manifest


def test_refit_with_wrong_shape_names_the_tensor_and_leaves_engine_untouched(hf_model_dir, tmp_path, capsys):
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(ckpt)]) == 0
    assert main(["build", str(ckpt), "-o", str(engine), "--max-seq-len", "256"]) == 0
    before = tree_digest(engine)
    weights = load_file(str(ckpt / "rank0.safetensors"))
    bad = "model.layers.1.mlp.down_proj.weight"
    weights[bad] = torch.zeros(weights[bad].shape[0], weights[bad].shape[1] + 1)
    save_file(weights, str(ckpt / "rank0.safetensors"))
    capsys.readouterr()
    assert main(["refit", str(engine), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj" in err and "shape" in err
    assert tree_digest(engine) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("problem", ["unknown architecture", "truncated safetensors", "missing tokenizer",
                                     "output exists"])
def test_bad_input_gives_clear_error_and_no_engine(problem, hf_model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama"), src)
    out = tmp_path / "engine"
    expected = {
        "unknown architecture": "unsupported architecture 'GPT2LMHeadModel'",
        "truncated safetensors": "truncated",
        "missing tokenizer": "no tokenizer.json",
        "output exists": "already exists",
    }[problem]
    if problem == "unknown architecture":
        config = json.loads((src / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        (src / "config.json").write_text(json.dumps(config))
    elif problem == "truncated safetensors":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    elif problem == "missing tokenizer":
        (src / "tokenizer.json").unlink()
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    code = main(["build", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert expected in err, err
    assert "Traceback" not in err
    if problem == "output exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_inspect_text_and_json(engine_dir):
    path = engine_dir("qwen2")
    proc = subprocess.run([sys.executable, "-m", "kiln.cli.main", "inspect", str(path)], capture_output=True,
                          text=True, check=True)
    text = proc.stdout
    for needle in ("Qwen2ForCausalLM", "QKV bias", "paged_attention", "reference", "max batch 256", "tokenizer",
                   "parameters", "tied embeddings"):
        assert needle in text, needle
    proc = subprocess.run([sys.executable, "-m", "kiln.cli.main", "inspect", str(path), "--json"],
                          capture_output=True, text=True, check=True)
    d = json.loads(proc.stdout)
    engine = read_engine(path)
    assert d["parameters"] == sum(torch.Size(m["shape"]).numel() for m in engine.manifest)
    assert d["architecture"] == "Qwen2ForCausalLM" and d["plan"] == engine.plan


def test_invalid_build_options_are_refused_early(hf_model_dir, tmp_path, capsys):
    code = main(["build", str(hf_model_dir("llama")), "-o", str(tmp_path / "e"), "--kv-block-size", "12"])
    assert code == 1 and "kv_block_size must be a power of two" in capsys.readouterr().err
    code = main(["build", str(hf_model_dir("llama")), "-o", str(tmp_path / "e"), "--max-seq-len", "100000"])
    assert code == 1 and "max_position_embeddings" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("problem", ["unsupported tensor type", "no tokenizer", "unknown architecture"])
def test_bad_gguf_gives_clear_error_and_no_engine(problem, tmp_path, capsys):
    from gguf import GGMLQuantizationType as Q

    from gguf_helpers import write_tiny_gguf

    src = tmp_path / "model.gguf"
    if problem == "unsupported tensor type":
        write_tiny_gguf(src, hidden=256, intermediate=256, types={"blk.0.attn_q.weight": Q.Q8_K})
        expected = "blk.0.attn_q.weight' has GGUF type Q8_K"
    elif problem == "no tokenizer":
        write_tiny_gguf(src, tokenizer=None)
        expected = "tokenizer"
    else:
        write_tiny_gguf(src, arch="gpt2")
        expected = "unsupported GGUF architecture 'gpt2'"
    capsys.readouterr()
    code = main(["build", str(src), "-o", str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "engine").exists() and leftovers(tmp_path) == []


def test_tiny_gguf_builds_and_runs(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from gguf_helpers import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.Q4_K, hidden=256, intermediate=256)
    assert main(["build", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "e"), "--max-seq-len", "128"]) == 0
    out = LLM(tmp_path / "e").generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_kiln_run_prints_a_completion_in_a_fresh_process(engine_dir):
    """`kiln run` as a user runs it: its own interpreter, nothing imported beforehand by the tests."""
    for extra in ([], ["--chat"]):
        proc = subprocess.run([sys.executable, "-m", "kiln.cli.main", "run", str(engine_dir("llama")), "--prompt",
                               "Hello there", "--max-tokens", "5", *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.endswith("\n")


def test_sharded_checkpoint_converts_like_a_single_file(hf_model_dir, tmp_path):
    import transformers

    src = hf_model_dir("qwen2")
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(src / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert main(["convert", str(src), "-o", str(tmp_path / "a")]) == 0
    assert main(["convert", str(sharded), "-o", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a/rank0.safetensors")), load_file(str(tmp_path / "b/rank0.safetensors"))
    assert {k: tensor_checksum(v) for k, v in a.items()} == {k: tensor_checksum(v) for k, v in b.items()}


def test_engine_planned_elsewhere_loads_with_one_warning(engine_dir, tmp_path, caplog):
    """Portability: a plan naming a kernel this device lacks falls back, with one warning, never an error."""
    import logging

    engine = tmp_path / "moved"
    shutil.copytree(engine_dir("llama"), engine)
    meta = json.loads((engine / "engine.json").read_text())
    meta["plan"]["silu_and_mul"] = {"impl": "some_gpu_kernel", "config": {}}
    meta["target"].update(device_type="cuda", name="NVIDIA H200", compute_capability="9.0", torch="2.11.0")
    (engine / "engine.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        out = LLM(engine, device="cpu").generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "silu_and_mul:some_gpu_kernel" in warnings[0] and "NVIDIA H200" in warnings[0]
