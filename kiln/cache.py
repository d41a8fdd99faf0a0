"""kiln's cache folder: engines built from sources, and the op choices timed on each machine.

``$KILN_CACHE`` when set, else ``~/.cache/kiln``. The builder's engine cache and the runtime's tuning
cache both live under it, so this rule has one owner that both can import.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
