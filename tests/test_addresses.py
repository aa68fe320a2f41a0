"""node.manageAddresses (lbd.net.addresses, lbd.net.netlink): lbd puts the service addresses it
serves on the node, puts back what someone else removes, takes off what no service uses, leaves
alone what it did not add, and never opens 127.0.0.1 to other hosts (route_localnet).

A real lbd runs inside a network namespace (the node) joined by a veth pair to another (a
client host); every address here exists only in those namespaces. This kernel may lack the
dummy driver, so the addresses are looked for on ``lbd0`` or, failing that, on ``lo``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import NETNS_SKIP, Lab, ask, backend, lab, replies, run
from tests.procs import lbd_process, run_cli

pytestmark = [pytest.mark.slow, NETNS_SKIP]

NODE, CLIENT = "10.202.0.1", "10.202.0.2"
NODE6, CLIENT6 = "fd00:202::1", "fd00:202::2"
PRESENT = "10.97.0.7"  # on the node before lbd starts: lbd must neither add nor remove it
BACKEND_PORT = 18080

CONFIG = """\
apiVersion: lbd/v1
workers: {workers}
admin: {{enabled: false}}
node: {{addresses: ['{node}'], manageAddresses: true, syncPeriod: 1s}}
services:
  - name: web
    type: NodePort
    clusterIP: 10.96.0.10
    externalIPs: [{external}]
    ports: [{{port: 80, targetPort: {port}, nodePort: 30080}}]
    endpoints: [127.0.0.1]
  - name: six
    clusterIP: 'fd00:96::10'
    ports: [{{port: 80, targetPort: {port}}}]
    endpoints: [127.0.0.1]
"""

DUMP = """
import json
from pyroute2 import IPRoute
with IPRoute() as ipr:
    names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    print(json.dumps({
        a.get_attr("IFA_ADDRESS"): [names[a["index"]], a.get_attr("IFA_LABEL"),
                                    a.get_attr("IFA_PROTO")]
        for a in ipr.get_addr()
    }))
"""


def config(external: str = f"'{PRESENT}', '10.97.0.8'", node: str = NODE, workers: int = 1) -> str:
    return CONFIG.format(node=node, external=external, port=BACKEND_PORT, workers=workers)


def addresses(net: Lab) -> dict[str, list[object]]:
    """Every address in the node namespace: [interface, label, IFA_PROTO]."""
    found: dict[str, list[object]] = json.loads(run(net.exec("node", sys.executable, "-c", DUMP)))
    return found


@pytest.fixture
def net() -> Iterator[Lab]:
    with lab() as created:
        created.host("node")
        created.host("client")
        node_end, client_end = created.link("node", "client")
        created.ip("node", "addr", "add", f"{NODE}/24", "dev", node_end)
        created.ip("node", "addr", "add", f"{NODE6}/64", "dev", node_end, "nodad")
        created.ip("node", "addr", "add", f"{PRESENT}/32", "dev", "lo")
        created.ip("client", "addr", "add", f"{CLIENT}/24", "dev", client_end)
        created.ip("client", "addr", "add", f"{CLIENT6}/64", "dev", client_end, "nodad")
        for prefix in ("10.96.0.0/16", "10.97.0.0/16"):
            created.ip("client", "route", "add", prefix, "via", NODE)
        created.ip("client", "-6", "route", "add", "fd00:96::/64", "via", NODE6)
        yield created


def tcp(host: str, port: int = 80, **extra: object) -> dict[str, object]:
    return {"proto": "tcp", "host": host, "port": port, **extra}


@pytest.mark.parametrize("workers", [1, 2])  # 2: the supervisor manages them
async def test_lbd_owns_its_service_addresses(net: Lab, tmp_path: Path, workers: int) -> None:
    path = tmp_path / "lbd.yaml"
    path.write_text(config(workers=workers))
    async with backend(net, "node", f"tcp:127.0.0.1:{BACKEND_PORT}"):
        async with lbd_process(path, wrapper=net.exec("node")) as lbd:
            await lbd.wait_event("lbd started", timeout=20)
            found = addresses(net)
            device = found["10.96.0.10"][0]
            assert device in ("lbd0", "lo")
            for address in ("10.96.0.10", "10.97.0.8", "fd00:96::10"):
                assert found[address][0] == device and found[address][2] == 108, found
            if device == "lo":  # the fallback this kernel (no dummy driver) exercises
                assert found["10.96.0.10"][1] == found["10.97.0.8"][1] == "lo:lbd"
            assert found[PRESENT] == ["lo", "lo", None]  # not lbd's: untouched
            served = [tcp("10.96.0.10"), tcp("10.97.0.8"), tcp(PRESENT), tcp("fd00:96::10")]
            assert (
                replies(await ask(net, "client", served))
                == [f"127.0.0.1:{BACKEND_PORT} 127.0.0.1"] * 4
            )

            # Someone else removes one: lbd puts it back (netlink event), says so.
            net.ip("node", "addr", "del", "10.96.0.10/32", "dev", device)
            restored = await lbd.wait_event("service address restored", timeout=10)
            assert restored["address"] == "10.96.0.10"
            assert "10.96.0.10" in addresses(net)
            assert replies(await ask(net, "client", [tcp("10.96.0.10")]))[0].startswith("127.")

            # A reload drops an external IP: it comes off; the one lbd did not add stays.
            path.write_text(config(external=f"'{PRESENT}'", workers=workers))
            lbd.signal(signal.SIGHUP)
            removed = await lbd.wait_event("service address removed", timeout=10)
            assert removed["address"] == "10.97.0.8"
            assert "10.97.0.8" not in addresses(net) and PRESENT in addresses(net)

            lbd.signal()
            assert await lbd.wait_exit() == 0
    left = addresses(net)
    assert not {"10.96.0.10", "10.97.0.8", "fd00:96::10"} & set(left)
    assert left[PRESENT] == ["lo", "lo", None]  # was there before lbd: still there after


async def test_a_seamless_restart_keeps_the_addresses(net: Lab, tmp_path: Path) -> None:
    path = tmp_path / "lbd.yaml"
    path.write_text(config())
    pid_file = tmp_path / "lbd.pid"
    async with lbd_process(path, "--pid-file", str(pid_file), wrapper=net.exec("node")) as old:
        await old.wait_event("lbd started", timeout=20)
        await old.wait_event("restart socket listening")
        code, _, err = await run_cli("restart", "--pid-file", str(pid_file))
        assert code == 0, err
        await old.wait_event("restart: the next lbd serves; draining and exiting", 30)
        assert await asyncio.wait_for(old.process.wait(), 30) == 0
    assert not [e for e in old.events if e.get("event") == "service address removed"]
    assert {"10.96.0.10", "10.97.0.8", "fd00:96::10"} <= set(addresses(net))
    # The successor (in the node namespace, started by the old lbd) adopted them: stopping it
    # takes them off. It is stopped by its PID, as the restart test does.
    successor = int(pid_file.read_text())
    run(["kill", "-TERM", str(successor)])
    for _ in range(100):
        if "10.96.0.10" not in addresses(net):
            break
        await asyncio.sleep(0.1)
    assert not {"10.96.0.10", "10.97.0.8", "fd00:96::10"} & set(addresses(net))


async def test_localhost_node_ports_stay_closed_to_neighbours(net: Lab, tmp_path: Path) -> None:
    """CVE-2020-8558: with route_localnet on, a neighbour that routes 127.0.0.0/8 to the node
    reaches services bound to 127.0.0.1. lbd never sets it, so the node drops such packets."""
    path = tmp_path / "lbd.yaml"
    path.write_text(config(node="0.0.0.0"))  # NodePorts on every address, 127.0.0.1 included
    client_end = net.ip("client", "-o", "link", "show", "type", "veth").split(":")[1].strip()
    client_end = client_end.split("@")[0]
    # The neighbour's own tricks: send 127.0.0.1 out of its veth, to the node.
    net.sysctl("client", f"net.ipv4.conf.{client_end}.route_localnet", "1")
    net.ip("client", "rule", "add", "pref", "100", "lookup", "local")
    net.ip("client", "rule", "del", "pref", "0")
    net.ip("client", "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "100")
    net.ip("client", "route", "add", "127.0.0.1/32", "via", NODE, "table", "100")
    async with backend(net, "node", f"tcp:127.0.0.1:{BACKEND_PORT}"):
        async with lbd_process(path, wrapper=net.exec("node")) as lbd:
            await lbd.wait_event("lbd started", timeout=20)
            flags = run(
                net.exec("node", "sh", "-c", "cat /proc/sys/net/ipv4/conf/*/route_localnet")
            )
            assert set(flags.split()) == {"0"}
            probes = [tcp(NODE, 30080), tcp("127.0.0.1", 30080)]
            assert replies(await ask(net, "client", probes, timeout=1)) == [
                f"127.0.0.1:{BACKEND_PORT} 127.0.0.1",
                "TimeoutError",  # dropped by the node as a martian destination
            ]
            # The control: had the node set route_localnet, the same packets would get in.
            node_end = net.ip("node", "-o", "link", "show", "type", "veth").split(":")[1]
            node_end = node_end.strip().split("@")[0]
            net.sysctl("node", f"net.ipv4.conf.{node_end}.route_localnet", "1")
            assert replies(await ask(net, "client", probes[1:], timeout=2)) == [
                f"127.0.0.1:{BACKEND_PORT} 127.0.0.1"
            ]
            lbd.signal()
            assert await lbd.wait_exit() == 0
