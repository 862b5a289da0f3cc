"""Reloading the config file while the server runs: SIGHUP, or `reload_config` in code.

The file is read and validated, then `Orchestrator.reconfigure` applies it all or nothing
(which keys apply live and which need a restart is decided there, by the part holding
each value). A bad file, an unknown worker or a failed health check keeps the running
config; the reason goes to the log.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from mcp_orchestrator.config import Config
from mcp_orchestrator.errors import ConfigError, ReloadError
from mcp_orchestrator.orchestrator import Orchestrator, ReloadReport

log = logging.getLogger(__name__)


async def reload_config(orchestrator: Orchestrator, load: Callable[[], Config], source: str) -> ReloadReport:
    """Load the config again and apply it; ReloadError (nothing changed) when it cannot be."""
    try:
        new = load()
    except ReloadError:
        raise
    except ConfigError as exc:
        raise ReloadError(source, exc.problems) from None
    return await orchestrator.reconfigure(new, source)


async def reload_on_sighup(
    orchestrator: Orchestrator,
    load: Callable[[], Config],
    source: str,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Reload the config on each SIGHUP until cancelled; a bad file keeps the running config and says why."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            try:
                report = await reload_config(orchestrator, load, source)
            except ReloadError as exc:
                log.error("%s", exc)
            except Exception:  # a bug must not end a server that is serving
                log.exception("reloading %s failed unexpectedly; the server keeps running", source)
            else:
                log.warning("%s", report.summary())
