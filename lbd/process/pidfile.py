"""The pid file, and the signals that reach lbd through it.

``lbd reload`` sends SIGHUP and ``lbd restart`` SIGUSR2 to the pid in the file. The default
action of both is to end the process, and lbd writes the file before it serves (a successor
even before it has taken its predecessor's sockets): a signal that came before its handler
existed ended the process it was meant to reach. So ``lbd run`` blocks both
(``defer_signals``) before it writes the file and unblocks them (``accept_signals``) once their
handlers are in place: a signal sent meanwhile stays pending and is handled then, late but not
lost and never fatal. Processes started in between inherit the blocked mask, which keeps a
stray signal from ending them too.

The file names the lbd that serves. It is replaced in one step (a reader sees the old pid or
the new one, never a partial file), removed on exit only by the process it names, and a
successor that never served gives it back to the predecessor that still serves
(``hand_back``), as the predecessor itself does when it sees the successor fail
(``reclaim``). ``running_lbd`` is what ``lbd reload`` and ``lbd restart`` check before they
signal: a pid file left by an lbd that died names a process that exited, or a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

DEFERRED = frozenset({signal.SIGHUP, signal.SIGUSR2})


class PidFileError(Exception):
    """The pid file does not name a running ``lbd run`` (the message says why)."""


def defer_signals() -> None:
    """Hold SIGHUP and SIGUSR2 until ``accept_signals``: pending, not acted on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)


def accept_signals() -> None:
    """Their handlers exist: deliver what is pending and what comes."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED)


def write_pid_file(path: str | Path, pid: int | None = None) -> None:
    """Make ``path`` name ``pid`` (default: this process), replacing it in one step."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(f"{os.getpid() if pid is None else pid}\n")
    os.replace(scratch, path)


def read_pid(path: str | Path) -> int | None:
    """The pid ``path`` names; None when it is missing or holds no pid."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def remove_pid_file(path: str | Path) -> None:
    """On exit: remove the file if it names this process (after a restart it names the
    successor, which is not ours to remove)."""
    if read_pid(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


def hand_back(path: str | Path, predecessor: int) -> None:
    """A successor that never served exits: the file names the lbd that still serves again."""
    if read_pid(path) == os.getpid():
        write_pid_file(path, predecessor)


def reclaim(path: str | Path, failed: int) -> bool:
    """Our successor ``failed`` (it exited, or gave up): the file names this process again,
    unless it names a third one. True when it was written."""
    named = read_pid(path)
    if named is not None and named != failed:
        return False  # ours already (the successor handed it back), or another lbd's
    write_pid_file(path)
    return True


def running_lbd(path: str | Path) -> int:
    """The pid ``path`` names if that process is a running ``lbd run``; PidFileError otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise PidFileError(error.strerror or str(error)) from None
    try:
        pid = int(text.strip())
    except ValueError:
        raise PidFileError(f"{text.strip()[:40]!r} is not a process id") from None
    if pid <= 1:  # os.kill(0 or -1, ...) would signal our own process group or every process
        raise PidFileError(f"{pid} is not the process id of an lbd")
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise PidFileError(f"no process {pid} runs (a stale pid file: lbd exited)") from None
    except OSError as error:
        raise PidFileError(f"process {pid}: {error.strerror or error}") from None
    if not any(argv):
        raise PidFileError(f"no process {pid} runs (it has exited)")
    if not is_lbd_run([os.fsdecode(arg) for arg in argv if arg]):
        raise PidFileError(f"process {pid} is not an lbd (a stale pid file, its pid reused)")
    return pid


def is_lbd_run(argv: list[str]) -> bool:
    """Whether a command line is ``lbd run ...``: the ``lbd`` script (as its interpreter runs
    it: ``python /usr/bin/lbd run``) or ``python -m lbd run``."""
    for index, word in enumerate(argv[:6]):
        program = word == "lbd" and index > 0 and argv[index - 1] == "-m"
        if program or (index < 2 and os.path.basename(word) == "lbd"):
            return argv[index + 1 : index + 2] == ["run"]
    return False
