"""The container's health probe passes a server that requires its token on health checks too."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKEN = "probe-secret-7f3a"


def probe(target: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COURSEZOO_AUTH")}
    return subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py"), "--target", target],
                          capture_output=True, text=True, timeout=30, env=clean | env)


def test_probe_sends_the_servers_token(start_server, exported_repo: Path, tmp_path: Path) -> None:
    server = start_server(exported_repo, "--auth-health", env={"COURSEZOO_AUTH_TOKEN": TOKEN})
    refused = probe(server.target)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert probe(server.target, COURSEZOO_AUTH_TOKEN=TOKEN).returncode == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert probe(server.target, COURSEZOO_AUTH_TOKEN_FILE=str(token_file)).returncode == 0
