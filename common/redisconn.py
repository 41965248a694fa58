"""Redis clients built from settings, with every timeout set explicitly.

redis-py's defaults changed across versions; the socket timeout must stay above the longest
blocking command a client issues, or a healthy BLPOP would look like a dead server.
"""

from __future__ import annotations

import redis

from common.config import Settings

CONNECT_TIMEOUT_S = 2.0


def connect(settings: Settings, longest_block_s: float, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> redis.Redis:
    """A client whose socket timeout exceeds ``longest_block_s`` by a margin; binary replies.

    ``unix:///path/redis.sock`` URLs work too (TCP keep-alive is a TCP option, so it is left out there).
    """
    tcp = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=longest_block_s + 5.0,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=30,
        decode_responses=False,
        **tcp,
    )
