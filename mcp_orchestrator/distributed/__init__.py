"""State shared with other orchestrator processes through Redis ([distributed] redis_url).

Imported only when sharing is configured, so a single process pays nothing for it.
One idea per module: link (connection, timeouts, health), keys (names), flights (single
flight across processes), cache (shared answers), limits (global GCRA buckets), breakers
(shared openings), dead_letters (capped stream, replay claims), events (the subscription),
shared (all of them together, with their background tasks).
"""

from mcp_orchestrator.distributed.link import RedisUnavailable
from mcp_orchestrator.distributed.shared import SharedState

__all__ = ["RedisUnavailable", "SharedState"]
