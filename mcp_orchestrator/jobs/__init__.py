"""Long calls: work that outlives one tool call (MCP tasks, background requests, batches).

A `Job` is one such call running on its own, in a task group the orchestrator owns, until
it ends or its caller cancels it; `Jobs` starts, finds, cancels and expires them, bounded
in count and memory. The pipeline requests a job makes are ordinary requests (they end in
the ledger like any other); nothing here knows MCP.
"""

from mcp_orchestrator.jobs.job import Job, JobFailure, JobState
from mcp_orchestrator.jobs.registry import Jobs

__all__ = ["Job", "JobFailure", "JobState", "Jobs"]
