"""``kiln deploy SOURCE --repo DIR``: a ready Triton model repository for one LLM, in the shape of TensorRT-LLM's
Triton models, that ``kiln serve --model-repository DIR`` (or a Triton server with the kiln backend's models
swapped for its own) serves as it is:

- ``preprocessing``: text -> token ids, with the engine's own tokenizer (a copy of its ``tokenizer.json``);
- ``NAME`` (default ``kiln``): the kiln engine (its files in ``NAME/1/``, hard links where the file system allows),
  decoupled, reading token ids or text;
- ``postprocessing``: token ids -> text; a streamed response keeps its spaces (the kiln model's ``context_ids``);
- ``ensemble``: text in, text out through the three (``text_input``, ``max_tokens``, ``stream`` and the sampling
  inputs -> ``text_output``, ``cum_log_probs``, ``output_log_probs``, ``batch_index``);
- ``BLS_NAME`` (default ``kiln_bls``): the same pipeline written as one Python model, to change as code.

Each ``config.pbtxt`` comes from a TensorRT-LLM-style template (``templates/``) filled by ``fill_template``, which
refuses an unknown key and a placeholder left unfilled, and every config is loaded (read, completed and checked as
the server does, and the ensemble's steps against their models) before the repository appears: it is written to
a hidden folder beside ``DIR`` and its model folders are moved in at the end, so a failed deploy leaves nothing.
SOURCE is an engine, or a Hugging Face folder or GGUF file (built on the way, into kiln's engine cache).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kiln.deploy.fill_template import fill
from kiln.errors import KilnError

TEMPLATES = "kiln.deploy.templates"
PREPROCESSING, POSTPROCESSING, ENSEMBLE = "preprocessing", "postprocessing", "ensemble"
TOKENIZER_DIR = "1/tokenizer"  # a Python model's copy of the engine's tokenizer, inside its folder


@dataclass(frozen=True)
class DeployOptions:
    name: str = "kiln"  # the kiln model's name
    bls_name: str = "kiln_bls"
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    bls_instances: int = 4  # each serves one request at a time (its execute blocks on the calls it makes)
    instance_kind: str = "KIND_AUTO"  # the kiln model's: a GPU where there is one


def deploy(source: str | os.PathLike | None, repo: Path, options: DeployOptions = DeployOptions(),
           **build: object) -> list[str]:
    """Write the repository (see the module's docstring); the names of the models written. ``build`` are
    ``engine_for``'s options, used when SOURCE must be built."""
    from kiln.builder.engine_cache import engine_for
    from kiln.engine import read_engine

    names = [PREPROCESSING, options.name, POSTPROCESSING, ENSEMBLE, options.bls_name]
    if len(set(names)) != len(names):
        raise KilnError(f"the model names must differ: {', '.join(names)}")
    for name in names:
        _check_name(name)
    repo = Path(repo)
    clashes = [n for n in names if (repo / n).exists()]
    if clashes:
        raise KilnError(f"{repo} already has {', '.join(clashes)}; deploy into a new folder or remove them")
    engine_dir = engine_for(source, **build)
    engine = read_engine(engine_dir, need_weights=False)
    facts = engine.tokenizer
    values = {
        "triton_max_batch_size": str(engine.build.max_batch_size),
        "llm_model_name": options.name,
        "bls_model_name": options.bls_name,
        "tokenizer_dir": TOKENIZER_DIR,
        "add_bos_token": "true" if facts.get("add_bos_token") and facts.get("bos_token_id") is not None else "false",
        "bos_token_id": str(facts.get("bos_token_id") if facts.get("bos_token_id") is not None else -1),
        "skip_special_tokens": "true",
        "preprocessing_instance_count": str(options.preprocessing_instances),
        "postprocessing_instance_count": str(options.postprocessing_instances),
        "bls_instance_count": str(options.bls_instances),
        "llm_instance_kind": options.instance_kind,
        "llm_parameters": _llm_parameters(source),
    }
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.deploy-", dir=repo.parent))
    try:
        _write_python_model(staging / PREPROCESSING, "preprocessing", values, engine_dir)
        _write_python_model(staging / POSTPROCESSING, "postprocessing", values, engine_dir)
        _write_python_model(staging / options.bls_name, "bls", values, None)
        _write_config(staging / options.name, "llm", values)
        shutil.copytree(engine_dir, staging / options.name / "1", copy_function=_link_or_copy)
        _write_config(staging / ENSEMBLE, "ensemble", values)
        (staging / ENSEMBLE / "1").mkdir()
        check_repository(staging, names)
        repo.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staging / name, repo / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def check_repository(root: Path, names: list[str]) -> None:
    """Load every model's config as the server does (read, complete, normalize, check), and check each ensemble's
    steps against the configs of the models they name; a KilnError naming the model and the problem."""
    from kiln.server import repository
    from kiln.server.ensemble import EnsembleBackend
    from kiln.server.errors import ServerError

    plans = {}
    for name in names:
        try:
            plans[name] = repository.plan_load(name, root / name)
        except ServerError as e:
            raise KilnError(f"the generated model '{name}' does not load: {e.message}") from None
    for name, plan in plans.items():
        if plan.backend is EnsembleBackend:
            def lookup(model: str, version: int):
                if model not in plans:
                    raise ServerError.not_found(f"model '{model}' is not in the repository")
                return plans[model].config
            try:
                EnsembleBackend.check(plan.config, lookup)
            except ServerError as e:
                raise KilnError(f"the generated ensemble '{name}' does not load: {e.message}") from None


def _llm_parameters(source) -> str:
    """The kiln model's parameters: the default model samples as its model card says (its GGUF file carries no
    generation config), as ``kiln serve`` does."""
    if source is not None:
        return ""
    import json

    from kiln.builder.engine_cache import DEFAULT_MODEL_SAMPLING

    value = json.dumps(json.dumps(DEFAULT_MODEL_SAMPLING))
    return f'parameters {{ key: "override_generation_config" value: {{ string_value: {value} }} }}'


def _template(name: str) -> str:
    return resources.files(TEMPLATES).joinpath(name).read_text()


def _write_config(folder: Path, template: str, values: dict[str, str]) -> None:
    text = _template(f"{template}.pbtxt")
    used = {k: v for k, v in values.items() if "${" + k + "}" in text}
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(fill(text, used, f"template {template}.pbtxt"))


def _write_python_model(folder: Path, template: str, values: dict[str, str], engine_dir: Path | None) -> None:
    _write_config(folder, template, values)
    version = folder / "1"
    version.mkdir()
    (version / "model.py").write_text(_template(f"{template}.py"))
    if engine_dir is not None:
        tokenizer = folder / TOKENIZER_DIR
        tokenizer.mkdir(parents=True)
        _link_or_copy(engine_dir / "tokenizer.json", tokenizer / "tokenizer.json")


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link (engines are large, and never changed in place), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 255:
        raise KilnError(f"model name {name!r} must be a folder name (no '/', '\\' or NUL, not starting with '.')")
