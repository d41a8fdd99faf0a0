"""``kiln serve``: one model (an engine, a Hugging Face folder, a GGUF file, or by default the bundled
SmolLM2-135M-Instruct, built once into the engine cache), or a Triton model repository, served over
KServe v2 (HTTP, gRPC) and OpenAI's API from one process.

A model is served from a model repository of its own, made for the run in a temporary folder: one
model folder named for the served name, whose ``config.pbtxt`` gives the kiln backend the engine's
path. So the model is in the KServe repository view under that name too, and both protocols reach
the same engine. Once ready, the addresses and a ready-to-paste ``curl`` command are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from kiln.errors import KilnError
from kiln.server.access import GROUPS
from kiln.server.limits import Limits

API_KEY_ENV = "KILN_API_KEY"
# GGUF file names end in their tensor type (SmolLM2-135M-Instruct.Q4_1.gguf); a served name does not.
_GGUF_TYPE = re.compile(r"[.-](I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)


def add_parser(verbs, add_build_options) -> None:
    p = verbs.add_parser(
        "serve", help="serve a model (default: the bundled SmolLM2) or a model repository over KServe v2 and OpenAI",
        description="Serve a model over OpenAI's API (/v1) and KServe v2 (HTTP /v2 and gRPC), or a Triton model "
                    "repository (--model-repository).")
    p.add_argument("model", nargs="?", default=None,
                   help="an engine, checkpoint, Hugging Face folder or .gguf file (default: the bundled SmolLM2, built "
                        "into the engine cache on first use)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients use (default: the model's folder or file name)")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve this folder of model folders (Triton layout) instead of one model")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help="ask every request (OpenAI, KServe HTTP and gRPC, metrics; not health) for "
                        f"'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--restricted-api", action="append", default=[], metavar="GROUPS:KEY=VALUE",
                   help="API groups that need the header KEY: VALUE instead (repeatable; e.g. "
                        "model-repository,shared-memory:admin-key=SECRET); groups: " + ", ".join(GROUPS))
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call the HTTP port, with CORS "
                        "(repeatable; '*' for any); others are refused")
    limits = Limits()
    p.add_argument("--max-request-size", type=_size, default=limits.max_request_size, metavar="BYTES",
                   help="largest HTTP body (also after decompression) or gRPC message; K, M, G suffixes "
                        "(default 64M)")
    p.add_argument("--max-connections", type=int, default=limits.max_connections,
                   help=f"open connections per port (default {limits.max_connections})")
    p.add_argument("--header-timeout", type=float, default=limits.header_timeout, metavar="SECS",
                   help=f"time for a request's head, and between pieces of its body (default {limits.header_timeout:g})")
    p.add_argument("--idle-timeout", type=float, default=limits.idle_timeout, metavar="SECS",
                   help=f"idle HTTP keep-alive and gRPC connections are closed after it (default {limits.idle_timeout:g})")
    p.add_argument("--shm-max-regions", type=int, default=limits.shm_max_regions,
                   help=f"registered shared-memory regions at most (default {limits.shm_max_regions})")
    p.add_argument("--shm-max-bytes", type=_size, default=limits.shm_max_bytes, metavar="BYTES",
                   help="total registered size of the shared-memory regions (default 64G)")
    p.add_argument("--cancel-grace", type=float, default=limits.cancel_grace, metavar="SECS",
                   help="time a model has to end a cancelled request, or its requests at unload, before its "
                        f"instance is stopped (default {limits.cancel_grace:g})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI and KServe HTTP; 0 picks a free port "
                                                               "(default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port (default 8002)")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="none",
                   help="none: load all at start; explicit: load/unload on request; poll: follow the folder")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with explicit control: a model to load at start (repeatable; '*' for all)")
    p.add_argument("--repository-poll-secs", type=float, default=15.0, help="poll mode: seconds between scans")
    p.add_argument("--log-verbose", type=int, default=0, metavar="LEVEL", help="> 0 logs every request")
    p.add_argument("--trace-file", default=None, metavar="PATH",
                   help="where the trace extension writes traces (turned on with /v2/trace/setting or gRPC "
                        "TraceSetting; clients may not name a file)")
    p.add_argument("--engine-core", choices=["process", "thread"], default="process",
                   help="where MODEL's engine core steps: a process of its own (default; no interpreter lock "
                        "shared with the server) or a thread of the server's process")
    p.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="sampling defaults of a request that leaves them unset: the model's own (auto: its "
                        "generation config, recorded in the engine) or kiln's (none)")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help='sampling defaults over those, e.g. \'{"temperature": 0.5, "top_p": 0.95}\'')
    add_build_options(p, for_run=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import logging

    from kiln.server.app import ServeOptions
    from kiln.server.app import run as serve

    logging.getLogger("kiln.server").setLevel(logging.DEBUG if args.log_verbose else logging.INFO)
    if args.model_repository and (args.model or args.served_model_name):
        raise KilnError("give a MODEL or --model-repository, not both")
    try:
        limits = Limits(args.max_request_size, args.max_connections, args.header_timeout, args.idle_timeout,
                        args.shm_max_regions, args.shm_max_bytes, args.cancel_grace)
    except ValueError as e:
        raise KilnError(str(e).replace("_", "-")) from None
    options = dict(model_control_mode=args.model_control_mode, load_models=args.load_model,
                   repository_poll_secs=args.repository_poll_secs, host=args.host, http_port=args.http_port,
                   grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=args.log_verbose,
                   trace_file=Path(args.trace_file).resolve() if args.trace_file else None,
                   api_key=args.api_key or None, restricted_api=args.restricted_api,
                   allowed_origins=args.allowed_origins, limits=limits)
    if args.model_repository:
        serve(ServeOptions(model_repository=Path(args.model_repository), **options), _banner(args))
        return
    from kiln.builder.engine_cache import DEFAULT_MODEL_SAMPLING, engine_for

    from kiln.cli.build_options import build_fields, quantize_calibration

    engine = engine_for(args.model, args.dtype, quantize_calibration=quantize_calibration(args), **build_fields(args))
    name = args.served_model_name or served_name(args.model)
    parameters = {"engine_core": args.engine_core, "generation_config": args.generation_config}
    override = args.override_generation_config
    if override is None and args.model is None and args.generation_config == "auto":
        override = json.dumps(DEFAULT_MODEL_SAMPLING)  # the default model's GGUF has no generation config
    if override:
        parameters["override_generation_config"] = override
    with tempfile.TemporaryDirectory(prefix="kiln-serve-") as root:
        write_model_folder(Path(root), name, engine, parameters)
        serve(ServeOptions(model_repository=Path(root), **options), _banner(args))


def _size(text: str) -> int:
    """A byte count, with an optional K, M or G suffix (powers of 1024): 64M, 1G, 65536."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 64M, 1G, 65536)") from None


def served_name(model: str | None) -> str:
    """The name a model is served under by default: its folder's name, or its file's without the GGUF type."""
    from kiln.builder.engine_cache import default_model

    source = Path(model).resolve() if model else default_model()
    if source.is_file():
        return _GGUF_TYPE.sub("", source.name[: -len(".gguf")] if source.name.endswith(".gguf") else source.stem)
    return source.name


def write_model_folder(root: Path, name: str, engine: Path, parameters: dict[str, str] | None = None) -> None:
    """A model folder for the kiln backend that names ``engine`` (and any runtime ``parameters``), with its
    one (empty) version folder."""
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise KilnError(f"--served-model-name {name!r} cannot name a model folder: no '/', no leading '.'")
    (root / name / "1").mkdir(parents=True)
    lines = ['backend: "kiln"'] + [f'parameters {{ key: "{key}" value {{ string_value: {json.dumps(str(value))} }} }}'
                                   for key, value in {"engine_dir": engine, **(parameters or {})}.items()]
    (root / name / "config.pbtxt").write_text("\n".join(lines) + "\n")


def _banner(args: argparse.Namespace):
    def started(server, addresses: dict[str, str]) -> None:
        from kiln.server.backends.kiln import KilnBackend

        http = _url_host(addresses["http"])
        models = sorted({m.name for m in server.repository.served() if isinstance(m.backend, KilnBackend)})
        lines = ["", f"kiln serve is ready: {', '.join(models) or 'no kiln model'}",
                 f"  OpenAI API      http://{http}/v1",
                 f"  KServe v2 HTTP  http://{http}/v2    gRPC {_url_host(addresses['grpc'])}    "
                 f"metrics http://{_url_host(addresses['metrics'])}/metrics"]
        if models:
            auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if args.api_key else ""
            body = json.dumps({"model": models[0], "messages": [
                {"role": "user", "content": "What is the capital of France?"}]})
            lines += ["Try it:", f"  curl http://{http}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                                 f"-d '{body}'"]
        print("\n".join(lines) + "\n", flush=True)

    return started


def _url_host(address: str) -> str:
    """A bound address as a client would type it: a wildcard host becomes localhost."""
    host, port = address.rsplit(":", 1)
    return f"{'localhost' if host in ('0.0.0.0', '::', '[::]', '') else host}:{port}"

