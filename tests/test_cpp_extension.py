"""kiln's C++ extension builds (kiln/ops/cpp_extension.py): a build killed midway must not block the next."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from torch.utils import cpp_extension as torch_cpp_extension

from kiln.ops.cpp_extension import TORCH_LOCK, CppExtension, compile_flags


def _extension(folder: Path) -> CppExtension:
    (folder / "ops.cpp").write_text("// a source to hash\n")
    return CppExtension("kiln_test_ext", folder, ("ops.cpp",), (), "KILN_TEST_EXT_MARCH", lambda: "built",
                        "test extension")


def test_a_killed_builds_lock_file_does_not_block_the_next_build(tmp_path, monkeypatch):
    """torch's FileBaton ``lock`` left by a build that died is removed, under kiln's own flock, before torch
    builds: without that, torch's load waits for the file to go away forever."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    ext = _extension(tmp_path)
    key = ext._key(compile_flags("native"))
    build_dir = tmp_path / "cache" / "torch_extensions" / key
    build_dir.mkdir(parents=True)
    (build_dir / TORCH_LOCK).write_text("")  # what a killed build leaves
    seen = {}

    def fake_load(name, sources, build_directory, **kwargs):
        seen["stale lock present"] = (Path(build_directory) / TORCH_LOCK).exists()
        # Another process's turn would have to wait: kiln's flock is held while torch builds.
        fd = os.open(Path(build_directory) / "kiln-build.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    monkeypatch.setattr(torch_cpp_extension, "load", fake_load)
    assert ext.load() == "built"
    assert seen == {"stale lock present": False}
    # The turn is over: another builder gets it at once.
    fd = os.open(build_dir / "kiln-build.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
