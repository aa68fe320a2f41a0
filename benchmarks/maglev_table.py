"""What the hashing strategies cost: Maglev's table build, and the lookup per connection.

- build: ``lbd.balancing.maglev.build_table`` for N endpoints and M slots (default 1,000 x
  65,537, the size the issue asks about), best of ``--repeats``;
- lookup: ``Balancer.pick`` on real ``UpstreamEndpoint`` objects with a warm table, per call,
  for maglev, source-hash and (for scale) round-robin, over N = 1, 5, 100, 1,000 endpoints and
  rotating client addresses. This is what a new connection or UDP session pays to choose.

    python benchmarks/maglev_table.py [--endpoints 1000] [--size 65537] [--repeats 5]

Pure computation: no sockets, no processes.
"""

from __future__ import annotations

import argparse
import json
import time
import timeit

from lbd.balancing import make_balancer
from lbd.balancing.hashing import set_weight
from lbd.balancing.maglev import build_table
from lbd.endpoints.endpoint import UpstreamEndpoint


def endpoint_set(count: int) -> list[UpstreamEndpoint]:
    return [
        UpstreamEndpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8080) for i in range(count)
    ]


def build_seconds(count: int, size: int, repeats: int) -> float:
    key = tuple(
        sorted((f"{e.address}:{e.port}", set_weight(e.weight)) for e in endpoint_set(count))
    )
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        build_table(key, size)
        best = min(best, time.perf_counter() - started)
    return best


def lookup_microseconds(strategy: str, count: int, calls: int = 20_000) -> float:
    balancer = make_balancer(strategy)  # type: ignore[arg-type]
    eligible = endpoint_set(count)
    clients = [f"192.168.{i // 256}.{i % 256}" for i in range(1024)]
    balancer.pick(eligible, clients[0])  # builds the table once
    index = 0

    def one() -> None:
        nonlocal index
        index = (index + 1) & 1023
        balancer.pick(eligible, clients[index])

    best = min(timeit.repeat(one, number=calls, repeat=3))
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65537)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, object] = {}
    builds = {}
    for count in sorted({3, 100, args.endpoints}):
        builds[count] = round(build_seconds(count, args.size, args.repeats) * 1000, 1)
        print(f"build: {count:>5} endpoints x {args.size} slots: {builds[count]} ms", flush=True)
    results["build_ms"] = builds
    lookups: dict[str, dict[int, float]] = {}
    for strategy in ("maglev", "source-hash", "round-robin"):
        lookups[strategy] = {}
        for count in (1, 5, 100, 1000):
            cost = round(lookup_microseconds(strategy, count), 2)
            lookups[strategy][count] = cost
            print(f"lookup: {strategy:<12} {count:>5} endpoints: {cost} us per pick", flush=True)
    results["lookup_us"] = lookups
    print(json.dumps(results))


if __name__ == "__main__":
    main()
