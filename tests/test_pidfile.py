"""The pid file's life, the check ``lbd reload``/``restart`` make, and deferred signals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbd.process.pidfile import (
    PidFileError,
    hand_back,
    is_lbd_run,
    read_pid,
    reclaim,
    remove_pid_file,
    running_lbd,
    write_pid_file,
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/usr/bin/python3", "-m", "lbd", "run", "lbd.yaml"], True),
        (["/opt/venv/bin/python", "/opt/venv/bin/lbd", "run", "--pid-file", "x"], True),
        (["lbd", "run", "lbd.yaml"], True),
        (["python3", "-X", "dev", "-m", "lbd", "run"], True),
        (["python3", "-m", "lbd", "status"], False),
        (["python3", "-m", "lbd.process.workerproc", "--channel=3"], False),
        (["python3", "-m", "lbd"], False),
        (["sleep", "60"], False),
        (["/usr/bin/python3", "serve.py", "lbd", "run"], False),
    ],
)
def test_is_lbd_run(argv: list[str], expected: bool) -> None:
    assert is_lbd_run(argv) is expected


def test_write_replaces_in_one_step_and_remove_takes_only_our_own(tmp_path: Path) -> None:
    path = tmp_path / "lbd.pid"
    write_pid_file(path, 4242)
    assert path.read_text() == "4242\n" and read_pid(path) == 4242
    assert [p.name for p in tmp_path.iterdir()] == ["lbd.pid"]  # no scratch file left
    remove_pid_file(path)  # names another process: not ours to remove
    assert path.exists()
    write_pid_file(path)
    assert read_pid(path) == os.getpid()
    remove_pid_file(path)
    assert not path.exists()
    remove_pid_file(path)  # already gone: nothing to do


def test_a_successor_hands_the_file_back_only_while_it_names_it(tmp_path: Path) -> None:
    path = tmp_path / "lbd.pid"
    write_pid_file(path)
    hand_back(path, 4242)
    assert read_pid(path) == 4242
    hand_back(path, 5353)  # names someone else now: left alone
    assert read_pid(path) == 4242


def test_reclaim_names_us_unless_a_third_process_has_it(tmp_path: Path) -> None:
    path = tmp_path / "lbd.pid"
    assert reclaim(path, 4242) and read_pid(path) == os.getpid()  # missing: ours again
    write_pid_file(path, 4242)
    assert reclaim(path, 4242) and read_pid(path) == os.getpid()  # the failed successor's
    assert not reclaim(path, 4242) and read_pid(path) == os.getpid()  # ours: nothing to write
    write_pid_file(path, 5353)
    assert not reclaim(path, 4242) and read_pid(path) == 5353  # another lbd's


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("lbd\n", "is not a process id"),
        ("0\n", "0 is not the process id of an lbd"),
        ("-1\n", "-1 is not the process id of an lbd"),
        (f"{os.getpid()}\n", f"process {os.getpid()} is not an lbd"),
    ],
)
def test_running_lbd_says_why_not(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "lbd.pid"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PidFileError, match=message):
        running_lbd(path)


def test_a_deferred_signal_waits_for_its_handler() -> None:
    """Blocked, SIGUSR2 (whose default ends the process) stays pending; once unblocked it
    reaches the handler installed meanwhile. A child process, so the runner's mask is kept."""
    script = textwrap.dedent(
        """
        import os, signal
        from lbd.process.pidfile import accept_signals, defer_signals
        defer_signals()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGHUP)
        assert signal.sigpending() == {signal.SIGUSR2, signal.SIGHUP}, signal.sigpending()
        seen = []
        signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
        signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
        accept_signals()
        assert sorted(seen) == sorted([signal.SIGUSR2, signal.SIGHUP]), seen
        print("handled")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout == "handled\n", result.stderr
