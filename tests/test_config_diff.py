"""The reload diff is pure: old config, new config → what has to change."""

from __future__ import annotations

from lbd.config import load_text
from lbd.config.diff import diff_configs

BASE = """
apiVersion: lbd/v1
node: {addresses: [127.0.0.5]}
services:
  - name: web
    type: NodePort
    clusterIP: 127.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
    endpoints: [127.0.1.1, 127.0.1.2]
"""
OTHER = """
  - name: db
    clusterIP: 127.96.0.11
    ports: [{port: 5432}]
    endpoints: [127.0.2.1]
"""


def diff(old: str, new: str):  # type: ignore[no-untyped-def]
    return diff_configs(load_text(old), load_text(new))


def test_identical_configs_differ_in_nothing() -> None:
    result = diff(BASE, BASE)
    assert result.empty
    assert result.describe() == []


def test_endpoint_changes_are_per_service_port() -> None:
    new = BASE.replace("[127.0.1.1, 127.0.1.2]", "[127.0.1.2, {address: 127.0.1.3, weight: 2}]")
    result = diff(BASE, new)
    assert not result.listeners_added and not result.listeners_removed
    [change] = result.routes_changed
    assert change.key == ("default/web", "http")
    assert change.endpoints_added == ("127.0.1.3:8080",)
    assert change.endpoints_removed == ("127.0.1.1:8080",)
    assert change.settings_changed == ()
    assert result.summary()["endpoints_draining"] == 1
    assert "- endpoint 127.0.1.1:8080 of default/web:http (starts draining)" in result.describe()


def test_weight_and_strategy_changes() -> None:
    new = BASE.replace("[127.0.1.1, 127.0.1.2]", "[127.0.1.1, {address: 127.0.1.2, weight: 5}]")
    new = new.replace("type: NodePort", "type: NodePort\n    strategy: least-connection")
    [change] = diff(BASE, new).routes_changed
    assert change.weights_changed == ("127.0.1.2:8080",)
    assert change.settings_changed == ("strategy",)


def test_added_and_removed_services() -> None:
    added = diff(BASE, BASE + OTHER)
    assert [s.describe() for s in added.listeners_added] == ["TCP 127.96.0.11:5432"]
    assert [r.key for r in added.routes_added] == [("default/db", "5432")]
    removed = diff(BASE + OTHER, BASE)
    assert [s.describe() for s in removed.listeners_removed] == ["TCP 127.96.0.11:5432"]
    assert removed.summary()["endpoints_draining"] == 1


def test_a_listener_that_moves_to_another_service_keeps_its_socket() -> None:
    moved = BASE.replace("name: web", "name: web2")
    result = diff(BASE, moved)
    assert not result.listeners_added and not result.listeners_removed
    assert sorted(s.describe() for s in result.listeners_repointed) == [
        "TCP 127.0.0.5:30080",
        "TCP 127.96.0.10:80",
    ]
    assert [r.key for r in result.routes_removed] == [("default/web", "http")]
    assert [r.key for r in result.routes_added] == [("default/web2", "http")]


def test_a_changed_port_number_is_a_new_listener() -> None:
    result = diff(BASE, BASE.replace("port: 80,", "port: 81,"))
    assert [s.describe() for s in result.listeners_added] == ["TCP 127.96.0.10:81"]
    assert [s.describe() for s in result.listeners_removed] == ["TCP 127.96.0.10:80"]
    assert not result.routes_added  # the named port is the same service port
