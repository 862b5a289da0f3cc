"""Data shapes shared by the pipeline, the workers and the MCP surface, and the limits of
the values a user may give (one declaration each: the `infer` and `configure_worker`
arguments and the config file all use these).

Depends on nothing but pydantic, so any layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

# ---------------------------------------------------------------------------- limits of user values

MaxTokens = Annotated[int, Strict(), Field(ge=1, le=1_000_000)]
Temperature = Annotated[float, Strict(), Field(ge=0, le=2)]
TopP = Annotated[float, Strict(), Field(gt=0, le=1)]
Seed = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
StopSequence = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[StopSequence], Field(max_length=16)]
MAX_STOP_SEQUENCES = 16


class Priority(StrEnum):
    """Scheduling class of a request; higher classes are served first."""

    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def rank(self) -> int:
        """0 for critical ... 3 for low: smaller ranks are served first."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.critical: 0, Priority.high: 1, Priority.normal: 2, Priority.low: 3}


class StageName(StrEnum):
    rag = "rag"
    assemble = "assemble"
    inference = "inference"
    post_process = "post_process"
    stream = "stream"


STAGE_ORDER: tuple[StageName, ...] = tuple(StageName)


@dataclass(frozen=True, slots=True)
class Whereabouts:
    """Where a request is (Pipeline.locate), for the status of a long call."""

    stage: StageName
    position: int | None
    """Its place in the inference queue (1 = next) while it waits there; None elsewhere."""
    chunks: int
    """Answer chunks streamed so far (about one token each)."""
    ended: bool


class Outcome(IntEnum):
    """How a request ended; exactly one per submitted request."""

    completed = 1
    failed = 2
    shed = 3
    cancelled = 4


class DeadLetterReason(StrEnum):
    queue_full = "queue_full"
    deadline_exceeded = "deadline_exceeded"
    stage_timeout = "stage_timeout"
    worker_error = "worker_error"
    internal_error = "internal_error"


class Message(BaseModel):
    """One chat message as the workers receive it."""

    model_config = ConfigDict(frozen=True)

    role: str
    content: str


class GenerationParams(BaseModel):
    """Everything besides the messages that can change a backend's answer (unset: the worker's own)."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Usage(BaseModel):
    """Token counts as the backend reported them (or as the worker estimated them)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    input_tokens: int = 0
    """Tokens in the prompt the backend received (system prompt and context included)."""
    output_tokens: int = 0
    """Tokens generated."""


class StageTimings(BaseModel):
    """Milliseconds spent in each stage (queueing before it included); all 0 for an answer
    shared from another request's trip or taken from the cache."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    rag: float = 0.0
    assemble: float = 0.0
    inference: float = 0.0
    post_process: float = 0.0
    stream: float = 0.0
    admission: float = 0.0
    """Time spent waiting for a rate-limit token (0 when none was needed)."""


BreakerStateName = Literal["closed", "open", "half_open"]


class Hop(BaseModel):
    """One backend call that did not give the answer (a retry or a fallback step)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    worker: str
    error: str
    status: int | None = None
    breaker: BreakerStateName
    """The backend's breaker state right after this call."""


class Provenance(BaseModel):
    """Where an answer came from."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    worker: str
    """The backend (breaker name) that produced the answer."""
    attempts: int = Field(ge=0)
    """Backend calls made for this request, failed ones included (fast-failed open breakers are not calls)."""
    retries: int = Field(default=0, ge=0)
    """Times the whole worker (pool or chain included) was called again after a retryable failure."""
    fallbacks: list[Hop] = Field(default_factory=list)
    """Every failed call or skipped backend, in order."""
    breaker: BreakerStateName
    """The answering backend's breaker state after the answer."""


class InferResult(BaseModel):
    """The structured result of one `infer` call."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    request_id: str
    """This request's id (dead letters and logs name it too)."""
    text: str
    """The answer, after stop sequences and length caps (the same text as the text content)."""
    worker: str
    """Kind of the worker that answered (echo, llama_cpp, open_ai, pool, ...)."""
    model: str
    """Model that answered."""
    usage: Usage
    finish_reason: str | None = None
    """Why generation ended: stop, length, or the backend's own reason."""
    latency_ms: float
    """Milliseconds from submission to the answer, inside the pipeline."""
    stage_ms: StageTimings
    coalesced: bool = False
    """Whether the answer was shared from an identical request in flight."""
    cached: bool = False
    """Whether the answer came from the result cache."""
    attempts: int = Field(default=1, ge=0)
    """Backend calls this request made itself (0 when the answer was shared or cached)."""
    provenance: Provenance | None = None
    """Which backend answered, after how many calls, and which hops failed on the way."""


class DeadLetter(BaseModel):
    """A request that did not complete: shed by a full stage or failed for good."""

    id: str
    request_id: str
    job_id: str | None = None
    """The task or background request it belonged to (request_status / tasks/get take this id)."""
    session_id: str | None
    stage: StageName
    reason: DeadLetterReason
    error: str
    prompt_preview: str
    created_at: float


class Submission(BaseModel):
    """One `infer` call as the pipeline receives it; kept with dead letters for replay."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    session_id: str | None = None
    priority: Priority = Priority.normal
    system: str | None = None
    params: GenerationParams = GenerationParams()
    deadline_ms: int | None = None
    dedup: bool = True
    cache: bool = True


# ---------------------------------------------------------------------------- status


class StageStatus(BaseModel):
    name: StageName
    enabled: bool
    """False when the config switched the stage off: requests skip it."""
    depth: int
    capacity: int
    processed: int
    shed: int


class Totals(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    submitted: int
    completed: int
    failed: int
    shed: int
    cancelled: int
    in_flight: int
    coalesced: int
    cache_hits: int
    dead_letters: int
    backend_calls_saved: int = 0
    """Requests answered without a backend call of their own (coalesced + cache hits)."""
    rate_limited: int = 0
    """Requests refused by admission control (counted in failed too)."""


class Percentiles(BaseModel):
    p50: float
    p95: float
    p99: float


class RateLimitStatus(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    enabled: bool
    requests_per_second: float
    burst_capacity: int
    tokens_available: float | None = None
    waiting: int = 0
    refused: int = 0
    """Requests refused because no token could come before their deadline."""
    per_session_rps: float | None = None
    per_session_burst: int | None = None
    sessions_tracked: int = 0
    """Sessions holding a per-session bucket (idle ones are forgotten: a full bucket is as good as new)."""


class CacheStatus(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    enabled: bool
    """Coalescing and the result cache are on ([deduplication] enabled) and no context source prevents sharing."""
    entries: int
    max_entries: int
    bytes: int
    """Memory the cached answers hold, as the byte budget counts it."""
    max_bytes: int
    window_s: float
    hits: int
    """Lookups that found an answer."""
    misses: int
    stored: int
    """Answers put into the cache."""
    too_large: int
    """Answers not cached because each alone was over max_bytes."""
    flights: int
    """Trips under way that identical requests may join."""
    waiting: int
    """Requests waiting on a trip another request started (coalesced, not answered yet)."""


class DeadLetterStatus(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    held: int
    capacity: int
    bytes: int
    """Memory the dead letters hold (each keeps its whole request for replay)."""
    max_bytes: int
    dropped: int
    """Oldest entries pushed out of the ring by newer ones."""


class BreakerStatus(BaseModel):
    """One backend's circuit breaker as status pages show it."""

    name: str
    state: BreakerStateName
    consecutive_failures: int
    successes: int
    failures: int
    rejected: int
    """Calls refused without touching the backend."""
    times_opened: int
    retry_after_s: float
    """Seconds until an open breaker lets probes through (0 unless open)."""
    probes_in_flight: int


class BatchItem(BaseModel):
    """One batch_infer item: a prompt, and what it sets differently from the batch's shared values."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The user prompt.")
    system: str | None = Field(default=None, description="System prompt (default: the batch's).")
    max_tokens: MaxTokens | None = Field(default=None, description="Cap on generated tokens.")
    temperature: Temperature | None = Field(default=None, description="Sampling temperature, 0 to 2.")
    top_p: TopP | None = Field(default=None, description="Nucleus sampling, (0, 1].")
    seed: Seed | None = Field(default=None, description="Sampling seed.")
    stop: StopList | None = Field(default=None, description="Stop sequences (at most 16).")
    priority: Priority | None = Field(default=None, description="Scheduling class (default: the batch's).")


class BatchItemResult(BaseModel):
    index: int = Field(description="The item's place in the input (0-based).")
    status: Literal["completed", "failed", "cancelled"] = Field(description="How this item ended.")
    text: str | None = Field(default=None, description="The answer, when completed.")
    error: str | None = Field(default=None, description="Why it has no answer, when failed or cancelled.")
    dead_letter_id: str | None = Field(default=None, description="Its dead letter (replay_dead_letter), if any.")
    request_id: str | None = Field(default=None, description="The pipeline request that ran it.")
    coalesced: bool = Field(default=False, description="It shared the answer of an identical item or request.")
    cached: bool = Field(default=False, description="Answered from the result cache.")
    usage: Usage | None = Field(default=None, description="Token usage, when completed.")
    finish_reason: str | None = Field(default=None, description="Why generation stopped, when completed.")
    latency_ms: float | None = Field(default=None, description="From submission to answer, when completed.")


class BatchResult(BaseModel):
    total: int = Field(description="Items in the batch.")
    completed: int = Field(description="Items with an answer.")
    failed: int = Field(description="Items that ended with an error (each has its own).")
    cancelled: int = Field(description="Items cancelled before they ended.")
    distinct: int = Field(description="Distinct items: identical ones share one backend call.")
    items: list[BatchItemResult] = Field(description="One result per item, in input order.")


class JobsStatus(BaseModel):
    """Tasks and background requests (jobs/): running, kept after they ended, and bounds."""

    running_tasks: int = 0
    running_background: int = 0
    oldest_running_s: float = 0.0
    """Age of the oldest one still running."""
    kept: int = 0
    """Ended ones whose results are still fetchable."""
    kept_bytes: int = 0
    max_kept_bytes: int = 0
    started: int = 0
    """Handed out (a task answered inline is not counted)."""
    expired: int = 0
    """Dropped after [tasks] ttl_s (or early, to stay within max_kept_bytes)."""
    ttl_s: float = 0.0


class DistributedStatus(BaseModel):
    """State shared with other processes through Redis ([distributed] redis_url)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    redis: str
    """scheme://host:port/db (never the password)."""
    state: Literal["ok", "degraded"]
    """degraded: Redis is unreachable or too slow; requests run on this process's own state."""
    node_id: str
    key_prefix: str
    subscribed: bool
    """Whether the events subscription (flight results, breaker openings) is connected."""
    degraded_since: float | None = None
    """Unix time Redis became unreachable (None while ok)."""
    last_error: str | None = None
    redis_errors: int = 0
    """Redis commands that failed or timed out since start."""
    transitions: int = 0
    """Changes between ok and degraded since start."""
    local_fallbacks: int = 0
    """Requests served with local state because Redis could not answer."""
    flights_led: int = 0
    flights_followed: int = 0
    flights_taken_over: int = 0
    """Flights led after the previous leader's lock expired (it died or hung)."""
    flight_ends_sent: int = 0
    """Ends of flights this process led that were sent to Redis (whether Redis took them: a write
    lost to an outage counts here and in redis_errors; one Redis answered with an error, in
    flight_ends_refused)."""
    flight_end_writes: int = 0
    """Writes that carried them (ends nobody follows are queued and batched, up to 10 ms)."""
    flight_ends_refused: int = 0
    """Ends Redis answered with an error (their locks expire; followers take over)."""
    shared_cache_hits: int = 0
    shared_cache_stored: int = 0
    limit_reservations: int = 0
    limit_refusals: int = 0
    breaker_openings_shared: int = 0
    breaker_openings_received: int = 0
    dead_letters_backlog: int = 0
    """Dead letters written while Redis was unreachable, waiting to be appended to the stream."""
    dead_letters_received: int = 0


class PipelineStatus(BaseModel):
    stages: list[StageStatus]
    totals: Totals
    worker: dict[str, object]
    rate_limit: RateLimitStatus
    cache: CacheStatus
    dead_letters: DeadLetterStatus
    latency_ms: Percentiles
    """Percentiles over the latest completed requests (cache hits and shared answers included)."""
    tokens: Usage
    concurrency: dict[str, int]
    uptime_s: float
    reconciles: bool
    event_loop: Literal["uvloop", "asyncio", "trio"] | None = None
    """The event loop the pipeline runs on (what the command line chose from [server] event_loop,
    or what a program running the Orchestrator itself chose); None before it starts."""
    breakers: list[BreakerStatus] = Field(default_factory=list)
    """One circuit breaker per backend (per replica inside a pool or fallback chain)."""
    distributed: DistributedStatus | None = None
    """Sharing through Redis (None when [distributed] redis_url is not set)."""
    jobs: JobsStatus | None = None
    """Tasks and background requests (None for a bare Pipeline, which has none)."""
