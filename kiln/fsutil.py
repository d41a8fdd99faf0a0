"""Writing output folders all at once: staged next to the target, renamed into place when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kiln.errors import KilnError


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, what: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``target`` only if the block finishes.

    On any error the staging folder is removed, so a failed run leaves nothing half-written.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise KilnError(f"{what} output {target} already exists; choose another path or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield stage
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(stage, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_file_atomically(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all; each writer stages its own file, so concurrent writers
    never mix their bytes (the last rename wins)."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
