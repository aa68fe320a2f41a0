"""What TCP and UDP listeners share: following their route's pool.

A listener listens only while its service port has a usable endpoint (kube-proxy's REJECT, see
``lbd.net.tcp_listener`` and ``lbd.net.udp_proxy``), so it watches the pool of the route it
serves; a reload may give it another route, whose pool it watches from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbd.endpoints.pool import Pool
    from lbd.endpoints.route import Route


class PoolFollower:
    """Mixin for a listener: ``_pool_changed`` runs after every change of its route's pool."""

    __slots__ = ("_unwatch",)  # set to None by the listener's __init__
    route: Route
    _unwatch: Callable[[], None] | None

    def _pool_changed(self, pool: Pool) -> None:
        raise NotImplementedError

    def _follow(self) -> None:
        """Watch the pool of ``self.route`` (which a reload may just have changed), and no
        longer the one watched before."""
        self._unfollow()
        self._unwatch = self.route.pool.watch(self._pool_changed)

    def _unfollow(self) -> None:
        unwatch = self._unwatch
        if unwatch is not None:
            unwatch()
            self._unwatch = None
