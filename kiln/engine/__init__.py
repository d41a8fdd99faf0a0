"""The engine format, shared by the builder and the runtime."""
from kiln.engine.format import (
    DTYPES, ENGINE_FILE, FORMAT_VERSION, BuildConfig, Engine, check_against_manifest, manifest_of, read_engine,
    tensor_checksum, weights_file, write_engine_json,
)

__all__ = [
    "DTYPES", "ENGINE_FILE", "FORMAT_VERSION", "BuildConfig", "Engine", "check_against_manifest", "manifest_of",
    "read_engine", "tensor_checksum", "weights_file", "write_engine_json",
]
