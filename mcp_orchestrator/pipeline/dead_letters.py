"""The dead-letter queue: a bounded ring of requests that were shed or failed."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass

from mcp_orchestrator.models import DeadLetter, DeadLetterReason, StageName, Submission

PREVIEW_CHARS = 120


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    letter: DeadLetter
    submission: Submission
    """Kept so the request can be replayed exactly; never shown to users whole."""


class DeadLetterQueue:
    """Holds at most `capacity` entries; the oldest is dropped first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, DeadLetterEntry] = OrderedDict()
        self._ids = itertools.count(1)
        self.dropped = 0
        """Entries pushed out by newer ones (shown in pipeline_status and metrics)."""

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        """A new size (a config reload): a smaller ring drops its oldest entries at once."""
        self._capacity = value
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, request_id: str, submission: Submission, stage: StageName, reason: DeadLetterReason, error: str
    ) -> DeadLetter:
        letter = DeadLetter(
            id=f"dl-{next(self._ids)}",
            request_id=request_id,
            session_id=submission.session_id,
            stage=stage,
            reason=reason,
            error=error,
            prompt_preview=preview(submission.prompt),
            created_at=time.time(),
        )
        self._entries[letter.id] = DeadLetterEntry(letter, submission)
        self._trim()
        return letter

    def get(self, letter_id: str) -> DeadLetterEntry | None:
        return self._entries.get(letter_id)

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


def preview(prompt: str) -> str:
    flat = " ".join(prompt.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
