"""DNS queries as a stub resolver sends them: each from a new socket (a new source port), one
at a time, so every query is a new UDP session at a proxy.

`dnsquery.py HOST PORT NAME --count N [--timeout S] [--wait S]`: first wait (up to --wait) until
a query is answered, then send N queries for NAME (type A), each from a fresh connected socket,
and print `{"sent", "answered", "elapsed_s", "p50_us", "p99_us"}`: the time from send() to the
answer's arrival. A query not answered within --timeout counts as lost. Bounded: N queries.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time


def query(ident: int, name: str) -> bytes:
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # recursion desired, 1 question
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)  # A, IN


def ask(address: tuple[str, int], ident: int, name: str, timeout: float) -> float | None:
    """One query from a new socket: seconds until its answer, or None."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        message = query(ident, name)
        began = time.perf_counter()
        sock.send(message)
        while True:
            answer = sock.recv(4096)
            if len(answer) >= 12 and struct.unpack("!H", answer[:2])[0] == ident:
                return time.perf_counter() - began
    except OSError:  # timeout, or ICMP refused
        return None
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--wait", type=float, default=10.0)
    args = parser.parse_args()
    address = (args.host, args.port)
    deadline = time.monotonic() + args.wait
    while ask(address, 1, args.name, 0.2) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer from {args.host}:{args.port} within {args.wait}s")
    times: list[float] = []
    began = time.perf_counter()
    for i in range(args.count):
        took = ask(address, (i + 2) & 0xFFFF, args.name, args.timeout)
        if took is not None:
            times.append(took)
    elapsed = time.perf_counter() - began
    times.sort()
    result = {
        "sent": args.count,
        "answered": len(times),
        "elapsed_s": elapsed,
        "p50_us": times[len(times) // 2] * 1e6 if times else None,
        "p99_us": times[min(len(times) - 1, len(times) * 99 // 100)] * 1e6 if times else None,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
