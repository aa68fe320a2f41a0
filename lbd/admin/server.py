"""The admin HTTP API (aiohttp): read-only GETs for anyone who can reach it, mutating POSTs only
with the bearer token (or over the unix socket, whose mode 0600 is the guard).

It listens on loopback by default (``admin.address``, 127.0.0.1:9180) so that nothing off the
host reaches it unless the config says so. Every error, the router's 404 and 405 included, is a
JSON body ``{"error": ..., "status": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from lbd.admin import views
from lbd.admin.backend import AdminBackend, LocalBackend
from lbd.admin.health import health_answer
from lbd.config.model import Admin
from lbd.config.render import render_config
from lbd.observability.snapshot import SnapshotCollector
from lbd.runtime.runtime import Runtime

log = structlog.get_logger("lbd.admin")

Json = dict[str, Any]
# Applies a new config and says what happened; ``status`` is the HTTP status to answer with.
ReloadHook = Callable[[], Awaitable[tuple[int, Json]]]


class AdminError(Exception):
    """The admin API could not start (bind, socket path, token file); names the config key."""


class AdminSettings:
    __slots__ = ("reload", "token", "trusted")

    def __init__(self, token: bytes | None, trusted: bool, reload: ReloadHook | None) -> None:
        self.token = token
        self.trusted = trusted  # the unix socket: the file mode already decided who may connect
        self.reload = reload


MUTATING = ("POST", "DELETE")
BACKEND = web.AppKey("backend", AdminBackend)
SETTINGS = web.AppKey("settings", AdminSettings)


class AdminServer:
    """``runtime`` is this process's (one worker), or a supervisor's view of all its workers."""

    def __init__(
        self, admin: Admin, runtime: Runtime | AdminBackend, reload: ReloadHook | None = None
    ) -> None:
        self.admin = admin
        self.backend = LocalBackend(runtime) if isinstance(runtime, Runtime) else runtime
        self.reload = reload
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    @property
    def bound(self) -> str:
        """Where it listens, port 0 resolved: ``HOST:PORT`` or ``unix:PATH``."""
        if self.admin.socket is not None:
            return f"unix:{self.admin.socket}"
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def sock(self) -> socket.socket | None:
        """The listening socket (a seamless restart hands it to the next lbd)."""
        return self._sock

    async def start(self, inherited: socket.socket | None = None) -> None:
        token = read_token(self.admin.token_file) if self.admin.token_file else None
        if inherited is not None:
            inherited.setblocking(False)
            self._sock = inherited
        elif self.admin.socket:
            self._sock = _unix_socket(self.admin.socket)
        else:
            self._sock = self._tcp_socket()
        app = build_app(self.backend, token, self.admin.socket is not None, self.reload)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        log.info("admin listening", admin=self.bound, token=token is not None)

    async def stop(self, unlink: bool = True) -> None:
        """``unlink=False``: the next lbd serves the same unix socket file now."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
        if self.admin.socket is not None and unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin.socket)

    def _tcp_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.admin.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.admin.address, self.admin.port))
            sock.listen(64)
            sock.setblocking(False)
            return sock
        except OSError as error:
            sock.close()
            raise AdminError(
                f"admin.address: cannot bind {self.admin.describe()}: {error.strerror or error}"
            ) from None


def read_token(path: str) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as error:
        raise AdminError(f"admin.tokenFile: cannot read {path}: {error.strerror}") from None
    if not token:
        raise AdminError(f"admin.tokenFile: {path} is empty")
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin token file is readable by others", token_file=path)
    return token


def _unix_socket(path: str) -> socket.socket:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise AdminError(f"admin.socket: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left over by an lbd that did not exit cleanly
            else:
                raise AdminError(f"admin.socket: {path} is in use by a running process")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window in which others could connect
    try:
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise AdminError(f"admin.socket: cannot bind {path}: {error.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


# -- the application -----------------------------------------------------------------------------


def build_app(
    backend: AdminBackend, token: bytes | None, trusted: bool, reload: ReloadHook | None
) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _authorize])
    app[BACKEND] = backend
    app[SETTINGS] = AdminSettings(token, trusted, reload)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/config", _config)
    app.router.add_get("/services", _services)
    app.router.add_get("/explain", _explain)
    app.router.add_post("/reload", _reload)
    app.router.add_post("/endpoints/drain", _drain)
    app.router.add_post("/endpoints/enable", _enable)
    app.router.add_post("/endpoints/weight", _weight)
    app.router.add_get("/faults", _faults)
    app.router.add_post("/faults", _add_fault)
    app.router.add_delete("/faults", _remove_faults)
    app.router.add_delete("/faults/{id}", _remove_fault)
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except views.NotFound as error:
        return _error(404, str(error))
    except views.BadRequest as error:
        return _error(400, str(error))
    except web.HTTPException as error:
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return _error(error.status, error.reason, headers)


@web.middleware
async def _authorize(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """POST and DELETE routes need the bearer token, unless the request came over the unix
    socket."""
    if request.method not in MUTATING or request.match_info.http_exception is not None:
        return await handler(request)
    settings = request.app[SETTINGS]
    if settings.trusted:
        return await handler(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="lbd"'}
    if settings.token is None:
        return _error(401, "mutating calls need admin.tokenFile, or admin.socket", challenge)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), settings.token
    ):
        log.warning("admin call refused", path=request.path, why="bad or missing token")
        return _error(401, "missing or wrong bearer token", challenge)
    return await handler(request)


async def _healthz(request: web.Request) -> web.Response:
    status, body = health_answer(request.app[BACKEND].health())
    return web.json_response(body, status=status)


async def _readyz(request: web.Request) -> web.Response:
    if request.app[BACKEND].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    """The counters are read on the loop (a few ms for a thousand endpoints, and consistent);
    rendering them is far slower (~0.5 s for a thousand endpoints) and runs in a thread, so the
    data path keeps getting the loop between the thread's GIL slices."""
    snapshot = await request.app[BACKEND].snapshot()
    # prometheus-client's own negotiation: the text format, or OpenMetrics when asked.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))

    def render() -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(lambda: snapshot))
        registry.register(ProcessCollector(registry=None))
        return encode(registry)

    body = await asyncio.get_running_loop().run_in_executor(None, render)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _config(request: web.Request) -> web.Response:
    return web.json_response(render_config(request.app[BACKEND].config))


async def _services(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].view("services", {}))


async def _explain(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].view("explain", dict(request.query)))


async def _reload(request: web.Request) -> web.Response:
    hook = request.app[SETTINGS].reload
    if hook is None:
        return _error(501, "this lbd was started without a config file to reload")
    status, body = await hook()
    log.info("admin reload", status=status)
    return web.json_response(body, status=status)


async def _drain(request: web.Request) -> web.Response:
    return await _endpoint_action(request, "drain")


async def _enable(request: web.Request) -> web.Response:
    return await _endpoint_action(request, "enable")


async def _weight(request: web.Request) -> web.Response:
    return await _endpoint_action(request, "weight")


async def _endpoint_action(request: web.Request, action: str) -> web.Response:
    query = dict(request.query)
    body = await request.app[BACKEND].view(action, query)
    log.info(
        "admin endpoint override",
        action=action,
        service=query.get("service"),
        port=query.get("port"),
        endpoint=query.get("endpoint"),
        weight=query.get("weight"),
    )
    return web.json_response(body)


async def _faults(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].view("faults", {}))


async def _add_fault(request: web.Request) -> web.Response:
    """The body is one fault as JSON, plus ``service`` (and ``namespace``, ``port``)."""
    body = (await request.read()).decode("utf-8", "replace")
    return web.json_response(await request.app[BACKEND].view("fault_add", {"body": body}))


async def _remove_fault(request: web.Request) -> web.Response:
    query = {"id": request.match_info["id"]}
    return web.json_response(await request.app[BACKEND].view("fault_remove", query))


async def _remove_faults(request: web.Request) -> web.Response:
    """Every fault added over the API (those of the config file stay)."""
    return web.json_response(await request.app[BACKEND].view("fault_remove", {"id": "all"}))
