"""The RBAC rules shipped in deploy/kubernetes cover every API call the watcher makes
(``lbd.sources.kube_client.API_CALLS``), and grant nothing beyond reading those resources.

The DaemonSet's ServiceAccount is followed through its (Cluster)RoleBindings to the rules, as
the API server's authorizer would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lbd.sources.kube_client import API_CALLS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
Obj = dict[str, Any]
Call = tuple[str, str, str]  # (apiGroup, resource, verb)
# Read access the watcher may hold beyond what it calls: `get` of the resources it watches
# (the issue asks `get` on nodes, as kube-proxy's role has).
READ_EXTRA = {(group, resource, "get") for group, resource, _ in API_CALLS}


def service_account_of(objects: list[Obj]) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount lbd's DaemonSet runs as."""
    [daemonset] = [o for o in objects if o.get("kind") == "DaemonSet"]
    namespace = daemonset["metadata"].get("namespace", "default")
    pod = daemonset["spec"]["template"]["spec"]
    return namespace, pod.get("serviceAccountName") or pod.get("serviceAccount") or "default"


def granted(objects: list[Obj], account: tuple[str, str]) -> set[Call]:
    """Every (apiGroup, resource, verb) the roles bound to ``account`` allow ("*" kept)."""
    namespace, name = account
    roles = {
        (o["kind"], o["metadata"]["name"]): o
        for o in objects
        if o.get("kind") in ("ClusterRole", "Role")
    }
    calls: set[Call] = set()
    for binding in objects:
        if binding.get("kind") not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == name
            and s.get("namespace", binding["metadata"].get("namespace")) == namespace
            for s in subjects
        ):
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], ref["name"]))
        assert role is not None, f"{binding['metadata']['name']} binds a role not in deploy/"
        for rule in role.get("rules") or []:
            calls |= {
                (group, resource, verb)
                for group in rule.get("apiGroups") or [""]
                for resource in rule.get("resources") or []
                for verb in rule.get("verbs") or []
            }
    return calls


def allows(calls: set[Call], wanted: Call) -> bool:
    return any(
        all(have in ("*", want) for have, want in zip(call, wanted, strict=True)) for call in calls
    )


def check(objects: list[Obj]) -> tuple[list[Call], list[Call]]:
    """(calls the watcher makes that are not granted, grants beyond read access)."""
    calls = granted(objects, service_account_of(objects))
    missing = [call for call in API_CALLS if not allows(calls, call)]
    extra = sorted(call for call in calls if call not in {*API_CALLS, *READ_EXTRA})
    return missing, extra


def test_the_daemonset_role_grants_exactly_the_calls_lbd_makes() -> None:
    objects = [
        doc
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict)
    ]
    missing, extra = check(objects)
    assert missing == [], "the ClusterRole lacks calls lbd makes"
    assert extra == [], "the ClusterRole grants more than reading what lbd watches"


def _role(rules: list[Obj]) -> list[Obj]:
    """A DaemonSet, its ServiceAccount, and a ClusterRole with ``rules`` bound to it."""
    return [
        {
            "kind": "DaemonSet",
            "metadata": {"name": "lbd", "namespace": "kube-system"},
            "spec": {"template": {"spec": {"serviceAccountName": "lbd"}}},
        },
        {"kind": "ServiceAccount", "metadata": {"name": "lbd", "namespace": "kube-system"}},
        {"kind": "ClusterRole", "metadata": {"name": "lbd"}, "rules": rules},
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "lbd"},
            "roleRef": {"kind": "ClusterRole", "name": "lbd"},
            "subjects": [{"kind": "ServiceAccount", "name": "lbd", "namespace": "kube-system"}],
        },
    ]


def test_the_check_itself_finds_missing_and_excess_grants() -> None:
    exact = [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    ]
    assert check(_role(exact)) == ([], [])
    assert check(_role(exact[:2])) == ([("", "nodes", "list"), ("", "nodes", "watch")], [])
    wild = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
    assert check(_role(wild)) == ([], [("*", "*", "*")])
    writes = [*exact, {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]}]
    assert check(_role(writes)) == ([], [("", "services", "patch")])
    unbound = _role(exact)
    unbound[3]["subjects"][0]["namespace"] = "default"  # another namespace's account
    assert check(unbound)[0] == list(API_CALLS)
