"""``kiln bench perplexity`` on the tiny llama engine: exp of the mean NLL that transformers computes on the
same windows of the shipped text, the report and JSON, and its errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from kiln.bench.perplexity import DEFAULT_TEXT, windows
from kiln.cli.main import main
from kiln.engine import read_engine
from kiln.errors import KilnError
from kiln.runtime.tokenizer import EngineTokenizer
from conftest import DEVICE

COMMON = ["--device", DEVICE, "--kv-cache-memory", "0.05"]


def hf_nll(model, chunks: list[list[int]]) -> float:
    """Mean NLL over every window's tokens after its first, by transformers."""
    with torch.no_grad():
        logits = model(torch.tensor(chunks)).logits[:, :-1].float()
    targets = torch.tensor(chunks)[:, 1:]
    return float(-torch.log_softmax(logits, dim=-1).gather(2, targets[..., None]).mean())


def test_perplexity_is_exp_of_transformers_mean_nll(engine_dir, hf_model_dir, capsys, tmp_path):
    engine = engine_dir("llama")
    out = tmp_path / "ppl.json"
    assert main(["bench", "perplexity", str(engine), "--window", "128", "--max-num-tokens", "96", *COMMON,
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    ids = EngineTokenizer(read_engine(engine)).encode(DEFAULT_TEXT.read_text(), add_special_tokens=False)
    chunks = windows(ids, 128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir("llama"), dtype=torch.float32)
    r = doc["results"]
    assert doc["benchmark"] == "perplexity" and doc["settings"] == {"window": 128}
    assert doc["dataset"]["path"] == str(DEFAULT_TEXT) and doc["dataset"]["num_tokens"] == len(ids)
    assert r["num_windows"] == len(ids) // 128 == len(chunks) and r["num_scored_tokens"] == len(chunks) * 127
    assert r["nll"] == pytest.approx(hf_nll(hf, chunks), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
    assert len(r["window_nll"]) == len(chunks)
    assert r["window_nll"][1] == pytest.approx(hf_nll(hf, chunks[1:2]), rel=1e-5)
    assert "perplexity" in table and f"{r['perplexity']:.4f}" in table


def test_windows_leave_out_the_tail():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(KilnError, match="at least 2"):
        windows(list(range(10)), 1)
    with pytest.raises(KilnError, match="fewer than one window"):
        windows(list(range(10)), 11)


def test_errors_exit_1_with_a_message(engine_dir, capsys, tmp_path):
    engine = str(engine_dir("llama"))
    assert main(["bench", "perplexity", engine, "--window", "256", *COMMON]) == 1
    assert "max_seq_len=256" in capsys.readouterr().err
    assert main(["bench", "perplexity", engine, "--text", str(tmp_path / "missing.txt"), *COMMON]) == 1
    assert "cannot read the text" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["bench", "perplexity", engine, "--text", str(short), "--window", "64", *COMMON]) == 1
    assert "fewer than one window" in capsys.readouterr().err
