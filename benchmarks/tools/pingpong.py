"""Round-trip latency on one keep-alive TCP connection at a fixed request rate.

Sends a small HTTP/1.1 GET, waits for the complete (fixed-length) response, records the time from
just before send() to the last byte read, then waits for the next slot of the schedule. Prints
one JSON line with percentiles in microseconds. The client is deliberately simple and blocking:
its own overhead is the same for every target, so compare the difference to "direct".
"""

from __future__ import annotations

import argparse
import json
import socket
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def read_response_length(sock: socket.socket) -> tuple[int, bytes]:
    """Read one response, learning its length from Content-Length; returns (length, leftover)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("backend closed the connection")
        data += chunk
    head, _, _ = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = len(head) + 4 + length
    while len(data) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("backend closed the connection")
        data += chunk
    return total, data[total:]


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after this long")
    args = parser.parse_args()

    sock = socket.create_connection((args.host, args.port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(REQUEST)
    length, leftover = read_response_length(sock)
    if leftover:
        raise RuntimeError("unexpected bytes after the first response")
    buffer = bytearray(length)
    view = memoryview(buffer)
    interval = 1.0 / args.rate
    samples: list[float] = []
    deadline = time.monotonic() + args.timeout
    next_send = time.perf_counter()
    for i in range(args.warmup + args.count):
        if time.monotonic() > deadline:
            break
        pause = next_send - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        start = time.perf_counter_ns()
        sock.sendall(REQUEST)
        got = 0
        while got < length:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("connection closed mid-response")
            got += n
        elapsed = (time.perf_counter_ns() - start) / 1000.0
        if i >= args.warmup:
            samples.append(elapsed)
        next_send += interval
    sock.close()
    samples.sort()
    print(
        json.dumps(
            {
                "n": len(samples),
                "p50_us": percentile(samples, 0.50),
                "p90_us": percentile(samples, 0.90),
                "p99_us": percentile(samples, 0.99),
                "max_us": samples[-1],
            }
        )
    )


if __name__ == "__main__":
    main()
