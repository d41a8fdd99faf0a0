"""``kiln serve``: the HTTP, gRPC and metrics endpoints and the model repository in one process, on one
asyncio loop (uvicorn for HTTP and metrics, grpc.aio for gRPC). The HTTP port carries both KServe v2
(``/v2/...``) and OpenAI's API (``/v1/...``, over the models of the kiln backend). Who may call what is
``access.py``'s; what a connection and a request may hold is ``limits.py``'s, kept at the HTTP ports'
edge (``protocols/http_edge.py``) and by grpc's own options.

The endpoints start first (live at once, ready once the startup loads are done), then the models
load. Port 0 means "pick a free port"; the bound address of each endpoint is logged as Triton logs it
("Started HTTPService at 127.0.0.1:8000"), so scripts and tests can find it. SIGINT or SIGTERM stops
the endpoints, waits for requests in flight and unloads every model.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kiln.server import access, memory, metrics
from kiln.server.access import AccessPolicy, Restriction
from kiln.server.errors import ServerError
from kiln.server.limits import raise_descriptor_limit
from kiln.server.protocols import kserve_grpc, kserve_http, openai
from kiln.server.protocols.http_edge import EdgeMiddleware, connection_guard
from kiln.server.server import InferenceServer, ServerOptions

log = logging.getLogger("kiln.server")


@dataclass
class ServeOptions(ServerOptions):
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    api_key: str | None = None  # asked of every request but health (Authorization: Bearer KEY); None: open
    restricted_api: list[str] = field(default_factory=list)  # "GROUPS:KEY=VALUE" (access.Restriction)
    allowed_origins: list[str] = field(default_factory=list)  # web origins that may call the HTTP port

    def access_policy(self) -> AccessPolicy:
        try:
            return AccessPolicy(self.api_key, [Restriction.parse(r) for r in self.restricted_api],
                                self.allowed_origins)
        except ValueError as e:
            raise ServerError.invalid(f"--restricted-api: {e}") from None


class _Uvicorn(uvicorn.Server):
    # One process runs several servers: signals are handled once, by serve(), not by each uvicorn.
    def capture_signals(self):
        return contextlib.nullcontext()


def run(options: ServeOptions, on_started: Callable[[InferenceServer, dict[str, str]], None] | None = None) -> None:
    """Serve on uvloop's event loop where it is installed (libuv: a streamed token's socket write and
    wake-ups cost a fraction of asyncio's own loop), else on asyncio's."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(options, on_started=on_started))


async def serve(options: ServeOptions, stop: asyncio.Event | None = None,
                on_started: Callable[[InferenceServer, dict[str, str]], None] | None = None) -> None:
    """Serve until ``stop`` is set (or SIGINT / SIGTERM). ``on_started`` gets the server and the bound
    addresses ({"http", "grpc", "metrics"}: "host:port") once the models are loaded and it is ready."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    memory.configure()
    policy = options.access_policy()
    limits = options.limits
    raise_descriptor_limit(limits)
    server = InferenceServer(options)
    http_sock = _listen(options.host, options.http_port, "HTTP")
    metrics_sock = _listen(options.host, options.metrics_port, "metrics")
    grpc_server = kserve_grpc.create_server(server, policy, limits)
    grpc_host = f"[{options.host}]" if ":" in options.host else options.host
    try:
        grpc_port = grpc_server.add_insecure_port(f"{grpc_host}:{options.grpc_port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        grpc_port = 0
    if grpc_port == 0:
        raise ServerError.unavailable(f"cannot bind the gRPC port {options.host}:{options.grpc_port}")

    uvicorn_level = "info" if options.log_verbose else "warning"
    collector = metrics.TritonMetrics(server.repository)
    # The metrics page is on the metrics port (Triton's) and on the API's port too (vLLM's).
    metrics_route = Route("/metrics", access.guard_http(policy, access.METRICS, _metrics_endpoint(collector)),
                          methods=["GET"])
    metrics_app = Starlette(routes=[metrics_route], exception_handlers={ServerError: _metrics_error})
    http_app = _ByPath(openai.create_app(server, policy), metrics_app, openai.create_root_app(server, policy),
                       kserve_http.create_app(server, policy, limits))
    edge = dict(log_config=None, log_level=uvicorn_level, lifespan="off", timeout_graceful_shutdown=5,
                http=connection_guard(limits), timeout_keep_alive=limits.idle_timeout)
    http = _Uvicorn(uvicorn.Config(EdgeMiddleware(http_app, limits, policy), access_log=bool(options.log_verbose),
                                   **edge))
    metrics_http = _Uvicorn(uvicorn.Config(EdgeMiddleware(metrics_app, limits, policy), access_log=False, **edge))

    await grpc_server.start()
    tasks = [asyncio.create_task(http.serve(sockets=[http_sock])),
             asyncio.create_task(metrics_http.serve(sockets=[metrics_sock]))]
    addresses = {"grpc": f"{options.host}:{grpc_port}", "http": f"{options.host}:{http_sock.getsockname()[1]}",
                 "metrics": f"{options.host}:{metrics_sock.getsockname()[1]}"}
    log.info("Started GRPCInferenceService at %s", addresses["grpc"])
    log.info("Started HTTPService at %s", addresses["http"])
    log.info("Started Metrics Service at %s", addresses["metrics"])
    try:
        await server.start()
        _log_models(server)
        if on_started is not None:
            on_started(server, addresses)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    finally:
        log.info("stopping the server")
        http.should_exit = metrics_http.should_exit = True
        await grpc_server.stop(grace=5)
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()


class _ByPath:
    """The HTTP port's apps, each with its own error shape, chosen by path: OpenAI's under ``/v1/`` (as a
    Starlette ``Mount`` would hand it on), the metrics page (vLLM serves it on its API port), vLLM's root
    routes, and KServe's for everything else (its 404 for unknown paths). A prefix test per request, where
    a router of mounts would add a middleware stack and a regex per route in front of every inference."""

    def __init__(self, openai_app, metrics_app, root_app, kserve_app):
        self.openai = openai_app
        self.metrics = metrics_app
        self.root = root_app
        self.root_paths = frozenset(route.path for route in root_app.routes)
        self.kserve = kserve_app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            await self.openai({**scope, "root_path": scope.get("root_path", "") + "/v1"}, receive, send)
        elif path == "/metrics":
            await self.metrics(scope, receive, send)
        elif path in self.root_paths:
            await self.root(scope, receive, send)
        else:
            await self.kserve(scope, receive, send)


def _listen(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on accepted connections, without which
    # every response with a body waits out the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ServerError.unavailable(f"cannot bind the {what} port {host}:{port}: {e.strerror}") from None
    return sock


def _metrics_endpoint(collector: metrics.TritonMetrics):
    async def endpoint(request: Request) -> Response:
        return Response(metrics.render(collector.collect()), media_type=metrics.CONTENT_TYPE)

    return endpoint


async def _metrics_error(request: Request, e: ServerError) -> Response:
    return Response(e.message + "\n", status_code=e.code.http_status, media_type="text/plain")


def _log_models(server: InferenceServer) -> None:
    rows = [("Model", "Version", "Status")] + [
        (name, version or "-", f"{state or 'not loaded'}{': ' + reason if reason else ''}")
        for name, version, state, reason in server.repository.index()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [rule] + ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows[:1]] + [rule]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows[1:]] + [rule]
    log.info("models:\n%s", "\n".join(lines))
