"""``healthCheckNodePort``: what a cloud load balancer asks each node, as kube-proxy answers it.

For a LoadBalancer service with ``externalTrafficPolicy: Local`` the load balancer should send
traffic only to nodes that have a local endpoint; it learns which by asking
``http://NODE:healthCheckNodePort/`` on every node. kube-proxy answers 200 with a JSON body
while the node has a ready local endpoint and 503 otherwise (pkg/proxy/healthcheck/
service_health.go): only *ready* ones count, so a node whose last endpoints are terminating
fails the check and the load balancer drains it, while lbd still serves it meanwhile.

Control plane: asyncio streams, one short request per connection, bounded in size and time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import structlog

from lbd.net.sockets import bind_tcp_listener
from lbd.observability.stats import ProcessStats

log = structlog.get_logger("lbd.healthcheck")

REQUEST_TIMEOUT_S = 5.0
MAX_HEADER_LINES = 100
LocalCount = Callable[[], int]


class HealthCheckServer:
    def __init__(
        self, address: str, port: int, service: str, count: LocalCount, process: ProcessStats
    ) -> None:
        self.address = address
        self.port = port
        self.service = service  # namespace/name
        self.count = count  # ready endpoints of the service on this node, now
        self.process = process
        self._server: asyncio.Server | None = None
        self._sock = bind_tcp_listener(address, port)  # raises OSError: reload phase 1

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                for _ in range(MAX_HEADER_LINES):  # the request line and headers; body: none
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                local = self.count()
                namespace, name = self.service.split("/", 1)
                body = json.dumps(
                    {
                        "service": {"namespace": namespace, "name": name},
                        "localEndpoints": local,
                        "serviceProxyHealthy": True,
                    }
                ).encode()
                status = "200 OK" if local else "503 Service Unavailable"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"X-Content-Type-Options: nosniff\r\n"
                    f"X-Load-Balancing-Endpoint-Weight: {local}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                self.process.health_check_node_port_requests_total += 1
        except (TimeoutError, ConnectionError, ValueError) as error:
            # ValueError: a line over the stream limit. The asker retries; nothing to keep.
            log.debug("health check request failed", service=self.service, error=repr(error))
        finally:
            writer.close()
