"""Each compose service's command and environment, run for real against this checkout, outside a container.

``docker compose config`` renders the service; ``deploy_helpers.host_command`` maps its container paths
through its mounts (``/app`` is the checkout, ``/models`` the repository folder, named volumes are
temporary folders) and the compose DNS name ``server`` to the loopback server. The only other changes
are the ones no host can copy from a container: the server binds 127.0.0.1 on ephemeral ports instead
of 0.0.0.0:50051/8002. Settings a test needs (a temporary model repository, a one-epoch training run)
go in through the variables the compose file documents, as an operator would set them.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import REPO_ROOT, ServiceProcess, host_command, render, run

#: the container-only parts of the server's environment, made loopback and ephemeral for a host run
LOOPBACK = {"COURSEZOO_HOST": "127.0.0.1", "COURSEZOO_PORT": "0", "COURSEZOO_METRICS_PORT": "0"}
MIRROR = Path(os.environ.get("COURSEZOO_DATA_MIRROR") or REPO_ROOT.parent / "shared" / "data")


def need(module: str, command: str) -> None:
    """Skip until another part of the project exists (found without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pytest.skip(f"`{command}` does not exist yet ({module} is missing)")


def healthcheck(service: dict[str, Any], server: ServiceProcess) -> Any:
    """The compose healthcheck command, run with the server container's environment (the probe runs there)."""
    probe = host_command(service, "server", command=service["healthcheck"]["test"][1:],
                         overrides={**LOOPBACK, "COURSEZOO_PORT": str(server.port)})
    return run(probe, timeout=60)


def list_models(target: str) -> dict[str, Any]:
    """ListModels over the domain API: name -> ModelInfo."""
    import grpc

    from serving.protos import classifier_pb2, classifier_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = classifier_pb2_grpc.ClassifierStub(channel).ListModels(classifier_pb2.ListModelsRequest(), timeout=30)
    return {m.name: m for m in reply.models}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository the trainer may write into: a copy of the shipped exports (exported/ stays untouched)."""
    path = tmp_path_factory.mktemp("deploy") / "exported"
    shutil.copytree(REPO_ROOT / "exported", path, ignore=shutil.ignore_patterns(".*"))
    return path


@pytest.fixture(scope="module")
def cpu_settings(repo: Path) -> dict[str, str]:
    # A one-second poll keeps the hot-pickup test short; the compose default is a few seconds.
    return {"COURSEZOO_MODELS_DIR": str(repo), "COURSEZOO_POLL_INTERVAL_S": "1"}


@pytest.fixture(scope="module")
def cpu_server(cpu_settings: dict[str, str]) -> Iterator[tuple[dict[str, Any], ServiceProcess]]:
    """The server service of the CPU variant on the temporary repository."""
    need("serving.server", "coursezoo serve")
    service = render("cpu", cpu_settings)["services"]["server"]
    server = ServiceProcess(host_command(service, "server", overrides=LOOPBACK)).start()
    yield service, server
    server.stop()


def test_server_gpu_variant_starts_answers_health_and_stops_cleanly() -> None:
    """docker-compose.yml's server as is (device auto: CPU here, with one log line), on ./exported."""
    need("serving.server", "coursezoo serve")
    service = render("gpu")["services"]["server"]
    assert service["environment"]["COURSEZOO_DEVICE"] == "auto"
    server = ServiceProcess(host_command(service, "server", overrides=LOOPBACK)).start()
    try:
        result = healthcheck(service, server)
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
        # what Prometheus scrapes
        (url,) = re.findall(r"metrics on (http://\S+/metrics)", server.output)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "coursezoo_" in response.read().decode()
    finally:
        code = server.stop()
    # `docker stop` sends SIGTERM: the server drains and exits 0, so `restart: unless-stopped` stays put
    assert code == 0, server.output


def test_server_cpu_variant_serves_on_cpu(cpu_server: tuple[dict[str, Any], ServiceProcess]) -> None:
    service, server = cpu_server
    result = healthcheck(service, server)
    assert result.returncode == 0, result.stdout + result.stderr
    models = list_models(server.target)
    assert models and {m.provider for m in models.values()} == {"CPUExecutionProvider"}


def test_healthcheck_fails_when_no_server_answers(cpu_server: tuple[dict[str, Any], ServiceProcess]) -> None:
    service, _ = cpu_server
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        probe = host_command(service, "server", command=service["healthcheck"]["test"][1:],
                             overrides={**LOOPBACK, "COURSEZOO_PORT": str(closed.getsockname()[1])})
        result = run(probe, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unhealthy" in result.stderr


@pytest.fixture(scope="module")
def trained(cpu_server: tuple[dict[str, Any], ServiceProcess], cpu_settings: dict[str, str], repo: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, Path]]:
    """The trainer service with the model's own recipe (diabetes_mlp's 300 epochs take ~2 s; a shorter run
    would miss the bar, and export refuses that), exporting into the running server's repository.

    Returns (model name, the version it exported, the named volumes' folders)."""
    need("training.train", "coursezoo train")
    if not (MIRROR / "diabetes" / "diabetes.csv.gz").exists():
        pytest.skip(f"no data mirror at {MIRROR} (set COURSEZOO_DATA_MIRROR)")
    _, server = cpu_server
    name = "diabetes_mlp"
    before = list(list_models(server.target)[name].versions)
    settings = {**cpu_settings, "COURSEZOO_MODELS": name, "COURSEZOO_DATA_MIRROR_DIR": str(MIRROR)}
    trainer = render("cpu", settings)["services"]["trainer"]
    tmp = tmp_path_factory.mktemp("trainer")
    volumes = {"data": tmp / "data", "runs": tmp / "runs"}
    for folder in volumes.values():
        folder.mkdir()
    result = run(host_command(trainer, "trainer", volumes=volumes, home=tmp), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    new = str(max(int(v) for v in before) + 1)
    assert (repo / name / new / "model.json").is_file(), result.stdout
    return name, new, volumes


def test_trainer_exports_a_version_the_running_server_picks_up(
        cpu_server: tuple[dict[str, Any], ServiceProcess], trained: tuple[str, str, dict[str, Path]]) -> None:
    _, server = cpu_server
    name, new, volumes = trained
    # The data went to the data-root volume, copied from the read-only mirror.
    assert (volumes["data"] / "diabetes" / "diabetes.csv.gz").is_file()
    assert (volumes["runs"] / name / "metrics.json").is_file()
    # No restart: the running server's poll finds the new version.
    deadline = time.monotonic() + 60
    while new not in list_models(server.target)[name].versions:
        assert time.monotonic() < deadline, f"{name} version {new} never appeared:\n{server.output[-3000:]}"
        time.sleep(0.5)


def test_exported_versions_are_readable_by_the_server_user(repo: Path,
                                                           trained: tuple[str, str, dict[str, Path]]) -> None:
    """In the deployment the trainer (the host user) and the server (uid 10001) are different users: the
    server container can load a new version only if others may read it."""
    name, new, _ = trained
    version_dir = repo / name / new
    for path in [version_dir, *version_dir.iterdir()]:
        wanted = 0o005 if path.is_dir() else 0o004
        mode = path.stat().st_mode & 0o777
        assert mode & wanted == wanted, f"{path} is mode {mode:o}: the server container's user cannot read it"


def test_batch_classifies_a_folder_through_the_server(cpu_server: tuple[dict[str, Any], ServiceProcess],
                                                     cpu_settings: dict[str, str], tmp_path: Path) -> None:
    need("serving.batch.cli", "coursezoo batch")
    need("serving.batch.engines.remote", "coursezoo batch --server")
    _, server = cpu_server
    inbox, outbox = tmp_path / "input", tmp_path / "output"
    inbox.mkdir()
    outbox.mkdir()
    names = ["Nguyen", "Schmidt", "Rossi", "Tanaka"]
    (inbox / "names.txt").write_text("\n".join(names) + "\n")
    settings = {**cpu_settings, "COURSEZOO_BATCH_INPUT": str(inbox), "COURSEZOO_BATCH_OUTPUT": str(outbox)}
    batch = render("cpu", settings)["services"]["batch"]
    cmd = host_command(batch, "server", addresses={"server:50051": server.target}, home=tmp_path)
    assert server.target in cmd.argv
    result = run(cmd, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(outbox / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names)
    assert all(row["prediction"] and not row["error"] for row in rows), rows
    assert {row["model"] for row in rows} == {"names_gru"}
