"""The model repository manager: model folders, their configs and versions, and model control.

A repository is a folder of model folders, each ``NAME/config.pbtxt`` (optional when the backend can
complete it) and numbered version folders, as in Triton. A model folder without version folders that a
backend recognizes as it is (a kiln engine folder) is served as version 1. Model control modes, as Triton's:

- ``none``: load every model at start; the load and unload APIs are refused.
- ``explicit``: load the ``--load-model`` names at start (``*``: all); load and unload on request.
- ``poll``: load every model at start, then rescan every ``poll_secs``: load new models, reload
  changed ones, unload removed ones; the load and unload APIs are refused.

A model whose config or load fails is reported in the index with the reason, and logged; the other
models keep serving. Reloading a model serves the new versions once they are loaded; a version that
fails to reload keeps its old copy serving. Unload waits for the requests in flight, then frees the
backend's memory.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.server import backends, memory
from kiln.server import config as cfg
from kiln.server.backends.base import Backend, ModelContext
from kiln.server.core import InferenceRequest, InferenceResponse
from kiln.server.ensemble import EnsembleBackend, step_models
from kiln.server.errors import ServerError, shown
from kiln.server.model import ServedModel
from kiln.server.scheduling.sequence_batcher import SequencePolicy
from kiln.server.shm import SharedMemoryManager
from kiln.server.trace import TraceSettings

log = logging.getLogger("kiln.server")

MODES = ("none", "poll", "explicit")
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    served: dict[int, ServedModel] = field(default_factory=dict)
    # The index's view: version -> (state, reason); version None is the model as a whole.
    states: dict[int | None, tuple[str, str]] = field(default_factory=dict)
    fingerprint: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The config of the last load that gave one (JSON): a later load that gives none keeps it, as Triton does.
    config_override: str | None = None
    # The model folder a load's files were written to (``load(files=...)``), used instead of the repository's.
    files_dir: Path | None = None


@dataclass
class LoadPlan:
    config: cfg.ModelConfig
    backend: type[Backend]
    versions: dict[int, Path]


class ModelRepository:
    def __init__(self, root: Path, mode: str, shm: SharedMemoryManager, startup_models: list[str] | None = None,
                 poll_secs: float = 15.0,
                 infer: Callable[[InferenceRequest], AsyncIterator[InferenceResponse]] | None = None,
                 cancel_grace: float = 10.0, trace: TraceSettings | None = None):
        if mode not in MODES:
            raise ServerError.invalid(f"model control mode '{mode}' is not one of {', '.join(MODES)}")
        if startup_models and mode != "explicit":
            raise ServerError.invalid("--load-model needs --model-control-mode=explicit")
        if not root.is_dir():
            raise ServerError.invalid(f"model repository {root} is not a folder")
        self.root = root
        self.mode = mode
        self.shm = shm
        self.startup_models = list(startup_models or [])
        self.poll_secs = poll_secs
        self.infer = infer  # the server's, handed to backends in ModelContext (BLS)
        self.cancel_grace = cancel_grace  # see limits.py
        self.trace = trace  # the trace extension's settings, which each model's requests consult
        self._entries: dict[str, ModelEntry] = {}
        self._resolving: set[str] = set()  # ensembles loading their steps' models (a cycle is refused)

    # -- reading -----------------------------------------------------------------------------------

    def names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def served(self) -> list[ServedModel]:
        return [m for e in self._entries.values() for _, m in sorted(e.served.items())]

    def is_loading(self, name: str) -> bool:
        """Whether a version of ``name`` is being loaded now."""
        entry = self._entries.get(name)
        return entry is not None and any(state == LOADING for state, _ in entry.states.values())

    def get(self, name: str, version: int = -1) -> ServedModel:
        """The ready model version (-1: the latest ready one)."""
        entry = self._entries.get(name)
        if entry is not None and not entry.served and any(s == UNLOADING for s, _ in entry.states.values()):
            raise ServerError.unavailable(f"model '{name}' is being unloaded")
        if entry is None or not entry.served:
            reason = entry.states.get(None, ("", ""))[1] if entry else ""
            if entry is not None and not reason:
                reason = "; ".join(f"version {v}: {r}" for v, (s, r) in entry.states.items() if v is not None and r)
            detail = f" ({reason})" if reason and reason != "unloaded" else ""
            raise ServerError.not_found(f"Request for unknown model: '{shown(name)}' is not found{detail}")
        if version == -1:
            return entry.served[max(entry.served)]
        if version not in entry.served:
            state = entry.states.get(version)
            if state is not None and state[0] != READY:
                raise ServerError.unavailable(f"'{name}' version {version} is not at ready state ({state[1]})")
            raise ServerError.not_found(f"Request for unknown model: '{shown(name)}' version {version} is not found")
        return entry.served[version]

    def versions(self, name: str) -> list[ServedModel]:
        entry = self._entries.get(name)
        return [m for _, m in sorted(entry.served.items())] if entry else []

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows, as Triton's repository index reports them."""
        rows = []
        for name in sorted(set(self.names_on_disk()) | set(self._entries)):
            entry = self._entries.get(name)
            if entry is None or not entry.states:
                if not ready_only:
                    rows.append((name, "", "", ""))
                continue
            model_first = sorted(entry.states.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
            for version, (state, reason) in model_first:
                if ready_only and state != READY:
                    continue
                rows.append((name, "" if version is None else str(version), state, reason))
        return rows

    # -- control -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.mode == "explicit":
            names = self.names_on_disk() if "*" in self.startup_models else self.startup_models
        else:
            names = self.names_on_disk()
        results = await asyncio.gather(*(self._load(n) for n in names), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ServerError):
                raise r

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """Load (or reload) ``name``. ``files`` (Triton's ``file:PATH`` parameters: path in the model folder ->
        content) come with a ``config_json`` and make the model's folder: they are written to a private
        temporary folder, which the model is loaded from instead of the repository's."""
        self._check_control()
        if files:
            if config_json is None:
                raise ServerError.invalid(f"failed to load '{shown(name)}': a load with files needs the model "
                                          "configuration too (parameter 'config')")
            check_name(name, "load")
            folder = await asyncio.to_thread(write_model_files, name, files)
            entry = self._entries.setdefault(name, ModelEntry(name))
            previous, entry.files_dir = entry.files_dir, folder
            try:
                await self._load(name, config_json)
            except BaseException:
                entry.files_dir = previous
                _remove_files(folder)
                raise
            _remove_files(previous)
            return
        await self._load(name, config_json)

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Unload ``name``; with ``dependents`` (Triton's ``unload_dependents``), an ensemble's step models too."""
        self._check_control()
        if name not in self._entries:
            self.model_dir(name, "unload")  # a model never loaded: fine if its folder is there, as in Triton
        steps = {s for m in self.versions(name) for s, _ in step_models(m.config)} if dependents else set()
        await self._unload(name)
        for step in sorted(steps - {name}):
            await self.unload(step, dependents)

    async def poll(self) -> None:
        """Rescan once: load new or changed models, unload removed ones."""
        on_disk = set(self.names_on_disk())
        for name in sorted(set(self._entries) - on_disk):
            if self._entries[name].served:
                await self._unload(name)
            self._entries.pop(name, None)
        for name in sorted(on_disk):
            entry = self._entries.get(name)
            fingerprint = await asyncio.to_thread(_fingerprint, self.root / name)
            if entry is None or entry.fingerprint != fingerprint:
                try:
                    await self._load(name)
                except ServerError:
                    pass  # logged and in the index

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_secs)
            try:
                await self.poll()
            except Exception:
                log.exception("repository poll failed")

    async def close(self) -> None:
        for name in list(self._entries):
            await self._unload(name)
            _remove_files(self._entries[name].files_dir)

    def _check_control(self) -> None:
        if self.mode == "poll":
            raise ServerError.unavailable("explicit model load / unload is not allowed if polling is enabled")
        if self.mode == "none":
            raise ServerError.unavailable(
                "explicit model load / unload is not allowed in model control mode 'none' "
                "(start the server with --model-control-mode=explicit)")

    def model_dir(self, name: str, action: str = "load") -> Path:
        """The folder of model ``name``: the one its last load's files were written to, else one folder directly
        in the repository, named by a name that is not a path (a link the operator placed there is the
        operator's, and is followed)."""
        failed = f"failed to {action} '{shown(name)}'"
        check_name(name, action)
        entry = self._entries.get(name)
        if entry is not None and entry.files_dir is not None:
            return entry.files_dir / name
        folder = self.root / name
        if not folder.is_dir():
            raise ServerError.invalid(f"{failed}: no model folder '{shown(name)}' in the model repository")
        return folder

    async def _load(self, name: str, config_json: str | None = None) -> None:
        try:
            model_dir = self.model_dir(name)
        except ServerError as e:
            log.error("%s", e.message)
            if name in self._entries and not self._entries[name].served:  # the folder went away
                self._entries[name].states = {None: (UNAVAILABLE, e.message)}
            raise
        entry = self._entries.setdefault(name, ModelEntry(name))
        async with entry.lock:
            if config_json is None:
                config_json = entry.config_override
            try:
                entry.fingerprint = await asyncio.to_thread(_fingerprint, model_dir)
                plan = await asyncio.to_thread(plan_load, name, model_dir, config_json)
                if plan.backend is EnsembleBackend:
                    await self._load_steps(name, plan.config)
            except ServerError as e:
                log.error("failed to load '%s': %s", name, e.message)
                if not entry.served:
                    entry.states = {None: (UNAVAILABLE, e.message)}
                raise ServerError.invalid(f"failed to load '{name}': {e.message}") from None

            old = dict(entry.served)
            for v in plan.versions:
                entry.states[v] = (LOADING, "")
            entry.states.pop(None, None)
            loaded = await asyncio.gather(*(self._load_version(name, model_dir, plan, v, d)
                                            for v, d in plan.versions.items()))
            failures = []
            new: dict[int, ServedModel] = {}
            for (v, model, reason) in loaded:
                if model is not None:
                    new[v] = model
                    entry.states[v] = (READY, "")
                elif v in old:
                    new[v] = old[v]  # a failed reload keeps the old copy serving
                    entry.states[v] = (READY, "")
                    failures.append(f"version {v} is at UNAVAILABLE state: {reason}")
                else:
                    entry.states[v] = (UNAVAILABLE, reason)
                    failures.append(f"version {v} is at UNAVAILABLE state: {reason}")
            entry.served = new
            if not failures:  # (a failed reload keeps the old copy serving, and the config it was loaded with)
                entry.config_override = config_json
            retired = [m for v, m in old.items() if new.get(v) is not m]
            old.clear()  # no reference may outlive the unload, or its memory would stay
            for v in list(entry.states):
                if v is not None and v not in plan.versions:
                    entry.states.pop(v)
            await self._retire(retired)
            if failures:
                raise ServerError.invalid(f"failed to load '{name}': " + "; ".join(failures))

    async def _load_steps(self, name: str, config: cfg.ModelConfig) -> None:
        """Load the models an ensemble's steps name that are not loaded yet (waiting for one that is loading)."""
        self._resolving.add(name)
        try:
            for step, _ in step_models(config):
                if step in self._resolving:
                    raise ServerError.invalid(f"ensemble '{name}' depends on '{step}', which depends on '{name}'")
                entry = self._entries.get(step)
                if entry is not None and entry.lock.locked():
                    async with entry.lock:
                        pass
                if not self.versions(step):
                    try:
                        await self._load(step)
                    except ServerError as e:
                        raise ServerError.invalid(f"its step model '{step}' did not load: {e.message}") from None
        finally:
            self._resolving.discard(name)

    def _config_of(self, name: str, version: int) -> cfg.ModelConfig:
        return self.get(name, version).config

    async def _load_version(self, name: str, model_dir: Path, plan: LoadPlan, version: int,
                            version_dir: Path) -> tuple[int, ServedModel | None, str]:
        context = ModelContext(name, version, plan.config, model_dir, version_dir, self.infer, self._config_of)
        try:
            model = await asyncio.to_thread(ServedModel.load, context, plan.backend, self.shm, self.cancel_grace)
            model.trace = self.trace
            try:
                await model.start()
            except BaseException:
                await model.unload()
                raise
        except Exception as e:
            reason = e.message if isinstance(e, ServerError) else f"{type(e).__name__}: {e}"
            log.error("failed to load '%s' version %d: %s", name, version, reason)
            return version, None, reason
        log.info("successfully loaded '%s' version %d (%s backend, %d instance%s, %.2f s)", name, version,
                 plan.config.backend, len(model.instances), "" if len(model.instances) == 1 else "s",
                 model.load_seconds)
        return version, model, ""

    async def _unload(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            return
        async with entry.lock:
            retired = list(entry.served.values())
            for v in entry.served:
                entry.states[v] = (UNLOADING, "")
            entry.served = {}
            await self._retire(retired)
            entry.states = {v: (UNAVAILABLE, "unloaded") for v in entry.states if v is not None} \
                or {None: (UNAVAILABLE, "unloaded")}

    async def _retire(self, models: list[ServedModel]) -> None:
        if not models:
            return
        await asyncio.gather(*(m.unload() for m in models))
        for m in models:
            log.info("successfully unloaded '%s' version %d", m.name, m.version)
        models.clear()
        await asyncio.to_thread(memory.release)


def plan_load(name: str, model_dir: Path, config_json: str | None = None) -> LoadPlan:
    """Read, complete, normalize and check the config, and pick the versions to load (blocking)."""
    config = cfg.parse_json(config_json) if config_json else cfg.read_config(model_dir)
    config = config if config is not None else cfg.ModelConfig()
    if config.name and config.name != name:
        raise ServerError.invalid(f"model configuration name '{config.name}' does not match the model folder '{name}'")
    config.name = name
    available = cfg.version_dirs(model_dir)
    if not available and backends.detect(model_dir, config.backend, config.platform) is not None:
        available = {1: model_dir}  # a folder a backend recognizes as it is (a kiln engine): version 1
    latest = available[max(available)] if available else None
    backend = backends.resolve(config.backend, config.platform, latest, name)
    config.backend = backend.name
    if config_json:  # a client's config names files only inside the model's folder
        params = cfg.parameters(config)
        for key in backend.path_parameters:
            if params.get(key):
                cfg.file_inside(model_dir, params[key], f"parameter '{key}'")
    # Complete from the latest version folder the policy selects (Triton completes from one version too).
    cfg.normalize(config)
    versions = cfg.versions_to_load(config, list(available))
    backend.complete_config(config, available[versions[-1]])
    cfg.normalize(config)
    cfg.resolve_instances(config, backend.gpus(), backend.default_cpu_instance_count)
    cfg.validate(config)
    if config.HasField("sequence_batching"):
        SequencePolicy.from_config(config, model_dir)  # checked here: the model's scheduler reads it at load
    return LoadPlan(config, backend, {v: available[v] for v in versions})


def _fingerprint(model_dir: Path) -> tuple:
    """What poll mode compares to see a model folder changed: every file's path, size and mtime."""
    out = []
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.append((os.path.relpath(p, model_dir), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file can have that name
        return False
    return True


def check_name(name: str, action: str) -> None:
    """A model name is a folder name: 1 to NAME_MAX characters, no '/', '\\' or NUL, not starting with '.'."""
    if (not name or len(name) > cfg.NAME_MAX or name.startswith(".") or any(c in name for c in "/\\\0")
            or not _encodable(name)):
        raise ServerError.invalid(f"failed to {action} '{shown(name)}': a model name is a folder name of the "
                                  f"repository (1 to {cfg.NAME_MAX} characters, no '/', '\\' or NUL, not starting "
                                  "with '.')")


MAX_LOAD_FILES = 1024


def write_model_files(name: str, files: dict[str, bytes]) -> Path:
    """A private temporary folder holding ``NAME/PATH`` for each file; a path must stay inside the model folder
    (relative, no '..', no empty or hidden part, no '\\' or NUL). Returns the folder that holds ``NAME``."""
    import shutil
    import tempfile

    if len(files) > MAX_LOAD_FILES:
        raise ServerError.invalid(f"failed to load '{shown(name)}': {len(files)} files, more than {MAX_LOAD_FILES}")
    base = Path(tempfile.mkdtemp(prefix="kiln-load-"))
    try:
        model = base / name
        model.mkdir()
        for path, data in files.items():
            parts = path.split("/")
            if (not path or path.startswith("/") or any(not p or p.startswith(".") for p in parts)
                    or "\\" in path or "\0" in path or not _encodable(path)):
                raise ServerError.invalid(f"failed to load '{shown(name)}': file path '{shown(path)}' must be "
                                          "relative to the model folder, with no empty, '.' or '..' part")
            target = model.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            except (FileExistsError, NotADirectoryError):  # "a" and "a/b": a path is both a file and a folder
                raise ServerError.invalid(f"failed to load '{shown(name)}': file path '{shown(path)}' clashes with "
                                          "another file's path") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base


def _remove_files(folder: Path | None) -> None:
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
