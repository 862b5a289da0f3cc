"""The dead-letter queue: a bounded ring of requests that were shed or failed.

Bounded twice: by entries (`capacity`) and by bytes (`max_bytes`), since each letter keeps
its whole submission for replay and one prompt may be 200,000 characters. Whichever bound
is passed, the oldest letters go first; the newest letter is always kept.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mcp_orchestrator.models import DeadLetter, DeadLetterReason, StageName, Submission

PREVIEW_CHARS = 120
LETTER_OVERHEAD = 2048
"""Bytes a letter costs besides its texts: the letter and submission models (tracemalloc: ~2,030)."""


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    letter: DeadLetter
    submission: Submission
    """Kept so the request can be replayed exactly; never shown to users whole."""
    size: int
    """Bytes it costs, for the byte budget."""


class DeadLetterQueue:
    """Holds at most `capacity` entries and `max_bytes` bytes; the oldest are dropped first."""

    def __init__(self, capacity: int, max_bytes: int) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, DeadLetterEntry] = OrderedDict()
        self._replayed: set[str] = set()
        """Ids whose one replay was claimed here (without Redis; forgotten with the letter)."""
        self._ids = itertools.count(1)
        self.held_bytes = 0
        self.dropped = 0
        """Entries pushed out by newer ones (shown in pipeline_status and metrics)."""
        self.id_prefix = "dl-"
        """Sharing through Redis makes it unique per process (dl-<node tag>-<n>)."""
        self.on_add: Callable[[DeadLetterEntry], None] | None = None
        """Told of each letter written here (sharing appends it to the Redis stream)."""

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        """A new size (a config reload): a smaller ring drops its oldest entries at once."""
        self._capacity = value
        self._trim()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """A new byte budget (a config reload): applied at once, like `capacity`."""
        self._max_bytes = value
        self._trim()

    def _trim(self) -> None:
        entries = self._entries
        while len(entries) > self._capacity or (self.held_bytes > self._max_bytes and len(entries) > 1):
            dropped_id, oldest = entries.popitem(last=False)
            self._replayed.discard(dropped_id)
            self.held_bytes -= oldest.size
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        request_id: str,
        submission: Submission,
        stage: StageName,
        reason: DeadLetterReason,
        error: str,
        job_id: str | None = None,
    ) -> DeadLetter:
        letter = DeadLetter(
            id=f"{self.id_prefix}{next(self._ids)}",
            request_id=request_id,
            job_id=job_id,
            session_id=submission.session_id,
            stage=stage,
            reason=reason,
            error=error,
            prompt_preview=preview(submission.prompt),
            created_at=time.time(),
        )
        entry = DeadLetterEntry(letter, submission, letter_size(submission, error))
        self._hold(entry)
        if self.on_add is not None:
            self.on_add(entry)
        return letter

    def add_shared(self, letter: DeadLetter, submission: Submission) -> None:
        """Hold a letter another process wrote (read from Redis); one already held is kept as is."""
        if letter.id not in self._entries:
            self._hold(DeadLetterEntry(letter, submission, letter_size(submission, letter.error)))

    def _hold(self, entry: DeadLetterEntry) -> None:
        self._entries[entry.letter.id] = entry
        self.held_bytes += entry.size
        self._trim()

    def get(self, letter_id: str) -> DeadLetterEntry | None:
        return self._entries.get(letter_id)

    def claim(self, letter_id: str) -> bool:
        """Claim the one replay of a letter this queue holds; False when it was claimed already."""
        if letter_id in self._replayed or letter_id not in self._entries:
            return False
        self._replayed.add(letter_id)
        return True

    def release(self, letter_id: str) -> None:
        """Give back a claim whose replay never ran."""
        self._replayed.discard(letter_id)

    def list(
        self, limit: int, reason: DeadLetterReason | None = None, session_id: str | None = None
    ) -> list[DeadLetter]:
        """Newest first."""
        found: list[DeadLetter] = []
        for entry in reversed(self._entries.values()):
            letter = entry.letter
            if reason is not None and letter.reason != reason:
                continue
            if session_id is not None and letter.session_id != session_id:
                continue
            found.append(letter)
            if len(found) >= limit:
                break
        return found


def letter_size(submission: Submission, error: str) -> int:
    """What a letter costs: its texts as Python holds them, and the models around them."""
    texts = sys.getsizeof(submission.prompt) + sys.getsizeof(error)
    if submission.system is not None:
        texts += sys.getsizeof(submission.system)
    texts += sum(sys.getsizeof(stop) for stop in submission.params.stop or ())
    return texts + LETTER_OVERHEAD


def preview(prompt: str) -> str:
    flat = " ".join(prompt.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
