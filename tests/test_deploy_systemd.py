"""deploy/systemd/lbd.service: read by systemd's own checker (``systemd-analyze verify`` and
its offline security review), and its command lines by lbd's own argument parser."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import lbd_command

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "lbd.service"
INSTALLED_LBD = "/usr/local/bin/lbd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (.ci/run installs systemd)"
)


def entries(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → its values in order (a key may repeat, as SystemCallFilter= does)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def test_unit_is_a_hardened_notify_service() -> None:
    unit = entries(UNIT.read_text())
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "all"  # the successor of a seamless restart
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.KillMode"] == "mixed"  # SIGTERM to lbd only: workers drain in order
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.WatchdogSec"] and one["Service.LimitNOFILE"] == "1048576"
    assert one["Service.AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["Service.CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "lbd",
    }.items():
        assert one[f"Service.{key}"] == value, key
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_command_lines_are_lbd_command_lines() -> None:
    one = {key: values[-1] for key, values in entries(UNIT.read_text()).items()}
    run = lbd_command(shlex.split(one["Service.ExecStart"]))
    check = lbd_command(shlex.split(one["Service.ExecStartPre"]))
    assert run.command == "run" and check.command == "check" and run.config == check.config
    # The pid file (and so the restart socket beside it) lives in the unit's RuntimeDirectory.
    assert Path(run.pid_file).parent == Path("/run") / one["Service.RuntimeDirectory"]
    assert lbd_command(["lbd", "reload", "--pid-file", run.pid_file]).command == "reload"


def verify(unit_text: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` of the unit with lbd at a path that exists here (verify
    checks that ExecStart's program is executable); returns what it reported."""
    lbd = shutil.which("lbd", path=str(Path(sys.executable).parent))
    assert lbd is not None, "lbd is installed in the test environment"
    path = tmp_path / "lbd.service"
    path.write_text(unit_text.replace(INSTALLED_LBD, lbd))
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    return f"exit {done.returncode}: {done.stdout}{done.stderr}".strip()


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == "exit 0:"


@needs_analyze
def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    assert "Unknown key" in verify(broken, tmp_path)


@needs_analyze
def test_exposure_stays_low(tmp_path: Path) -> None:
    """systemd's own review of the sandbox: 0 (locked down) to 10 (none); 2.5 at most."""
    path = tmp_path / "lbd.service"
    path.write_text(UNIT.read_text())
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=25", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "Overall exposure level for lbd.service" in done.stdout
