"""Running out of file descriptors: which errors mean it, the spare descriptor that lets a
listener still take a queued connection (to reset it), and the one place that counts and logs
the connections shed for it (at accept, ``lbd.net.tcp_listener``; at connect,
``lbd.net.connect``)."""

from __future__ import annotations

import contextlib
import errno
import os

import structlog

from lbd.endpoints.route import Route

log = structlog.get_logger("lbd.tcp")

# A socket call that fails with one of these failed for lack of lbd's own resources, not the
# endpoint's: the connection is shed, not retried elsewhere or held against the endpoint.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Out of descriptors for the process (EMFILE) or the host (ENFILE): a spare one lets lbd accept
# and reset. ENOBUFS and ENOMEM are memory, which a descriptor does not free: pause.
SHEDDABLE = frozenset({errno.EMFILE, errno.ENFILE})


class SpareDescriptor:
    """One descriptor (of /dev/null) held per process, so that at the descriptor limit one
    more accept can still succeed: free it, accept, reset, close, take it back."""

    fd: int | None = None

    @classmethod
    def keep(cls) -> None:
        if cls.fd is None:
            with contextlib.suppress(OSError):
                cls.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def release(cls) -> bool:
        """Free it for a moment; False when there is none."""
        fd, cls.fd = cls.fd, None
        if fd is None:
            return False
        os.close(fd)
        return True


def out_of_descriptors(route: Route, now: float, error: OSError, where: str, shed: int) -> None:
    """Count ``shed`` connections reset for lack of a descriptor (at ``where``: accept or
    connect) and log it, at most one line a second per route."""
    refused = route.stats.downstream_cx_refused_total
    refused.fd_exhausted += shed
    if now - route.fd_exhausted_logged_at >= 1.0:
        route.fd_exhausted_logged_at = now
        log.error(
            "out of file descriptors",
            where=where,
            route=route.label,
            error=error.strerror or str(error),
            shed_total=refused.fd_exhausted,
        )
