"""Model configuration as Triton defines it: ``config.pbtxt`` read into Triton's own ``ModelConfig``
protobuf, checked, normalized, and the version folders a version policy selects.

Checks and defaults follow Triton's ``model_config_utils.cc``: every input and output needs a name,
a data type and dims (each >= 1 or -1), a reshape must hold as many elements as its dims, the version
policy defaults to ``latest { num_versions: 1 }``, each instance group gets a name, a kind and a count,
and the dynamic batcher's preferred batch size defaults to ``max_batch_size``.
"""
from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from kiln.server.errors import ServerError, shown

CONFIG_FILE = "config.pbtxt"
NAME_MAX = 255  # the longest file name Linux allows: longer model names and shm keys are refused
ModelConfig = mc.ModelConfig
WILDCARD = -1


def read_config(model_dir: Path) -> ModelConfig | None:
    """The model folder's ``config.pbtxt``, or None when it has none (a backend may complete one)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ServerError.invalid(f"cannot read {path}: {e}") from None
    return parse_text(text, str(path))


def parse_text(text: str, source: str = CONFIG_FILE) -> ModelConfig:
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as e:
        raise ServerError.invalid(f"failed to parse {source}: {e}") from None


def parse_json(text: str | bytes) -> ModelConfig:
    """A config given as JSON (the load API's override), as Triton reads it."""
    try:
        return json_format.Parse(text, ModelConfig())
    except RecursionError:
        raise ServerError.invalid("failed to parse the model configuration JSON: it is nested too deeply") from None
    except (json_format.ParseError, ValueError) as e:  # ValueError: json's errors, and Python's digit limit
        raise ServerError.invalid(f"failed to parse the model configuration JSON: {e}") from None


def file_inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays in ``folder`` (no ``..``, not absolute),
    else an error naming ``what``: a config names its files within its own model folder. (Links the
    operator placed in the repository are the operator's, and are followed.)"""
    parts = PurePosixPath(name).parts
    if not name or "\0" in name or name.startswith("/") or ".." in parts:
        raise ServerError.invalid(f"{what} '{shown(name)}' must name a file inside {folder.name}/ (a relative "
                                  "path, no '..')")
    return folder / name


def is_decoupled(config: ModelConfig) -> bool:
    return config.model_transaction_policy.decoupled


def parameters(config: ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Numbered version folders (Triton ignores other names and names with leading zeros)."""
    out = {}
    for p in model_dir.iterdir():
        if p.is_dir() and p.name.isdigit() and (p.name == "0" or not p.name.startswith("0")):
            out[int(p.name)] = p
    return dict(sorted(out.items()))


def versions_to_load(config: ModelConfig, available: list[int]) -> list[int]:
    """The versions the config's version policy selects from ``available``, ascending."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    have = sorted(available)
    if kind == "all":
        chosen = have
    elif kind == "specific":
        # As Triton: load the named versions that exist; fail only when none does.
        chosen = sorted(set(policy.specific.versions) & set(have))
    else:
        chosen = have[-max(policy.latest.num_versions, 1):] if have else []
    if not chosen:
        raise ServerError.invalid(
            f"at least one version must be available under the version policy of model '{config.name}' "
            f"(version folders: {have or 'none'})")
    return chosen


def normalize(config: ModelConfig) -> None:
    """Fill in Triton's defaults that do not depend on the backend (see :func:`resolve_instances`)."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.HasField("dynamic_batching") and not config.dynamic_batching.preferred_batch_size:
        if config.max_batch_size > 0:
            config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if not config.instance_group:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO)
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{i}"


def resolve_instances(config: ModelConfig, gpus: list[int], default_cpu_count: int) -> None:
    """Resolve each instance group's kind (AUTO: GPU when the backend has one), GPUs and count."""
    for group in config.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = mc.ModelInstanceGroup.KIND_GPU if gpus else mc.ModelInstanceGroup.KIND_CPU
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            if not gpus:
                raise ServerError.invalid(
                    f"instance group '{group.name}' of model '{config.name}' asks for KIND_GPU but the "
                    f"'{config.backend}' backend sees no GPU")
            missing = [g for g in group.gpus if g not in gpus]
            if missing:
                raise ServerError.invalid(
                    f"instance group '{group.name}' of model '{config.name}' names GPU(s) {missing}; "
                    f"available: {gpus}")
            if not group.gpus:
                group.gpus.extend(gpus)
        elif group.kind != mc.ModelInstanceGroup.KIND_CPU:
            raise ServerError.invalid(
                f"instance group '{group.name}' of model '{config.name}' has kind "
                f"{mc.ModelInstanceGroup.Kind.Name(group.kind)}; kiln runs KIND_CPU, KIND_GPU and KIND_AUTO")
        if group.count < 1:
            group.count = default_cpu_count if group.kind == mc.ModelInstanceGroup.KIND_CPU else 1


def validate(config: ModelConfig) -> None:
    """Reject what Triton rejects in a config; each message names the model and the field."""
    name = config.name
    if config.max_batch_size < 0:
        raise ServerError.invalid(f"'max_batch_size' of model '{name}' must be >= 0, got {config.max_batch_size}")
    for kind, ios in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for io in ios:
            _validate_io(io, config.max_batch_size, f"model '{name}', {kind} ")
            if io.name in seen:
                raise ServerError.invalid(f"model '{name}' has two {kind}s named '{io.name}'")
            seen.add(io.name)
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        for size in config.dynamic_batching.preferred_batch_size:
            if not 1 <= size <= config.max_batch_size:
                raise ServerError.invalid(
                    f"dynamic batching preferred size must be <= max batch size for '{name}' "
                    f"(got {size}, max_batch_size {config.max_batch_size})")
    _validate_priorities(config)
    if (config.platform == "ensemble") != config.HasField("ensemble_scheduling"):
        raise ServerError.invalid(f"ensemble scheduling must be set for ensemble '{name}' whose platform is "
                                  "ensemble" if config.platform == "ensemble" else
                                  f"ensemble scheduling cannot be set for model '{name}' whose platform is not "
                                  "ensemble")
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        raise ServerError.invalid(f"version policy of '{name}': 'latest' needs num_versions >= 1")


def _validate_priorities(config: ModelConfig) -> None:
    """Triton's checks of the dynamic batcher's priority settings (``scheduling/queue_policy.py`` serves them)."""
    if not config.HasField("dynamic_batching"):
        return
    batching, name = config.dynamic_batching, config.name
    levels = batching.priority_levels
    if levels:
        if not 1 <= batching.default_priority_level <= levels:
            raise ServerError.invalid(f"default priority level must be in range [1, {levels}] for '{name}'")
        for level in batching.priority_queue_policy:
            if not 1 <= level <= levels:
                raise ServerError.invalid(
                    f"priority queue policy must have priority level in range [1, {levels}] for '{name}'")
    elif batching.default_priority_level or batching.priority_queue_policy:
        raise ServerError.invalid(f"'default_priority_level' and 'priority_queue_policy' of model '{name}' need "
                                  "'priority_levels' > 0")


def _validate_io(io, max_batch_size: int, prefix: str) -> None:
    if not io.name:
        raise ServerError.invalid(prefix + "must specify 'name'")
    what = f"{prefix}'{io.name}' "
    if io.data_type == mc.TYPE_INVALID:
        raise ServerError.invalid(what + "must specify 'data_type'")
    if not io.dims:
        raise ServerError.invalid(what + "must specify 'dims'")
    if any(d < 1 and d != WILDCARD for d in io.dims):
        raise ServerError.invalid(
            what + f"dimension must be integer >= 1, or {WILDCARD} to indicate a variable-size dimension "
            f"(got {list(io.dims)})")
    if io.HasField("reshape"):
        shape = list(io.reshape.shape)
        if not shape and max_batch_size == 0:
            raise ServerError.invalid(
                what + "cannot have empty reshape for non-batching model as scalar tensors are not supported")
        if any(d < 1 and d != WILDCARD for d in shape):
            raise ServerError.invalid(what + f"reshape dimensions must be integer >= 1, or {WILDCARD}")
        if not (shape == [] and list(io.dims) == [1]) and _segments(list(io.dims)) != _segments(shape):
            raise ServerError.invalid(
                what + f"has different size for dims {list(io.dims)} and reshape {shape}")


def _segments(dims: list[int]) -> list[int]:
    """Element counts between variable dims: dims and reshape must agree on each (Triton's rule)."""
    out, run = [], []
    for d in dims:
        if d == WILDCARD:
            out.append(math.prod(run))
            run = []
        else:
            run.append(d)
    out.append(math.prod(run))
    return out
