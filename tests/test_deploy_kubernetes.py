"""deploy/kubernetes/: every document validated offline against the Kubernetes OpenAPI schemas
(the ``kubernetes-validate`` package bundles them; strict: an unknown field is an error), the
RBAC rules against what the watcher calls, and the pieces that must agree with lbd (its command
line, its config, the admin port the probes use). No cluster runs on these machines; the
sidecar's config is served for real in a network namespace standing in for the pod."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lbd.config import load_text
from tests.netns import can_make_namespaces, joined_namespaces, output_in, server_in
from tests.procs import lbd_process
from tests.support import lbd_command

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests claim, and the newest whose schemas the package bundles.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# (API group, resource, verb): every call the API watcher makes (lbd.sources), and no other.
WATCHER_CALLS = {
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "get"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
}

Doc = dict[str, Any]


def documents(name: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def one(docs: list[Doc], kind: str) -> Doc:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


def container(workload: Doc, name: str) -> Doc:
    [found] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def mounted_config(workload: Doc, docs: list[Doc], lbd: Doc) -> str:
    """The lbd.yaml that ``lbd``'s container reads: its ConfigMap, through volume and mount."""
    [mount] = [m for m in lbd["volumeMounts"] if m["mountPath"] == "/etc/lbd"]
    [volume] = [
        v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    configmap = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    text: str = configmap["data"]["lbd.yaml"]
    return text


def admin_address(config_text: str) -> tuple[str, int]:
    host, _, port = yaml.safe_load(config_text)["admin"]["address"].rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("name", ["daemonset.yaml", "sidecar.yaml"])
def test_every_document_validates(name: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_fails_validation() -> None:
    daemonset = one(documents("daemonset.yaml"), "DaemonSet")
    misspelt = copy.deepcopy(daemonset)
    misspelt["spec"]["template"]["spec"]["hostNetwrk"] = True
    wrong_type = copy.deepcopy(daemonset)
    container(wrong_type, "lbd")["livenessProbe"]["periodSeconds"] = "ten"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_cluster_role_grants_exactly_the_watchers_calls() -> None:
    docs = documents("daemonset.yaml")
    granted = {
        (group, resource, verb)
        for rule in one(docs, "ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == WATCHER_CALLS
    # ... to the account the DaemonSet runs as.
    binding, account = one(docs, "ClusterRoleBinding"), one(docs, "ServiceAccount")
    daemonset = one(docs, "DaemonSet")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "lbd-system"}
    ]
    assert (
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )


def test_daemonset_runs_on_every_node_in_its_network() -> None:
    docs = documents("daemonset.yaml")
    daemonset = one(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    lbd = container(daemonset, "lbd")
    assert lbd_command(["lbd", *lbd["args"]]).config.startswith("/etc/lbd/")
    [node_name] = [e for e in lbd["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert lbd["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert lbd["resources"]["requests"] and lbd["resources"]["limits"]
    # The kubelet shares the node's network namespace: it reaches the admin API on loopback.
    host, port = admin_address(mounted_config(daemonset, docs, lbd))
    [admin_port] = [p for p in lbd["ports"] if p["name"] == "admin"]
    assert admin_port["containerPort"] == port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert lbd[probe]["httpGet"] == {"host": host, "path": path, "port": "admin"}


def test_daemonset_config_loads() -> None:
    docs = documents("daemonset.yaml")
    daemonset = one(docs, "DaemonSet")
    config = load_text(mounted_config(daemonset, docs, container(daemonset, "lbd")), "lbd.yaml")
    assert config.source == "kubernetes" and config.services == ()


def test_sidecar_fronts_its_app_with_probes_on_the_admin_api() -> None:
    docs = documents("sidecar.yaml")
    deployment = one(docs, "Deployment")
    lbd = container(deployment, "lbd")
    assert lbd_command(["lbd", *lbd["args"]]).config == "/etc/lbd/lbd.yaml"
    text = mounted_config(deployment, docs, lbd)
    config = load_text(text, "lbd.yaml")
    [service] = config.services
    [endpoint] = service.endpoints
    assert endpoint.address == "127.0.0.1"  # the app, inside the pod
    ports = {p["name"]: p["containerPort"] for p in lbd["ports"]}
    assert ports["http"] == service.ports[0].node_port
    host, port = admin_address(text)
    assert (host, ports["admin"]) == ("0.0.0.0", port)  # probes come to the pod's IP
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert lbd[probe]["httpGet"] == {"path": path, "port": "admin"}
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"


# -- the sidecar's config, served in a stand-in for the pod -----------------------------------

POD_IP, CLIENT_IP = "10.200.79.1", "10.200.79.2"

APP = """
import http.server
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from web\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", {port}), Hello)
print("ready", flush=True)
server.serve_forever()
"""

CLIENT = """
import urllib.error, urllib.request
def ask(port, path, method="GET"):
    request = urllib.request.Request(f"http://{pod}:{{port}}{{path}}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, ""
print("app", *ask({http}, "/"))
print("healthz", ask({admin}, "/healthz")[0])
print("readyz", ask({admin}, "/readyz")[0])
print("reload", ask({admin}, "/reload", "POST")[0])
"""


@pytest.fixture
def pod_namespaces() -> Iterator[tuple[str, str]]:
    """A pod's network namespace and a client's (another pod, or the kubelet's node)."""
    if not can_make_namespaces():
        pytest.skip("needs root and ip (iproute2)")
    with joined_namespaces(("p", "q"), ([f"{POD_IP}/24"], [f"{CLIENT_IP}/24"])) as spaces:
        yield spaces


@pytest.mark.slow
async def test_sidecar_config_serves_the_app_in_a_pod(
    pod_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    """What the kubelet and the pod's clients see: the app through lbd on the pod's IP, the
    probes answered there, and the admin API refusing changes from outside."""
    pod, client = pod_namespaces
    docs = documents("sidecar.yaml")
    deployment = one(docs, "Deployment")
    lbd = container(deployment, "lbd")
    text = mounted_config(deployment, docs, lbd)
    (tmp_path / "lbd.yaml").write_text(text)
    ports = {p["name"]: p["containerPort"] for p in lbd["ports"]}
    [endpoint] = load_text(text, "lbd.yaml").services[0].endpoints
    async with server_in(pod, APP.format(port=endpoint.ports[0][1])):
        async with lbd_process(tmp_path / "lbd.yaml", wrapper=["ip", "netns", "exec", pod]) as lbd:
            await lbd.wait_event("lbd started", timeout=20)
            code = CLIENT.format(pod=POD_IP, http=ports["http"], admin=ports["admin"])
            assert await output_in(client, code) == [
                "app 200 hello from web",
                "healthz 200",
                "readyz 200",
                "reload 401",  # no tokenFile: POST over TCP is refused
            ]
            lbd.signal()
            assert await lbd.wait_exit() == 0
