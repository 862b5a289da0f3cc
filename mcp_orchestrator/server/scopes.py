"""Which OAuth scope each tool needs.

Three classes, each including the ones below it: `read` (look at the pipeline), `use` (spend the
operator's backends: run and cancel requests), `admin` (change what everyone else gets: the
worker, replays of anyone's dead letters). Why a ladder rather than one scope per tool: an
identity provider then needs three scopes, not one per tool, and granting `admin` never leaves
someone unable to read the status. A tool missing from TOOL_CLASSES needs `admin`, so a tool
added later is closed until someone decides who may call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum


class ScopeClass(IntEnum):
    read = 1
    use = 2
    admin = 3


TOOL_CLASSES: Mapping[str, ScopeClass] = {
    "pipeline_status": ScopeClass.read,
    "dead_letters": ScopeClass.read,
    "request_status": ScopeClass.read,
    "infer": ScopeClass.use,
    "batch_infer": ScopeClass.use,
    "cancel_request": ScopeClass.use,
    "configure_worker": ScopeClass.admin,
    "replay_dead_letter": ScopeClass.admin,
}


def needed_class(tool: str) -> ScopeClass:
    return TOOL_CLASSES.get(tool, ScopeClass.admin)


@dataclass(frozen=True)
class ToolScopes:
    """The scope names of the three classes ([server] oauth_scope_read, _use, _admin)."""

    read: str
    use: str
    admin: str

    def name(self, scope_class: ScopeClass) -> str:
        return {ScopeClass.read: self.read, ScopeClass.use: self.use, ScopeClass.admin: self.admin}[scope_class]

    def granted(self, scopes: Iterable[str]) -> ScopeClass | None:
        """The highest class a token's scopes grant, or None."""
        held = set(scopes)
        return max((cls for cls in ScopeClass if self.name(cls) in held), default=None)

    def supported(self) -> list[str]:
        """The three names, lowest class first (once each, should two classes share a name)."""
        return list(dict.fromkeys(self.name(cls) for cls in ScopeClass))

    def refusal(self, tool: str, scopes: Iterable[str]) -> str | None:
        """Why a token with `scopes` may not call `tool`, or None when it may."""
        needed = needed_class(tool)
        held = self.granted(scopes)
        if held is not None and held >= needed:
            return None
        accepted = " or ".join(dict.fromkeys(self.name(cls) for cls in ScopeClass if cls >= needed))
        has = f"only grants {self.name(held)}" if held is not None else "grants none of the tool scopes"
        return (
            f"{tool} needs the OAuth scope {accepted}; the access token {has}. Nothing was done: "
            "ask your identity provider for a token with that scope (the server's protected-resource "
            "metadata lists them)"
        )
