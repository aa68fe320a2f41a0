"""A fake Kubernetes API server for lbd's watcher, speaking the real wire format.

It serves the three collections lbd reads (``/api/v1/services``,
``/apis/discovery.k8s.io/v1/endpointslices``, ``/api/v1/nodes`` with a ``metadata.name``
fieldSelector) as kube-apiserver does: lists with ``metadata.resourceVersion``, ``limit`` and
``continue`` pages (410 once a token has expired); ``?watch=true`` as a chunked stream of JSON
lines (ADDED / MODIFIED / DELETED of objects carrying kind and apiVersion, BOOKMARK events,
ERROR events with a ``Status``); a resourceVersion older than the compacted history answers 410
(or, like a real server, a 200 stream whose first event is an ERROR 410). Faults on demand:
``stop()``/``start()`` (down and back on the same address), ``drop_watches()`` (connections cut
mid-stream), ``delay`` (slow answers), bearer-token checks (401), TLS.

Every request is recorded as (apiGroup, resource, verb), for the RBAC coverage test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support import fresh_ip

Obj = dict[str, Any]


@dataclass(frozen=True)
class Collection:
    kind: str
    api_version: str
    group: str
    plural: str
    path: str


SERVICES = Collection("Service", "v1", "", "services", "/api/v1/services")
SLICES = Collection(
    "EndpointSlice",
    "discovery.k8s.io/v1",
    "discovery.k8s.io",
    "endpointslices",
    "/apis/discovery.k8s.io/v1/endpointslices",
)
NODES = Collection("Node", "v1", "", "nodes", "/api/v1/nodes")
COLLECTIONS = {c.kind: c for c in (SERVICES, SLICES, NODES)}


@dataclass(eq=False)
class Watcher:
    collection: Collection
    selector: str | None
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)
    response: web.StreamResponse | None = None
    transport: asyncio.BaseTransport | None = None


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(
        self,
        host: str | None = None,
        *,
        tokens: set[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        bookmark_interval: float = 0.5,
    ) -> None:
        self.host = host or fresh_ip()
        self.port = 0
        self.tokens = tokens  # None: no authentication
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.delay = 0.0  # seconds before every answer (a slow API server)
        self.gone_as_event = False  # a too-old watch: a 200 stream with an ERROR event
        self.objects: dict[str, dict[str, Obj]] = {kind: {} for kind in COLLECTIONS}
        self.history: list[tuple[int, str, Obj]] = []  # (resourceVersion, type, object)
        self.compacted = 0  # watches from before this resourceVersion get 410
        self.version = 1000
        self.watchers: set[Watcher] = set()
        self.calls: list[tuple[str, str, str]] = []  # (apiGroup, resource, verb)
        self.tokens_seen: set[str] = set()
        self.lists: dict[str, int] = {kind: 0 for kind in COLLECTIONS}
        self.pages: dict[str, list[Obj]] = {}  # continue token -> the rest of a list
        self._tokens = itertools.count()  # every continue token is new (lists run concurrently)
        self.held: dict[str, asyncio.Event] = {}  # kind -> lists of it wait until it is set
        self._runner: web.AppRunner | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        for collection in COLLECTIONS.values():
            app.router.add_get(collection.path, self._handler(collection))
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Down: every connection cut, nothing listens (connects are refused)."""
        self.drop_watches()
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def drop_watches(self) -> None:
        """Cut every open watch mid-stream (the client sees a broken chunked response)."""
        for watcher in list(self.watchers):
            if watcher.transport is not None:
                watcher.transport.abort()  # type: ignore[attr-defined]

    def expire(self) -> None:
        """Compact the history past every version a client has seen (as if other objects had
        changed meanwhile): watches resuming from any of them get 410. Continue tokens expire."""
        self.version += 1
        self.compacted = self.version
        self.history.clear()
        self.pages.clear()

    # -- the cluster ---------------------------------------------------------------------------

    def put(self, *objects: Obj) -> None:
        """Create or update each object (ADDED or MODIFIED), as the API server would."""
        for obj in objects:
            collection = COLLECTIONS[obj["kind"]]
            key = _key(obj)
            kind_type = "MODIFIED" if key in self.objects[collection.kind] else "ADDED"
            self._record(collection, kind_type, copy.deepcopy(obj))

    def delete(self, *objects: Obj) -> None:
        for obj in objects:
            collection = COLLECTIONS[obj["kind"]]
            stored = self.objects[collection.kind].get(_key(obj))
            if stored is not None:
                self._record(collection, "DELETED", copy.deepcopy(stored))

    def _record(self, collection: Collection, kind_type: str, obj: Obj) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind_type == "DELETED":
            del self.objects[collection.kind][_key(obj)]
        else:
            self.objects[collection.kind][_key(obj)] = obj
        event = {"type": kind_type, "object": obj}
        self.history.append((self.version, collection.kind, event))
        for watcher in self.watchers:
            if watcher.collection is collection and _selected(obj, watcher.selector):
                watcher.queue.put_nowait(event)

    # -- HTTP ----------------------------------------------------------------------------------

    def _handler(self, collection: Collection) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.transport is not None:
                self._transports.add(request.transport)
            watch = _bool(request.query.get("watch"))
            self.calls.append((collection.group, collection.plural, "watch" if watch else "list"))
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.tokens is not None:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ")
                self.tokens_seen.add(given)
                if given not in self.tokens:
                    body = _status(401, "Unauthorized", "Unauthorized")
                    return web.json_response(body, status=401)
            if watch:
                return await self._watch(request, collection)
            gate = self.held.get(collection.kind)
            if gate is not None:
                await gate.wait()
            return self._list(request, collection)

        return handle

    def _list(self, request: web.Request, collection: Collection) -> web.Response:
        token = request.query.get("continue")
        if token:
            rest = self.pages.pop(token, None)
            if rest is None:
                message = "The provided continue parameter is too old to display a consistent list"
                return web.json_response(_status(410, "Expired", message), status=410)
        else:
            self.lists[collection.kind] += 1
            selector = request.query.get("fieldSelector")
            rest = [
                _item(obj)
                for _, obj in sorted(self.objects[collection.kind].items())
                if _selected(obj, selector)
            ]
        limit = int(request.query.get("limit", 0)) or len(rest) or 1
        page, remaining = rest[:limit], rest[limit:]
        meta: Obj = {"resourceVersion": str(self.version)}
        if remaining:
            next_token = base64.b64encode(json.dumps([self.version, next(self._tokens)]).encode())
            meta["continue"] = next_token.decode()
            meta["remainingItemCount"] = len(remaining)
            self.pages[meta["continue"]] = remaining
        body = {
            "kind": f"{collection.kind}List",
            "apiVersion": collection.api_version,
            "metadata": meta,
            "items": page,
        }
        return web.json_response(body)

    async def _watch(self, request: web.Request, collection: Collection) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        too_old = since < self.compacted
        if too_old and not self.gone_as_event:
            message = f"too old resource version: {since} ({self.compacted})"
            return web.json_response(_status(410, "Expired", message), status=410)
        watcher = Watcher(collection, request.query.get("fieldSelector"))
        watcher.transport = request.transport
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        watcher.response = response
        await response.prepare(request)
        if too_old:
            message = f"too old resource version: {since} ({self.compacted})"
            await _send(response, {"type": "ERROR", "object": _status(410, "Expired", message)})
            return response
        for version, kind, event in self.history:
            fits = kind == collection.kind and _selected(event["object"], watcher.selector)
            if fits and version > since:
                watcher.queue.put_nowait(event)
        self.watchers.add(watcher)
        bookmarks = _bool(request.query.get("allowWatchBookmarks"))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        event = await asyncio.wait_for(watcher.queue.get(), self.bookmark_interval)
                    except TimeoutError:
                        if bookmarks:
                            await _send(response, self._bookmark(collection))
                        continue
                    if event is None:
                        break
                    await _send(response, event)
        except TimeoutError:
            pass  # timeoutSeconds: the server ends the stream cleanly
        except ConnectionError:
            return response
        finally:
            self.watchers.discard(watcher)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    def _bookmark(self, collection: Collection) -> Obj:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": collection.kind,
                "apiVersion": collection.api_version,
                "metadata": {"resourceVersion": str(self.version)},
            },
        }

    async def send_error(self, kind: str, code: int = 410) -> None:
        """An ERROR event on every open watch of ``kind`` (then the server ends the stream)."""
        for watcher in list(self.watchers):
            if watcher.collection.kind == kind and watcher.response is not None:
                event = {"type": "ERROR", "object": _status(code, "Expired", "too old")}
                with contextlib.suppress(ConnectionError):
                    await _send(watcher.response, event)
                watcher.queue.put_nowait(None)


async def _send(response: web.StreamResponse, event: Obj) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _bool(value: str | None) -> bool:
    """A query flag as the API server parses it (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _key(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _item(obj: Obj) -> Obj:
    """List items carry no kind or apiVersion (the list does)."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _selected(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    field_name, _, value = selector.partition("=")
    assert field_name == "metadata.name", selector
    return bool(obj["metadata"]["name"] == value)


@contextlib.asynccontextmanager
async def fake_api_server(**kwargs: Any) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(**kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def kubeconfig(server: FakeApiServer, token: str = "lbd-test-token") -> str:
    """A kubeconfig (YAML is JSON) pointing at ``server`` with a bearer token."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
            "users": [{"name": "lbd", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "lbd"}}],
            "current-context": "fake",
        }
    )
