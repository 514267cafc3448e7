"""The compose deployment: valid for Compose v2, and shaped as docs/deploy.md promises.

Every assertion reads the model that ``docker compose config`` renders (validated against the compose
specification, interpolated, override files merged, profiles applied), not the raw YAML, so what is
tested is what Docker would run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from deploy_helpers import REPO_ROOT, VARIANTS, compose, render, require, require_module

GRPC_PORT, METRICS_PORT = 50051, 8002


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(variant: str) -> dict[str, Any]:
    return render(variant)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return render("gpu")


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return render("cpu")


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    found = [m for m in service.get("volumes", []) if m["target"] == target]
    assert found, f"no mount at {target}: {service.get('volumes')}"
    return found[0]


def test_compose_files_pass_compose_validation(variant: str) -> None:
    for profiles in [(), ("train",), ("batch",), ("monitoring",), ("lb",), ("*",)]:
        result = compose(variant, "config", "--quiet", profiles=profiles)
        assert result.returncode == 0, f"{VARIANTS[variant]} with profiles {profiles}: {result.stderr}"


def test_a_broken_compose_file_is_rejected(tmp_path) -> None:
    """The validator is real: an unknown key or a wrong type fails `config`."""
    from deploy_helpers import compose_binary, compose_env, require

    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  server:\n    image: x\n    ports: 50051\n    restrt: always\n")
    result = subprocess.run([require(compose_binary(), "compose"), "-f", str(bad), "config", "--quiet"],
                            capture_output=True, text=True, env=compose_env())
    assert result.returncode != 0


def test_profiles_select_the_optional_services(variant: str) -> None:
    def services(*profiles: str) -> set[str]:
        result = compose(variant, "config", "--services", profiles=profiles)
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    assert services() == {"server"}
    assert services("train") == {"server", "trainer"}
    assert services("batch") == {"server", "batch"}
    assert services("monitoring") == {"server", "prometheus"}
    assert services("lb") == {"server", "lb"}


def test_server(model: dict[str, Any]) -> None:
    server = model["services"]["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile" and server["build"]["target"] == "server"
    assert server["command"] == ["coursezoo", "serve"]
    assert {p["target"] for p in server["ports"]} == {GRPC_PORT, METRICS_PORT}
    models = mount(server, "/models")
    assert models["type"] == "bind" and models["read_only"] is True
    assert models["source"] == str(REPO_ROOT / "exported")
    env = server["environment"]
    assert env["COURSEZOO_REPO"] == "/models"
    assert env["COURSEZOO_HOST"] == "0.0.0.0"
    assert (int(env["COURSEZOO_PORT"]), int(env["COURSEZOO_METRICS_PORT"])) == (GRPC_PORT, METRICS_PORT)
    assert float(env["COURSEZOO_POLL_INTERVAL_S"]) > 0, "the trainer's exports reach the server only by polling"
    assert server["healthcheck"]["test"] == ["CMD", "python", "/app/docker/healthcheck.py"]
    assert server["restart"] in ("always", "unless-stopped", "on-failure")
    assert "container_name" not in server, "a fixed container name prevents `--scale server=N`"
    # docker stop must wait longer than the server's own drain, or in-flight requests are cut off
    assert _seconds(server["stop_grace_period"]) > float(env["COURSEZOO_GRACE_S"])


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_gpu_variant_reserves_an_nvidia_gpu(gpu: dict[str, Any]) -> None:
    for name in ("server", "trainer"):
        (device,) = devices(gpu["services"][name])
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    assert gpu["services"]["server"]["environment"]["COURSEZOO_DEVICE"] == "auto"


def test_cpu_variant_is_the_gpu_variant_without_gpus(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    for name, service in cpu["services"].items():
        assert not devices(service), f"{name} still reserves a GPU in the CPU variant"
    assert cpu["services"]["server"]["environment"]["COURSEZOO_DEVICE"] == "cpu"
    assert cpu["services"]["trainer"]["environment"]["COURSEZOO_TRAIN_ARGS"].split()[:2] == ["--device", "cpu"]

    # Nothing else differs: one deployment, two hardware profiles.
    def strip(service: dict[str, Any]) -> dict[str, Any]:
        service = {k: v for k, v in service.items() if k != "deploy"}
        env = {k: v for k, v in service.get("environment", {}).items()
               if k not in ("COURSEZOO_DEVICE", "COURSEZOO_TRAIN_ARGS")}
        return {**service, "environment": env}

    assert {n: strip(s) for n, s in gpu["services"].items()} == {n: strip(s) for n, s in cpu["services"].items()}


def test_settings_come_from_the_environment() -> None:
    model = render("gpu", settings={"COURSEZOO_DEVICE": "cuda", "COURSEZOO_MAX_BATCH_SIZE": "16",
                                    "COURSEZOO_GRPC_PUBLISH": "50051-50053", "COURSEZOO_MODELS_DIR": "/srv/models"})
    server = model["services"]["server"]
    assert server["environment"]["COURSEZOO_DEVICE"] == "cuda"
    assert server["environment"]["COURSEZOO_MAX_BATCH_SIZE"] == "16"
    assert mount(server, "/models")["source"] == "/srv/models"
    # a host port range: each `--scale server=3` replica gets its own host port
    assert {p["published"] for p in server["ports"] if p["target"] == GRPC_PORT} == {"50051-50053"}


def test_unset_tunables_keep_the_server_defaults(gpu: dict[str, Any]) -> None:
    """Tunables without a value are passed through only when set: no second copy of the defaults."""
    env = gpu["services"]["server"]["environment"]
    assert env["COURSEZOO_MAX_BATCH_SIZE"] is None and env["COURSEZOO_MAX_QUEUE_DELAY_MS"] is None


def serve_variables() -> set[str]:
    result = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "COLUMNS": "200"})
    if result.returncode != 0:
        pytest.skip(f"`coursezoo serve --help` does not run yet: {result.stderr.strip()[-300:]}")
    return set(re.findall(r"env\s+(COURSEZOO_\w+)", result.stdout))


#: What the server container reads besides `coursezoo serve`'s settings: the log level, and the health probe's.
OTHER_READERS = (REPO_ROOT / "coursezoo" / "logs.py", REPO_ROOT / "docker" / "healthcheck.py")


def test_server_variables_are_read_by_the_server_or_its_probe(gpu: dict[str, Any]) -> None:
    """Every COURSEZOO_* the server service sets is one the container reads (a typo is ignored silently)."""
    known = serve_variables() | {v for path in OTHER_READERS for v in re.findall(r"COURSEZOO_\w+", path.read_text())}
    used = {k for k in gpu["services"]["server"]["environment"] if k.startswith("COURSEZOO_")}
    assert used <= known, f"read by nothing in the server container: {sorted(used - known)}"


def test_every_serve_setting_reaches_the_container(gpu: dict[str, Any]) -> None:
    """docs/deploy.md: every setting can be given from the shell or .env. One missing from the service's list
    would be dropped without a word (COURSEZOO_AUTH_TOKEN was: the container served without a token)."""
    used = set(gpu["services"]["server"]["environment"])
    assert serve_variables() <= used, f"not passed to the container: {sorted(serve_variables() - used)}"


def test_trainer(model: dict[str, Any]) -> None:
    trainer, server = model["services"]["trainer"], model["services"]["server"]
    assert trainer["profiles"] == ["train"]
    assert trainer["build"]["target"] == "trainer"
    assert trainer["command"] == ["/app/docker/train.sh"]
    env = trainer["environment"]
    # it writes where the server reads, and the server's mount of it is the read-only one
    out = mount(trainer, env["COURSEZOO_EXPORT_DIR"])
    assert out["source"] == mount(server, "/models")["source"] and not out.get("read_only")
    data = mount(trainer, env["COURSEZOO_DATA_ROOT"])
    assert data["type"] == "volume" and data["source"] in model["volumes"]
    assert mount(trainer, env["COURSEZOO_RUNS"])["type"] == "volume"
    assert mount(trainer, env["COURSEZOO_DATA_MIRROR"]).get("read_only") is True
    assert trainer["restart"] == "no"
    assert re.fullmatch(r"\d+:\d+", trainer["user"]) and not trainer["user"].startswith("0:")


def test_batch(model: dict[str, Any]) -> None:
    batch, server = model["services"]["batch"], model["services"]["server"]
    assert batch["profiles"] == ["batch"]
    assert batch["image"] == server["image"], "the batch CLI ships in the server image"
    cmd = batch["command"]
    assert cmd[:2] == ["coursezoo", "batch"] and cmd[cmd.index("--server") + 1] == f"server:{GRPC_PORT}"
    assert mount(batch, cmd[2]).get("read_only") is True
    out = cmd[cmd.index("--out") + 1]
    assert not mount(batch, out.rsplit("/", 1)[0]).get("read_only")
    assert batch["depends_on"]["server"]["condition"] == "service_healthy"
    assert not devices(batch), "the batch client needs no GPU; the server does the inference"


def test_prometheus_scrapes_every_server_replica(model: dict[str, Any]) -> None:
    prom = model["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"]), "pin Prometheus by version"
    config_mount = mount(prom, "/etc/prometheus/prometheus.yml")
    assert config_mount["read_only"] is True and config_mount["source"] == str(REPO_ROOT / "deploy" / "prometheus.yml")
    config = require_module("yaml").safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A" and sd["port"] == METRICS_PORT
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_load_balancer_spreads_calls_over_every_server_replica(model: dict[str, Any]) -> None:
    """nginx, pinned, with the repository's config, resolving `server` through Docker's DNS (every replica).

    tests/scale/test_load_balancer.py runs that config with real servers behind it."""
    lb = model["services"]["lb"]
    assert lb["profiles"] == ["lb"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-alpine)?", lb["image"]), "pin nginx by version"
    config_mount = mount(lb, "/etc/nginx/nginx.conf")
    assert config_mount["read_only"] is True
    assert config_mount["source"] == str(REPO_ROOT / "deploy" / "lb" / "nginx.conf")
    assert [p["target"] for p in lb["ports"]] == [GRPC_PORT]
    assert lb["depends_on"]["server"]["condition"] == "service_healthy"
    config = (REPO_ROOT / "deploy" / "lb" / "nginx.conf").read_text()
    assert re.search(rf"^\s*server server:{GRPC_PORT} resolve\b", config, re.M), "every replica, re-resolved"
    assert re.search(r"^\s*resolver 127\.0\.0\.11\b", config, re.M), "Docker's embedded DNS"
    assert re.search(rf"^\s*listen {GRPC_PORT} http2;", config, re.M)
    assert not devices(lb)


def test_prometheus_config_passes_promtool() -> None:
    """promtool (Debian's `prometheus` package, which CI installs) checks the config Prometheus will load."""
    import shutil

    promtool = require(shutil.which("promtool"), "promtool")
    config = REPO_ROOT / "deploy" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_unprivileged(model: dict[str, Any]) -> None:
    for name, service in model["services"].items():
        if name == "prometheus":  # upstream image, runs as nobody already
            continue
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
