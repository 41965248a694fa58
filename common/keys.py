"""The only place Redis key names are built.

Every key lives under one configurable prefix so that several deployments (or tests) can share a
Redis server without seeing each other's data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under ``prefix`` (default ``redbatch``)."""

    prefix: str = "redbatch"

    def queue(self, model: str, priority: str = "normal") -> str:
        """List of request frames for ``model`` at ``priority``: the API RPUSHes, workers pop from
        the left. Normal priority keeps the plain name; ``high`` and ``low`` add a suffix."""
        base = f"{self.prefix}:queue:{model}"
        return base if priority == "normal" else f"{base}:{priority}"

    def wake(self, model: str) -> str:
        """The doorbell of ``model``'s queue: a list of at most one element that idle workers BLPOP."""
        return f"{self.prefix}:wake:{model}"

    def reply(self, request_id: str) -> str:
        """List that receives the one reply frame for a request; it always carries a TTL."""
        return f"{self.prefix}:reply:{request_id}"

    def inflight(self, worker_id: str) -> str:
        """List of frames a worker has taken but not yet answered (crash recovery)."""
        return f"{self.prefix}:inflight:{worker_id}"

    def worker(self, worker_id: str) -> str:
        """Hash describing a live worker; it expires unless the worker's heartbeat renews it."""
        return f"{self.prefix}:worker:{worker_id}"

    def workers(self) -> str:
        """Set of worker ids that registered; a member whose worker hash expired is dead."""
        return f"{self.prefix}:workers"

    def stats(self, model: str) -> str:
        """Hash of counters per model: requests, batches, items, errors, expired."""
        return f"{self.prefix}:stats:{model}"

    def inflight_pattern(self) -> str:
        """SCAN pattern matching every worker's in-flight list."""
        return f"{self.prefix}:inflight:*"

    def worker_id_of_inflight(self, key: str) -> str:
        """The worker id encoded in an in-flight key."""
        return key[len(self.prefix) + len(":inflight:") :]
