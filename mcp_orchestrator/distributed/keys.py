"""Names of everything this orchestrator keeps in Redis, all under one configurable prefix.

User text never appears in a name: answer keys are already SHA-256 digests of the request
(pipeline/coalesce.answer_key), and session ids and backend names are hashed here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def digest(text: str) -> str:
    """A short, fixed-size stand-in for `text` in a key name (128 bits of SHA-256)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    @property
    def events(self) -> str:
        """The pub/sub channel: flight results and breaker openings."""
        return f"{self.prefix}:events"

    def answer(self, key: str) -> str:
        """A cached answer (expires after deduplication.window_s)."""
        return f"{self.prefix}:answer:{key}"

    @property
    def answer_index(self) -> str:
        """Sorted set of cached answers by time stored: the size bounds evict the oldest."""
        return f"{self.prefix}:answers"

    @property
    def answer_sizes(self) -> str:
        """Hash: cached answer -> its size in bytes (for the byte bound)."""
        return f"{self.prefix}:answer-sizes"

    def lock(self, key: str) -> str:
        """A flight's lock: held by the process calling the backend for `key`."""
        return f"{self.prefix}:flight:{key}"

    def followed(self, key: str) -> str:
        """Present while some process follows the flight for `key`: its leader publishes the outcome."""
        return f"{self.prefix}:followed:{key}"

    def bucket(self, scope: str) -> str:
        """A rate-limit bucket's state (its theoretical arrival time)."""
        return f"{self.prefix}:bucket:{scope}"

    def session_bucket(self, session_id: str) -> str:
        return self.bucket(f"session:{digest(session_id)}")

    def breaker(self, backend: str) -> str:
        """Present while some process holds `backend`'s breaker open."""
        return f"{self.prefix}:breaker:{digest(backend)}"

    @property
    def breaker_pattern(self) -> str:
        return f"{self.prefix}:breaker:*"

    @property
    def dead_letters(self) -> str:
        """The capped stream of dead letters."""
        return f"{self.prefix}:dead-letters"

    def replay_claim(self, letter_id: str) -> str:
        """Set once by the process that replays a dead letter."""
        return f"{self.prefix}:replayed:{letter_id}"

    def job(self, job_id: str) -> str:
        """A task's or background request's record (distributed/jobs.py)."""
        return f"{self.prefix}:job:{digest(job_id)}"
