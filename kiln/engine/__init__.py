"""The engine format, shared by the builder and the runtime."""
from kiln.engine.format import (
    DTYPES, ENGINE_FILE, FORMAT_VERSION, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, BuildConfig,
    Engine, read_engine, weights_file, write_engine_json,
)
from kiln.engine.weights import (
    VERIFY_ENV, check_against_manifest, load_weights, manifest_of, tensor_checksum, verify_weights,
)

__all__ = [
    "DTYPES", "ENGINE_FILE", "FORMAT_VERSION", "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE",
    "TOKENIZER_FILES", "VERIFY_ENV", "BuildConfig", "Engine",
    "check_against_manifest", "load_weights", "manifest_of", "read_engine", "tensor_checksum", "verify_weights",
    "weights_file", "write_engine_json",
]
