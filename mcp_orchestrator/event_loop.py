"""Which event loop the server runs on: uvloop when it is installed, else asyncio's own.

uvloop (libuv under asyncio's interface) runs the loop's own work (sockets, timers, callbacks)
in C: the server spent about 5% less CPU per call on it at 16 concurrent calls (BENCHMARKS.md,
"Gateway, on uvloop"). Everything the server does goes through anyio, which runs on either
loop; `[server] event_loop = "asyncio"` (or `--loop asyncio`) keeps the standard loop, for a
platform uvloop does not support (Windows) or to rule it out. The key is read by the command
line (cli.py); a program that runs an Orchestrator itself picks its loop with anyio.run's own
options.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Literal

EventLoop = Literal["auto", "asyncio", "uvloop"]
"""What the config asks for."""
EventLoopName = Literal["uvloop", "asyncio", "trio"]
"""What runs."""


def uvloop_missing() -> str | None:
    """None when uvloop can be imported, else why not (for an error message)."""
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        if sys.platform == "win32":
            return f"uvloop cannot be imported ({exc}): it does not run on Windows; choose asyncio or auto"
        return f"uvloop cannot be imported ({exc}); install it (pip install uvloop) or choose asyncio or auto"
    return None


def backend_options(choice: EventLoop) -> dict[str, Any]:
    """anyio.run's backend options for `choice` ("uvloop" is checked by the config beforehand)."""
    use_uvloop = choice == "uvloop" or (choice == "auto" and uvloop_missing() is None)
    return {"use_uvloop": use_uvloop}


def running_loop() -> EventLoopName:
    """The loop the calling code runs on (inside it only; "trio" under anyio's trio backend)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # anyio's only other backend
        return "trio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
