"""The HTTP half of watching the API server: kubernetes_asyncio for configuration,
authentication, TLS and the typed list functions; lbd for the rest.

kubernetes_asyncio (the maintained asyncio port of the official client, generated from the
same OpenAPI spec) loads a kubeconfig (exec and OIDC plugins included) or the in-cluster
service account, and its ``list_*`` functions build every request. Responses are read raw
(``_preload_content=False``): the typed models cost a deserialisation per object that lbd would
only turn back into dicts, and its ``Watch`` helper re-watches on 410 Gone instead of listing
again. The library is imported only here, and only when ``lbd run --kubernetes`` starts, so lbd
works without the ``kubernetes`` extra.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

Obj = dict[str, Any]
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_ERROR_BODY = 4096
JSON_IN_THREAD_BYTES = 1 << 20  # a list larger than this is parsed off the event loop


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str  # "" for the core API
    plural: str


SERVICES = Resource("Service", "", "services")
ENDPOINT_SLICES = Resource("EndpointSlice", "discovery.k8s.io", "endpointslices")
NODES = Resource("Node", "", "nodes")
RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES)
# Every API call lbd makes, as RBAC names it: (apiGroup, resource, verb). The DaemonSet's
# ClusterRole must grant each (tests/test_kubernetes_rbac.py checks deploy/kubernetes).
API_CALLS = tuple((r.group, r.plural, verb) for r in RESOURCES for verb in ("list", "watch"))
# What a request can fail with: unreachable, reset, timed out, a broken chunked stream.
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ValueError)


class SourceError(Exception):
    """The source cannot start: no client library, no usable kubeconfig or service account."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is too old; list again."""


class TokenFile:
    """A ``refresh_api_key_hook`` that reads the service-account token again whenever the file
    changed: the kubelet rotates a projected token by swapping a symlink, well before it
    expires, and a stale token is refused (401) once it does."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def __call__(self, configuration: Any) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path) as handle:
                token = handle.read().strip()
        except OSError:
            return  # keep the token in use; the API server says 401 if it is no good
        if token:
            self._stamp = stamp
            configuration.api_key["BearerToken"] = f"Bearer {token}"


async def open_client(
    kubeconfig: str | None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    environ: Mapping[str, str] = os.environ,
) -> Any:
    """An ``ApiClient``: ``kubeconfig``, else ``$KUBECONFIG``, else the in-cluster service
    account (``KUBERNETES_SERVICE_HOST``), else ``~/.kube/config``."""
    try:
        from kubernetes_asyncio import client, config
    except ImportError:
        raise SourceError(
            "watching Kubernetes needs the kubernetes extra: pip install 'lbd[kubernetes]'"
        ) from None
    configuration = client.Configuration()
    path = kubeconfig or environ.get("KUBECONFIG")
    in_cluster = not path and bool(environ.get("KUBERNETES_SERVICE_HOST"))
    path = path or (None if in_cluster else _default_kubeconfig())
    where = path or "the in-cluster service account"
    try:
        if in_cluster:
            token = os.path.join(service_account_dir, "token")
            config.load_incluster_config(
                client_configuration=configuration,
                token_filename=token,
                cert_filename=os.path.join(service_account_dir, "ca.crt"),
                environ=environ,
            )
            configuration.refresh_api_key_hook = TokenFile(token)
        elif path:
            await config.load_kube_config(
                config_file=path,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            raise SourceError(
                "no Kubernetes API configuration: give --kubeconfig, set $KUBECONFIG, or run "
                "in a pod (KUBERNETES_SERVICE_HOST and a service account)"
            )
    except (config.ConfigException, OSError, ValueError, KeyError, TypeError) as error:
        raise SourceError(f"cannot use {where}: {error}") from None
    return client.ApiClient(configuration)


def _default_kubeconfig() -> str | None:
    path = os.path.expanduser("~/.kube/config")
    return path if os.path.exists(path) else None


class ApiCalls:
    """List (paginated) and watch one resource, answers as plain JSON objects."""

    def __init__(self, api_client: Any, node_name: str, page_size: int, read_timeout: float):
        from kubernetes_asyncio import client

        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self._functions = {
            SERVICES: core.list_service_for_all_namespaces,
            ENDPOINT_SLICES: discovery.list_endpoint_slice_for_all_namespaces,
            NODES: core.list_node,
        }
        self._selector = {NODES: f"metadata.name={node_name}"}
        self.page_size = page_size
        self.read_timeout = read_timeout

    async def _request(
        self, resource: Resource, read_timeout: float, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        if resource in self._selector:
            kwargs["field_selector"] = self._selector[resource]
        response: aiohttp.ClientResponse = await self._functions[resource](
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=self.read_timeout, sock_read=read_timeout
            ),
            **kwargs,
        )
        if response.status != 200:
            async with response:
                body = await response.content.read(MAX_ERROR_BODY)
            raise _status_error(response.status, body)
        return response

    async def list(self, resource: Resource) -> tuple[list[Obj], str]:
        """Every object (page by page, ``limit``/``continue``) and the list's resourceVersion."""
        items: list[Obj] = []
        token: str | None = None
        while True:
            page = {"_continue": token} if token else {}
            response = await self._request(
                resource, self.read_timeout, limit=self.page_size, **page
            )
            async with response:
                data = await response.read()
            body = await _parse(data)
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    async def watch(self, resource: Resource, version: str, timeout_s: int) -> AsyncIterator[Obj]:
        """The events after ``version`` until the server ends the stream (``timeout_s``)."""
        response = await self._request(
            resource,
            # silent until timeoutSeconds at most (bookmarks come about once a minute)
            timeout_s + self.read_timeout,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
        )
        return _events(response)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Obj]:
    async with response:
        while line := await response.content.readline():
            if line.strip():
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError(f"a watch event must be an object, got {line[:80]!r}")
                yield event


async def _parse(data: bytes) -> Obj:
    if len(data) > JSON_IN_THREAD_BYTES:
        body = await asyncio.to_thread(json.loads, data)
    else:
        body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("a list response must be an object")
    return body


def _status_error(status: int, body: bytes) -> ApiError:
    """The API's ``Status`` object (``message``), or the start of whatever came instead."""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    return Gone(status, message) if status == 410 else ApiError(status, message)


def status_error(event_object: object) -> ApiError:
    """A watch ``ERROR`` event's Status object as an exception (410: ``Gone``)."""
    status = event_object if isinstance(event_object, dict) else {}
    code = status.get("code")
    number = code if isinstance(code, int) else 500
    message = str(status.get("message", ""))[:200]
    return Gone(number, message) if number == 410 else ApiError(number, message)
