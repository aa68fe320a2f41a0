"""``GET /config`` and the config hash cover every setting: a config that sets every tunable (in
``defaults`` and in a service) and every Service field to a non-default value renders to a
document that ``lbd check`` accepts and that loads back to an equal model, and changing any one
of them changes the hash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lbd.admin.client import call
from lbd.cli import main
from lbd.config import load_text
from lbd.config.model import Config, Tunables
from lbd.config.render import config_hash
from lbd.config.tunables import TUNABLE_KEYS
from tests.support import admin_running
from tests.test_admin import TOKEN, token_admin

# A value other than the built-in default for every tunable, as YAML flow text.
NON_DEFAULT = {
    "strategy": "least-connection",
    "connectTimeout": "250ms",
    "idleTimeout": "1h30m",
    "drainTimeout": "5s",
    "udpIdleTimeout": "10s",
    "maxUdpSessions": "100",
    "udpResponses": "2",
    "udpSessionRate": "50",
    "halfClosedTimeout": "7s",
    "maxConnectionDuration": "2h",
    "accessLog": "true",
    "splice": "off",
    "healthCheck": "{type: http, interval: 2s, timeout: 500ms, jitter: 100ms, "
    "healthyThreshold: 3, unhealthyThreshold: 4, path: /healthz, host: example.org, "
    "expectStatus: 200-299}",
    "outlierDetection": "{consecutiveFailures: 3, baseEjectionTime: 10s, maxEjectionTime: 60s, "
    "maxEjectionPercent: 50}",
    "slowStart": "30s",
    "maxConnections": "100",
    "maxConnectionsPerEndpoint": "5",
    "maxQueue": "20",
    "queueTimeout": "2s",
    "proxyProtocol": "v2",
    "acceptProxyProtocolFrom": "[127.0.0.0/8, '::1']",
    "hashOn": "clientIPPort",
    "maglevTableSize": "13",
    "faults": "[{type: latency, direction: both, latency: 50ms, jitter: 5ms, probability: 0.5, "
    "endpoints: [127.0.1.1, '127.0.1.2:8081']}, {type: bandwidth, rate: 1MiB}, "
    "{type: refuse, probability: 0.1}]",
    "mirror": "{endpoint: '127.0.1.9:8080', percent: 50}",
}
# Another value still, for the service, so that it differs from defaults too.
OTHER = {
    **NON_DEFAULT,
    "strategy": "random",
    "connectTimeout": "2s",
    "healthCheck": "{type: tcp, send: PING, expect: PONG}",
    "outlierDetection": "{enabled: false}",
    "maxConnections": "none",
    "proxyProtocol": "none",
    "maglevTableSize": "7",
    "faults": "[{type: slicer, averageSize: 100, sizeVariation: 10, delay: 1ms}]",
    "mirror": "none",
}
SEMANTICS = (
    "    sessionAffinity: ClientIP\n"
    "    sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
    "    internalTrafficPolicy: Local\n"
    "    externalTrafficPolicy: Local\n"
    "    trafficDistribution: PreferClose\n"
    "    publishNotReadyAddresses: true\n"
    "    loadBalancerSourceRanges: [127.0.0.0/8]\n"
    "    healthCheckNodePort: 31100\n"
    "    labels: {app: web}\n"
)


ADMIN = "{address: 127.0.0.1:0}"


def config_text(admin: str, defaults: dict[str, str], service: dict[str, str]) -> str:
    tunables = "".join(f"    {key}: {value}\n" for key, value in service.items())
    return (
        "apiVersion: lbd/v1\n"
        "node: {name: node-a, zone: z1, addresses: [127.0.0.5], nodePortRange: 31000-31999}\n"
        f"admin: {admin}\n"
        "dns: {servers: ['127.0.0.53:5353'], minTtl: 2s, maxTtl: 60s, timeout: 1s}\n"
        "workers: 2\n"
        "defaults:\n" + "".join(f"  {k}: {v}\n" for k, v in defaults.items()) + "services:\n"
        "  - name: web\n"
        "    namespace: shop\n"
        "    type: LoadBalancer\n"
        "    clusterIP: 127.0.0.9\n"
        "    externalIPs: [127.0.0.6]\n"
        "    loadBalancerIPs: [127.0.0.7]\n"
        "    ports: [{name: http, port: 80, targetPort: http, nodePort: 31080}]\n"
        "    endpoints:\n"
        "      - {address: 127.0.1.1, ports: {http: 8080}, weight: 3}\n"
        "      - {address: 127.0.1.2, ports: {http: 8081}, ready: false, serving: true,"
        " terminating: true, nodeName: node-b, zone: z2}\n" + SEMANTICS + tunables
    )


def test_the_tables_name_every_tunable() -> None:
    assert set(NON_DEFAULT) == set(TUNABLE_KEYS)


async def test_get_config_round_trips_every_field(tmp_path: Path) -> None:
    cfg = load_text(config_text(token_admin(tmp_path), NON_DEFAULT, OTHER), "<test>")
    every_field_set = [f.name for f in dataclasses.fields(Tunables)]
    assert all(getattr(cfg.defaults, name) != getattr(Tunables(), name) for name in every_field_set)
    assert cfg.services[0].tunables not in (cfg.defaults, Tunables())
    async with admin_running(cfg) as (_, target):
        code, body = await call(target, "/config")
    assert code == 200 and TOKEN not in json.dumps(body)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(json.dumps(body))
    assert main(["check", str(rendered)]) == 0
    again = load_text(rendered.read_bytes(), str(rendered))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def hashed(admin: str, defaults: dict[str, str], service: dict[str, str]) -> tuple[Config, str]:
    cfg = load_text(config_text(admin, defaults, service), "<test>")
    return cfg, config_hash(cfg)


@pytest.mark.parametrize("key", TUNABLE_KEYS)
def test_changing_any_one_tunable_changes_the_hash(key: str) -> None:
    admin = ADMIN
    base_service = {k: v for k, v in OTHER.items() if k != key}  # inherits ``key`` from defaults
    base, base_hash = hashed(admin, NON_DEFAULT, base_service)
    # The service sets the key to another value than the one it inherited.
    service_value = OTHER[key] if OTHER[key] != NON_DEFAULT[key] else None
    if service_value is not None:
        changed, changed_hash = hashed(admin, NON_DEFAULT, {**base_service, key: service_value})
        assert changed != base and changed_hash != base_hash
    # The defaults' value changes (the service inherits it).
    defaults = {k: v for k, v in NON_DEFAULT.items() if k != key}
    changed, changed_hash = hashed(admin, defaults, base_service)
    assert changed != base and changed_hash != base_hash


@pytest.mark.parametrize("line", SEMANTICS.splitlines())
def test_changing_any_service_field_changes_the_hash(line: str) -> None:
    full = config_text(ADMIN, NON_DEFAULT, OTHER)
    without = full.replace(line + "\n", "")
    # Fields that only exist together with the one removed go with it.
    if "sessionAffinity: ClientIP" in line:
        without = without.replace(SEMANTICS.splitlines()[1] + "\n", "")
    if "externalTrafficPolicy" in line:
        without = without.replace("    healthCheckNodePort: 31100\n", "")
    assert config_hash(load_text(full, "<t>")) != config_hash(load_text(without, "<t>"))
