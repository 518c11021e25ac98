"""grpc.health.v1 with a bound on open ``Watch`` streams.

grpcio-health-checking's asyncio servicer keeps every ``Watch`` open until the client leaves
(10-20 KB each on the server), and health answers without a token by default
(``--auth-exempt-health``): a client that opens Watch streams by the thousand would grow the
server's memory without limit. This servicer refuses the Watch streams beyond
``--max-health-watchers`` with RESOURCE_EXHAUSTED before they hold anything; ``Check`` (what
load balancers and Kubernetes probes call) is never limited.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health

from server.observability.observer import Observer
from server.types import LimitReason


class BoundedHealthServicer(health.aio.HealthServicer):
    """``health.aio.HealthServicer`` with at most ``max_watchers`` concurrent ``Watch`` streams
    (0: unlimited)."""

    def __init__(self, max_watchers: int, observer: Observer | None = None):
        super().__init__()
        self.max_watchers = max_watchers
        self.observer = observer or Observer()  # counts refusals (``max_health_watchers``)
        self.watchers = 0  # Watch streams open now
        self.refused = 0  # Watch streams refused over the cap, since start

    async def Watch(self, request, context) -> None:
        if self.max_watchers and self.watchers >= self.max_watchers:
            self.refused += 1
            self.observer.limit_hit(LimitReason.HEALTH_WATCHERS)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watchers} Health.Watch streams are open, the server's limit "
                                f"(--max-health-watchers); use Health.Check, or retry later")
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1
