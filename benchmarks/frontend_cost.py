"""What the server's front end spends per streamed token: CPU seconds of `kiln serve`'s own process
(HTTP, SSE, JSON, detokenizing, the output processor) and of its engine core's process, each divided by
the output tokens `kiln bench serve` counted, beside the output tok/s.

The engine is a 2-layer, 64-wide random Llama with a real tokenizer (copied from TOKENIZER_DIR, a
Hugging Face folder such as the float32 SmolLM2 that `benchmarks/gguf_to_hf.py` writes), so that the
engine makes tokens fast and the front end's cost shows; TOKENIZER_DIR `tiny` takes the tests' 320-token
byte-level BPE instead, whose small output head lets the engine outrun the server. Nothing is fetched.

Usage: PYTHONPATH=. python benchmarks/frontend_cost.py TOKENIZER_DIR [--requests 256] [--input-len 64]
         [--output-len 64] [--route openai|triton] [--engine-core process|thread] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tiny_model(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if str(tokenizer_dir) == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from hf_models import make_tokenizer

        tokenizer_dir = out.parent / "tiny-tokenizer"
        make_tokenizer().save_pretrained(tokenizer_dir)
        (tokenizer_dir / "config.json").write_text(json.dumps({"vocab_size": 320}))
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tokenizer_dir", type=Path)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--route", choices=["openai", "triton"], default="openai")
    p.add_argument("--engine-core", choices=["process", "thread"], default="process")
    p.add_argument("--json", type=Path)
    p.add_argument("--work", type=Path, help="keep the model and engine in this folder and reuse them")
    p.add_argument("--py-spy", type=Path, metavar="OUT", help="also sample the server with py-spy (raw format)")
    args = p.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-frontend-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        env = {**os.environ, "KILN_CACHE": str(work / "cache")}
        model = work / "tiny-llama"
        if not (work / "engine" / "engine.json").exists():
            tiny_model(args.tokenizer_dir, model)
            subprocess.run(["kiln", "build", str(model), "-o", str(work / "engine")], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = open(work / "server.log", "w")
        server = subprocess.Popen(["kiln", "serve", str(work / "engine"), "--http-port", "0", "--grpc-port", "0",
                                   "--metrics-port", "0", "--engine-core", args.engine_core],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = _wait_for_http(work / "server.log", server)
            bench = ["kiln", "bench", "serve", "--url", url, "--input-len", str(args.input_len),
                     "--output-len", str(args.output_len), "--num-requests", str(args.requests),
                     "--tokenizer", str(model), "--no-progress", "--json", str(work / "served.json")]
            if args.route == "triton":
                bench += ["--backend", "triton-generate", "--model", "engine"]
            subprocess.run(bench + ["--num-requests", "4"], check=True, env=env, stdout=subprocess.DEVNULL)
            cores = children(server.pid)
            before = {pid: cpu_seconds(pid) for pid in [server.pid, *cores]}
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(args.py_spy),
                                        "-p", str(server.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            started = time.perf_counter()
            subprocess.run(bench, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=60)
            spent = {pid: cpu_seconds(pid) - t for pid, t in before.items()}
        finally:
            server.terminate()
            server.wait(timeout=60)
        served = json.loads((work / "served.json").read_text())
        results = served["results"]
        tokens = results["total_output_tokens"]
        front = spent[server.pid]
        core = sum(v for k, v in spent.items() if k != server.pid)
        row = {"route": args.route, "engine_core": args.engine_core, "requests": args.requests,
               "output_tokens": tokens, "output_tok_s": results.get("output_throughput"), "wall_s": round(wall, 2),
               "server_cpu_s": round(front, 3), "core_cpu_s": round(core, 3),
               "server_us_per_token": round(1e6 * front / tokens, 1),
               "core_us_per_token": round(1e6 * core / tokens, 1) if cores else None}
        print(json.dumps(row, indent=1))
        if args.json:
            args.json.write_text(json.dumps(row, indent=1) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _wait_for_http(log: Path, server: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        text = log.read_text()
        port = re.search(r"Started HTTPService at (\S+)", text)
        if port and "models:" in text:
            return f"http://{port.group(1)}"
        time.sleep(0.5)
    sys.exit("the server did not start in time")


if __name__ == "__main__":
    main()
