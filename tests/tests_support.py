"""Small helpers several test modules share."""
from __future__ import annotations


def block_bytes(engine) -> int:
    """Bytes of one KV block of the engine at ``engine`` (a path)."""
    from kiln.engine import read_engine
    from kiln.runtime.kv_pool import kv_cache_spec

    return kv_cache_spec(read_engine(engine)).bytes_per_block
