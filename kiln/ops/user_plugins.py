"""A user's own plugins: Python files that register implementations with ``kiln.ops.plugin``.

``kiln build --plugins FILE.py`` imports each file before the plan is chosen (so its plugins are
candidates like kiln's own) and copies it into the engine folder (``plugins/``), which names it in
engine.json; the runtime imports the engine's copies before binding its op table. So an engine
carries the kernels its plan names. A file is imported once per process, under a module name made
from its contents, so the same plugin file named twice (or by two engines) registers once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from kiln.errors import KilnError

PLUGIN_DIR = "plugins"
_MODULE_PREFIX = "kiln_user_plugin_"


def load_plugin_file(path: str | Path) -> str:
    """Import ``path`` (its plugins register themselves); return the module name it was given."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise KilnError(f"plugin {path} is not a Python file")
    source = path.read_bytes()
    name = f"{_MODULE_PREFIX}{path.stem}_{hashlib.sha256(source).hexdigest()[:12]}"
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise KilnError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from e
    return name


def load_engine_plugins(engine_dir: Path, files: list[str]) -> None:
    """Import the plugin files an engine carries (paths relative to its folder)."""
    for rel in files:
        path = engine_dir / rel
        if not path.is_file():
            raise KilnError(f"engine {engine_dir} names plugin {rel}, which it does not hold")
        load_plugin_file(path)


def belongs(impl, modules: set[str]) -> bool:
    """Whether a build that named the plugin modules ``modules`` may choose ``impl``: kiln's own
    implementations always; a user's only if its file was named for this build (plugins stay
    registered for the life of the process, and one build's must not leak into another's plan)."""
    module = getattr(impl.fn, "__module__", "") or ""
    return not module.startswith(_MODULE_PREFIX) or module in modules
