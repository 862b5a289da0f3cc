"""The session's real llama.cpp model server, as a pytest fixture (the server itself: testbeds/llama.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from testbeds.llama import LlamaServer, LlamaServerError, llama_server

__all__ = ["LlamaServer", "llama", "llama_server"]


class _Shared:
    """One server for the whole session, however many test modules import the fixture
    (each import is its own fixture definition to pytest, so they count their users)."""

    stack: ExitStack | None = None
    server: LlamaServer | None = None
    users = 0


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    """The session's real model server."""
    if _Shared.server is None:
        _Shared.stack = ExitStack()
        try:
            _Shared.server = _Shared.stack.enter_context(llama_server())
        except LlamaServerError as exc:
            pytest.fail(str(exc))
    _Shared.users += 1
    try:
        yield _Shared.server
    finally:
        _Shared.users -= 1
        if _Shared.users == 0 and _Shared.stack is not None:
            stack, _Shared.stack, _Shared.server = _Shared.stack, None, None
            stack.close()
