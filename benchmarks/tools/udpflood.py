"""UDP datagrams per second.

`sink HOST PORT`: count datagrams; stop once none arrived for --idle seconds after the first one
(or after --max-time), then print `{"count", "first", "last"}` (monotonic seconds).
`send HOST PORT --duration D --size 64 --flows F`: send as fast as possible for D seconds from F
sockets (F client sessions at a proxy), round-robin; print `{"sent": N}`.
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def sink(host: str, port: int, idle: float, max_time: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    buffer = bytearray(65536)
    deadline = time.monotonic() + max_time
    count, first, last = 0, 0.0, 0.0
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            sock.recv_into(buffer)
        except TimeoutError:
            if count:
                break
            continue
        last = time.monotonic()
        if not count:
            first = last
            sock.settimeout(idle)
        count += 1
    print(json.dumps({"count": count, "first": first, "last": last}), flush=True)


def send(host: str, port: int, duration: float, size: int, flows: int) -> None:
    socks = []
    for _ in range(flows):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, port))
        socks.append(sock)
    payload = b"x" * size
    sent = 0
    end = time.monotonic() + duration
    sends = [s.send for s in socks]
    while time.monotonic() < end:
        for _ in range(64):  # check the clock once per batch
            for fn in sends:
                try:
                    fn(payload)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    pass  # an ICMP "unreachable" from a restarting peer; keep sending
    print(json.dumps({"sent": sent}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["sink", "send"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--flows", type=int, default=4)
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--max-time", type=float, default=60.0)
    args = parser.parse_args()
    if args.mode == "sink":
        sink(args.host, args.port, args.idle, args.max_time)
    else:
        send(args.host, args.port, args.duration, args.size, args.flows)


if __name__ == "__main__":
    main()
