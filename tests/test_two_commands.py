"""README's first command, as a new user runs it: `bash scripts/serve.sh` in a fresh clone installs
the server into the clone's own .venv and serves MCP on stdio; a real client calls `infer`.

The clone holds what is committed (what CI and a new user get); its first run installs the
package and its dependencies from the package index (pip's cache makes that quick the second
time). Also: the example config files all pass --check-config.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.support_processes import child_env, run_cli

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 300.0
"""A fresh venv and its dependencies: seconds with pip's cache, a few minutes without."""


@pytest.mark.anyio
async def test_serve_sh_in_a_fresh_clone_installs_and_answers(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "fresh"
    await anyio.run_process(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    params = StdioServerParameters(
        command="bash", args=[str(clone / "scripts" / "serve.sh")], cwd=str(clone), env=child_env()
    )
    with tempfile.TemporaryFile("w+") as errlog, anyio.fail_after(INSTALL_TIMEOUT_S):
        async with Client(params) as client:
            result = await client.call_tool("infer", {"prompt": "hello from a fresh clone"})
        errlog.seek(0)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    assert result.structured_content["text"] == "hello from a fresh clone"
    assert (clone / ".venv" / "bin" / "mcp-orchestrator").exists()  # the clone's own install


@pytest.mark.parametrize("example", sorted(path.name for path in (ROOT / "examples").glob("*.toml")))
def test_every_example_config_is_valid(example: str) -> None:
    """With the token the team example's header says to export (it serves a non-loopback address);
    without it for the OAuth example, which refuses a static token beside OAuth."""
    token = {} if "oauth" in example else {"MCP_ORCHESTRATOR_TOKEN": "Zq7rX2pLm9WvK4tN8sB3yH6c"}
    done = run_cli("--check-config", "--config", str(ROOT / "examples" / example), env=token)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{")


def test_the_team_example_without_its_token_is_refused() -> None:
    done = run_cli("--check-config", "--config", str(ROOT / "examples" / "http-team.toml"))
    assert done.returncode == 2 and done.stdout == ""
    assert "no authentication is set" in done.stderr
