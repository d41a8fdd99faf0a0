"""The engine cache: a model is built once, and a later start finds its engine without opening the source."""
from __future__ import annotations

import pytest

from kiln.builder import engine_cache
from kiln.engine import ENGINE_FILE


def test_a_cached_engine_is_found_without_reading_the_source(hf_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    source = hf_model_dir("llama")
    first = engine_cache.engine_for(source, progress=False, max_seq_len=64)
    assert (first / ENGINE_FILE).is_file()

    def no_reading(source):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(engine_cache, "_max_positions", no_reading)
    assert engine_cache.engine_for(source, progress=False, max_seq_len=64) == first
    # Other options are another engine (here the model's own limit is needed, so the source is read).
    with pytest.raises(AssertionError, match="read again"):
        engine_cache.engine_for(source, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    second = engine_cache.engine_for(source, progress=False, max_seq_len=128)
    assert second != first and (second / ENGINE_FILE).is_file()
    # An engine removed from the cache is built again, not looked for where it was.
    import shutil

    shutil.rmtree(first)
    assert (engine_cache.engine_for(source, progress=False, max_seq_len=64) / ENGINE_FILE).is_file()
