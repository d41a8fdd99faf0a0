"""What kiln reads is checked before it is used: weights against the engine's sha256 manifest,
engine.json / a checkpoint's config.json / a Hugging Face config.json against their schemas."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.cli.main import main
from kiln.engine import VERIFY_ENV, load_weights, read_engine, verify_weights
from kiln.errors import ConversionError, EngineError
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.model_runner import ModelRunner
from conftest import DEVICE

TENSOR = "model.layers.1.mlp.down_proj.weight"


def copy_engine(engine_dir, tmp_path: Path, name: str = "llama") -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(engine_dir(name), dst)
    return dst


def tensor_offset(weights: Path, name: str) -> tuple[int, int]:
    """Where ``name``'s bytes lie in a safetensors file (read from the format's own header)."""
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def flip_byte(weights: Path, name: str) -> None:
    start, end = tensor_offset(weights, name)
    data = bytearray(weights.read_bytes())
    data[(start + end) // 2] ^= 0x10
    weights.write_bytes(bytes(data))


def edit_json(file: Path, edit) -> None:
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


# --- Weights against the manifest -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_weights_gives_the_files_tensors(engine_dir, dtype):
    engine = read_engine(engine_dir("llama", dtype))
    got = load_weights(engine, "cpu")
    want = load_file(str(engine.weights_path))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert verify_weights(engine) == (len(want), sum(t.numel() * t.element_size() for t in want.values()))


def test_flipped_weight_byte_is_refused_at_load(engine_dir, tmp_path, monkeypatch):
    path = copy_engine(engine_dir, tmp_path)
    flip_byte(path / "rank0.safetensors", TENSOR)
    with pytest.raises(EngineError) as e:
        LLM(path, device=DEVICE)
    assert str(path / "rank0.safetensors") in str(e.value) and TENSOR in str(e.value) and "sha256" in str(e.value)
    # Verification off (the parameter, or the environment): the bytes load as they are.
    runner = ModelRunner(read_engine(path), torch.device("cpu"), verify_weights=False)
    assert runner.model is not None
    monkeypatch.setenv(VERIFY_ENV, "0")
    flipped = load_weights(read_engine(path))[TENSOR]
    assert not torch.equal(flipped, load_weights(read_engine(engine_dir("llama")))[TENSOR])
    monkeypatch.setenv(VERIFY_ENV, "maybe")
    with pytest.raises(EngineError, match=f"{VERIFY_ENV}='maybe'"):
        load_weights(read_engine(path))


@pytest.mark.parametrize("cut", ["in a tensor", "in the header", "to nothing"])
def test_truncated_weights_file_is_refused(engine_dir, tmp_path, cut):
    path = copy_engine(engine_dir, tmp_path)
    weights = path / "rank0.safetensors"
    data = weights.read_bytes()
    keep = {"in a tensor": tensor_offset(weights, TENSOR)[0] + 10, "in the header": 100, "to nothing": 0}[cut]
    weights.write_bytes(data[:keep])
    with pytest.raises(EngineError, match="truncated") as e:
        LLM(path, device=DEVICE)
    assert str(weights) in str(e.value)
    if cut == "in a tensor":
        assert TENSOR in str(e.value)


def test_weights_of_another_layout_are_refused(engine_dir, tmp_path):
    from safetensors.torch import save_file

    path = copy_engine(engine_dir, tmp_path)
    weights = load_file(str(path / "rank0.safetensors"))
    weights[TENSOR] = weights[TENSOR][:, :-1].contiguous()
    save_file(weights, str(path / "rank0.safetensors"))
    with pytest.raises(EngineError, match=rf"tensor '{TENSOR}' has shape .* the engine needs"):
        load_weights(read_engine(path))


def test_inspect_verify(engine_dir, tmp_path, capsys):
    path = copy_engine(engine_dir, tmp_path)
    assert main(["inspect", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified    all" in out and "match the manifest's sha256" in out
    assert main(["inspect", str(path), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_verified"]["tensors"] == len(read_engine(path).manifest)
    flip_byte(path / "rank0.safetensors", TENSOR)
    assert main(["inspect", str(path)]) == 0  # without --verify the weights are not read
    capsys.readouterr()
    assert main(["inspect", str(path), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verified" not in captured.out
    assert str(path / "rank0.safetensors") in captured.err and TENSOR in captured.err
    assert "Traceback" not in captured.err


# --- engine.json and a checkpoint's config.json -----------------------------------------------------------------

ENGINE_JSON_PROBLEMS = {
    "missing max_seq_len": (lambda m: m["build"].pop("max_seq_len"), "engine.json: build.max_seq_len is missing"),
    "mistyped num_layers": (lambda m: m["model"].update(num_layers="3"),
                            'engine.json: model.num_layers must be an integer, got "3"'),
    "boolean limit": (lambda m: m["build"].update(max_batch_size=True),
                      "build.max_batch_size must be an integer, got true"),
    "unknown build key": (lambda m: m["build"].update(max_sequence=512), "build.max_sequence is not a known key"),
    "manifest entry": (lambda m: m["weights"]["tensors"][2].pop("sha256"), "weights.tensors[2].sha256 is missing"),
    "plan entry": (lambda m: m["plan"]["linear"].update(impl=None), "plan.linear.impl must be a string, got null"),
    "section": (lambda m: m.update(tokenizer=[]), "tokenizer must be an object, got []"),
    "eos ids": (lambda m: m["tokenizer"].update(eos_token_ids=[2, "3"]),
                'tokenizer.eos_token_ids[1] must be an integer, got "3"'),
    "invalid limit": (lambda m: m["build"].update(kv_block_size=12), "kv_block_size must be a power of two"),
}


@pytest.mark.parametrize("problem", list(ENGINE_JSON_PROBLEMS))
def test_malformed_engine_json_is_refused_naming_the_key(problem, engine_dir, tmp_path, capsys):
    edit, expected = ENGINE_JSON_PROBLEMS[problem]
    path = copy_engine(engine_dir, tmp_path)
    edit_json(path / "engine.json", edit)
    with pytest.raises(EngineError) as e:
        read_engine(path)
    assert expected in str(e.value) and str(path / "engine.json") in str(e.value)
    with pytest.raises(EngineError) as e:
        LLM(path, device=DEVICE)
    assert expected in str(e.value)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_engine_without_max_seq_len_does_not_run_with_a_default(engine_dir, tmp_path):
    """An engine built for 256 tokens whose limit was lost must not take a 300-token prompt under BuildConfig's
    default of 2048: it is refused before it runs anything."""
    path = copy_engine(engine_dir, tmp_path)
    assert read_engine(path).build.max_seq_len == 256
    edit_json(path / "engine.json", lambda m: m["build"].pop("max_seq_len"))
    with pytest.raises(EngineError, match="build.max_seq_len is missing"):
        LLM(path, device=DEVICE).generate([[5] * 300], SamplingParams(max_tokens=1))


CHECKPOINT_PROBLEMS = {
    "mistyped num_layers": (lambda m: m["model"].update(num_layers="3"),
                            'config.json: model.num_layers must be an integer, got "3"'),
    "missing head_dim": (lambda m: m["model"].pop("head_dim"), "config.json: model.head_dim is missing"),
    "missing generation": (lambda m: m.pop("generation"), "config.json: generation is missing"),
    "version": (lambda m: m.update(kiln_checkpoint="1"), 'checkpoint format \'1\''),
}


@pytest.mark.parametrize("problem", list(CHECKPOINT_PROBLEMS))
def test_malformed_checkpoint_config_is_refused_naming_the_key(problem, hf_model_dir, tmp_path, capsys):
    edit, expected = CHECKPOINT_PROBLEMS[problem]
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(ckpt)]) == 0
    edit_json(ckpt / "config.json", edit)
    capsys.readouterr()
    assert main(["build", str(ckpt), "-o", str(tmp_path / "engine")]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(ckpt / "config.json") in err and "Traceback" not in err, err
    assert not (tmp_path / "engine").exists()


# --- A Hugging Face folder's config.json -----------------------------------------------------------------------

HF_CONFIG_PROBLEMS = {
    "not JSON": ("{\"architectures\": [\"LlamaForCausalLM\"],", "config.json is not valid JSON"),
    "not an object": ("[1, 2]", "config.json: the document must be an object, got [1, 2]"),
    "missing key": (lambda c: c.pop("num_attention_heads"), "config.json: num_attention_heads is missing"),
    "mistyped key": (lambda c: c.update(hidden_size="64"), 'config.json: hidden_size must be an integer, got "64"'),
    "zero heads": (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be at least 1, got 0"),
    "architectures": (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures must be a list"),
    "eos ids": (lambda c: c.update(eos_token_id=["2"]), "eos_token_id must be an integer or a list of integers"),
}


@pytest.mark.parametrize("verb", ["build", "convert"])
@pytest.mark.parametrize("problem", list(HF_CONFIG_PROBLEMS))
def test_invalid_hf_config_is_a_conversion_error_naming_file_and_key(problem, verb, hf_model_dir, tmp_path, capsys):
    change, expected = HF_CONFIG_PROBLEMS[problem]
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama"), src)
    if isinstance(change, str):
        (src / "config.json").write_text(change)
    else:
        edit_json(src / "config.json", change)
    capsys.readouterr()
    assert main([verb, str(src), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(src / "config.json") in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    from kiln.checkpoint.checkpoint import convert

    with pytest.raises(ConversionError):
        convert(src, tmp_path / "out2", progress=False)


def test_checkpoint_given_to_convert_is_named_as_one(hf_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(hf_model_dir("llama")), "-o", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "again")]) == 1
    assert "already a kiln checkpoint" in capsys.readouterr().err
