"""TLS, mutual TLS, bearer tokens, model control and what requests may reach the file system.

Certificates are made here with ``cryptography`` (a CA, a server certificate for 127.0.0.1/localhost,
a client certificate, and a rogue CA with its own client certificate), so nothing depends on files
outside the test. Servers run on a one-model repository to start fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import grpc
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.client import CourseZooClient, tls_credentials
from serving.security import ConfigError, Security, control_enabled, is_loopback, load_token
from tests.conftest import REPO_ROOT, edit_card

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

MODEL = "diabetes_mlp"
RECORD = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]
TOKEN = "cz-test-7f3a9c1e5b"  # distinctive, so a leak into the log is found by a plain search
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path) -> Path:
    repo = tmp_path_factory.mktemp("small") / "models"
    shutil.copytree(exported_repo / MODEL, repo / MODEL)
    return repo


# --- certificates ----------------------------------------------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """PEM files of a CA, a server and a client certificate it signed, and a rogue CA's client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        ca_key, rogue_key = _key(), _key()
        ca = _cert("CourseZoo test CA", ca_key, None, ca_key, ca=True)
        rogue = _cert("Rogue CA", rogue_key, None, rogue_key, ca=True)
        self.ca = self._write("ca.pem", ca)
        self.rogue_ca = self._write("rogue-ca.pem", rogue)
        for name, issuer, issuer_key, server in (("server", ca, ca_key, True), ("client", ca, ca_key, False),
                                                 ("rogue-client", rogue, rogue_key, False)):
            key = _key()
            self._write(f"{name}.pem", _cert(name, key, issuer, issuer_key, server=server))
            (directory / f"{name}-key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def _write(self, filename: str, cert: x509.Certificate) -> Path:
        (self.dir / filename).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return self.dir / filename

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def list_models(target: str, **client_options: object) -> grpc.StatusCode:
    """The status of one ListModels call (OK when it answers); a failed handshake is UNAVAILABLE."""
    with CourseZooClient(target, timeout=10, **client_options) as client:  # type: ignore[arg-type]
        try:
            client.list_models()
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


# --- TLS ---------------------------------------------------------------------------------------------------------

def test_tls_serves_clients_that_trust_its_ca_only(pki: Pki, small_repo: Path,
                                                   start_server: Callable[..., ServerProcess]) -> None:
    cert, key = pki.pair("server")
    proc = start_server(small_repo, "--tls-cert", str(cert), "--tls-key", str(key))
    assert "security: TLS;" in proc.output
    assert list_models(proc.target, credentials=tls_credentials(pki.ca)) == grpc.StatusCode.OK
    assert list_models(proc.target) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert list_models(proc.target, credentials=tls_credentials(pki.rogue_ca)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_its_ca(pki: Pki, small_repo: Path,
                                                              start_server: Callable[..., ServerProcess]) -> None:
    cert, key = pki.pair("server")
    proc = start_server(small_repo, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca))
    assert "security: mutual TLS;" in proc.output
    client_cert, client_key = pki.pair("client")
    rogue_cert, rogue_key = pki.pair("rogue-client")
    assert list_models(proc.target, credentials=tls_credentials(pki.ca, client_cert, client_key)) == grpc.StatusCode.OK
    assert list_models(proc.target, credentials=tls_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert list_models(proc.target, credentials=tls_credentials(pki.ca, rogue_cert, rogue_key)) == \
        grpc.StatusCode.UNAVAILABLE


def serve_fails(repo: Path, *flags: str) -> str:
    """Run ``coursezoo serve`` with a bad configuration: it must exit 1 before serving; returns its stderr."""
    done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                           "--port", "0", "--metrics-port", "-1", *flags], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 1 and "serving on" not in done.stdout, done.stdout + done.stderr
    return done.stderr


def test_incomplete_or_unreadable_tls_settings_stop_the_server(pki: Pki, small_repo: Path, tmp_path: Path) -> None:
    cert, key = pki.pair("server")
    assert "needs both --tls-cert and --tls-key" in serve_fails(small_repo, "--tls-cert", str(cert))
    assert "mutual TLS is TLS first" in serve_fails(small_repo, "--tls-client-ca", str(pki.ca))
    (tmp_path / "not.pem").write_text("hello")
    assert "not a PEM file" in serve_fails(small_repo, "--tls-cert", str(tmp_path / "not.pem"), "--tls-key", str(key))


# --- bearer tokens ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(small_repo: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """Token from the environment, DEBUG logging: the most a log could ever reveal."""
    return start_server(small_repo, env={"COURSEZOO_AUTH_TOKEN": TOKEN, "COURSEZOO_LOG_LEVEL": "DEBUG"})


def call_everything(target: str, authorization: str | None) -> dict[str, grpc.StatusCode]:
    """One call of each kind of RPC with the given ``authorization`` header; their status codes by RPC."""
    metadata = (("authorization", authorization),) if authorization is not None else ()
    codes: dict[str, grpc.StatusCode] = {}

    def record(name: str, call: Callable[[], object]) -> None:
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[name] = e.code()
        except InferenceServerException as e:
            codes[name] = getattr(grpc.StatusCode, str(e.status()).rpartition(".")[2])

    with CourseZooClient(target, timeout=10, metadata=metadata) as client, grpc.insecure_channel(target) as channel:
        kserve = triton.InferenceServerClient(target)
        headers = dict(metadata)
        record("ListModels", client.list_models)
        record("ClassifyDiabetes", lambda: client.classify_diabetes([RECORD]))
        record("StreamClassifyDigits", lambda: list(client.stream_classify_digits([bytes(784)])))
        record("ModelInfer", lambda: kserve.infer(MODEL, [triton.InferInput("features", [1, 8], "FP32")
                                                          .set_data_from_numpy(_record_array())], headers=headers))
        record("RepositoryIndex", lambda: kserve.get_model_repository_index(headers=headers))
        record("RepositoryModelLoad", lambda: kserve.load_model(MODEL, headers=headers))
        record("Reflection", lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10)))
        record("Health", lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10))
        record("ServerLive", lambda: kserve.is_server_live(headers=headers))
    return codes


def _record_array():  # noqa: ANN202 - a numpy array; numpy is imported lazily by tritonclient anyway
    import numpy as np

    return np.array([RECORD], dtype=np.float32)


PROTECTED = ("ListModels", "ClassifyDiabetes", "StreamClassifyDigits", "ModelInfer", "RepositoryIndex",
             "RepositoryModelLoad", "Reflection")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-5d2e", f"Basic {TOKEN}", TOKEN, "Bearer ",
                                           f"Bearer {TOKEN}x"])
def test_calls_without_the_right_token_are_unauthenticated(token_server: ServerProcess,
                                                           authorization: str | None) -> None:
    codes = call_everything(token_server.target, authorization)
    assert {name: codes[name] for name in PROTECTED} == dict.fromkeys(PROTECTED, UNAUTHENTICATED)
    assert codes["Health"] == codes["ServerLive"] == grpc.StatusCode.OK  # probes need no token


def test_calls_with_the_token_are_served(token_server: ServerProcess) -> None:
    codes = call_everything(token_server.target, f"Bearer {TOKEN}")
    # StreamClassifyDigits reaches the handler: there is no digits model here, so NOT_FOUND, not UNAUTHENTICATED.
    assert codes == {**dict.fromkeys(codes, grpc.StatusCode.OK), "StreamClassifyDigits": grpc.StatusCode.NOT_FOUND}
    assert "bearer token required (health checks open); model control on" in token_server.output


def test_open_health_neither_lists_the_models_nor_holds_what_it_is_sent(token_server: ServerProcess) -> None:
    """Without the token a caller may not list the models, so health's NOT_FOUND no longer lists them to it; and
    a Watch of a name no model can have (over 255 characters) is refused at once: grpc_health watched any name
    for ever, holding the request (eight 50 MiB names held 1 GB, with the token enforced everywhere else)."""
    with grpc.insecure_channel(token_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no service 'nope': expected '' (the server) or a model name"
        with pytest.raises(grpc.RpcError) as info:
            next(health.Watch(health_pb2.HealthCheckRequest(service="x" * (1 << 20)), timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
        watch = health.Watch(health_pb2.HealthCheckRequest(service="x" * 255), timeout=10)  # a name a model may have
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()


def test_tokens_never_appear_in_the_log(token_server: ServerProcess) -> None:
    """After the calls above (wrong, right, and near-miss tokens) at DEBUG level."""
    call_everything(token_server.target, f"Bearer {TOKEN}")
    output = token_server.output
    assert "refused an unauthenticated call" in output  # the refusals are logged...
    assert TOKEN not in output and "wrong-token-5d2e" not in output  # ...without what was sent


def test_refused_calls_are_counted_not_logged_at_info(small_repo: Path,
                                                     start_server: Callable[..., ServerProcess]) -> None:
    """Anyone who can reach the port can send refused calls: each cost a log line of ~4 KB at INFO (the level
    deployments run), and none reached the metrics; nothing named the caller. A made-up method is UNIMPLEMENTED,
    uncounted, unlogged."""
    proc = start_server(small_repo, env={"COURSEZOO_AUTH_TOKEN": TOKEN, "COURSEZOO_LOG_LEVEL": "INFO"})
    for _ in range(3):
        call_everything(proc.target, None)
    with grpc.insecure_channel(proc.target) as channel:
        made_up = channel.unary_unary("/coursezoo.v1.Classifier/" + "x" * 4000)
        with pytest.raises(grpc.RpcError) as info:
            made_up(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "refused an unauthenticated call" not in proc.output and "x" * 100 not in proc.output
    # one WARNING a minute per reason, naming the latest caller: a client left without the token can be found
    warned = [json.loads(line) for line in proc.output.splitlines() if "without valid credentials" in line]
    assert [(w["level"], w["reason"], w["unlogged_since_last"]) for w in warned] == \
        [("WARNING", "missing credentials", 0)]
    assert warned[0]["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))
    failures = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in proc.metrics().splitlines()
                if line.startswith("coursezoo_request_failures_total{")}
    for rpc in ("ListModels", "ClassifyDiabetes", "StreamClassifyDigits", "ModelInfer", "ServerReflectionInfo"):
        assert failures[f'coursezoo_request_failures_total{{code="UNAUTHENTICATED",model="",rpc="{rpc}",version=""}}'] \
            == 3
    assert not any("x" * 100 in line for line in failures)


def test_token_file_and_protected_health(small_repo: Path, tmp_path: Path,
                                         start_server: Callable[..., ServerProcess]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as `echo` writes it; the newline is not part of the token
    proc = start_server(small_repo, "--auth-token-file", str(token_file), "--auth-health")
    without, right = call_everything(proc.target, None), call_everything(proc.target, f"Bearer {TOKEN}")
    assert without["Health"] == without["ServerLive"] == UNAUTHENTICATED
    assert right["Health"] == right["ServerLive"] == right["ClassifyDiabetes"] == grpc.StatusCode.OK


def test_bad_token_settings_stop_the_server(small_repo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in serve_fails(small_repo, "--auth-token-file", str(empty))
    stderr = serve_fails(small_repo, "--auth-token", "two words")
    assert "printable ASCII" in stderr and "two words" not in stderr
    assert "give the token once" in serve_fails(small_repo, "--auth-token", TOKEN, "--auth-token-file", str(empty))


@pytest.mark.parametrize("token,problem", [("", None), ("a b", "printable"), ("tök", "printable")])
def test_load_token(token: str, problem: str | None) -> None:
    if problem is None:
        assert load_token(token, "") == token
    else:
        with pytest.raises(ConfigError, match=problem):
            load_token(token, "")


# --- model control ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,host,token,enabled", [
    ("auto", "127.0.0.1", "", True), ("auto", "::1", "", True), ("auto", "localhost", "", True),
    ("auto", "0.0.0.0", "", False), ("auto", "10.1.2.3", "", False), ("auto", "models.example", "", False),
    ("auto", "0.0.0.0", TOKEN, True), ("on", "0.0.0.0", "", True), ("off", "127.0.0.1", TOKEN, False),
])
def test_model_control_modes(mode: str, host: str, token: str, enabled: bool) -> None:
    assert control_enabled("--model-control", mode, host, token) is enabled
    assert is_loopback(host) is (host in ("127.0.0.1", "::1", "localhost"))


@pytest.mark.parametrize("host,token,control,shared", [
    ("127.0.0.1", "", True, True), ("0.0.0.0", TOKEN, True, False), ("0.0.0.0", "", False, False),
])
def test_a_token_opens_model_control_but_not_shared_memory(host: str, token: str, control: bool,
                                                            shared: bool) -> None:
    """Shared memory serves clients on the server's host alone: with a token on an open port, a remote caller
    could only name other programs' objects under /dev/shm (a review read a planted secret that way)."""
    settings = SimpleNamespace(host=host, tls_cert="", tls_key="", tls_client_ca="", auth_token=token,
                               auth_token_file="", auth_health=False, model_control="auto", shared_memory="auto")
    policy = Security.from_settings(settings)
    assert (policy.model_control, policy.shared_memory) == (control, shared)


@pytest.mark.parametrize("flags", [("--no-model-control",), ("--host", "0.0.0.0")])
def test_without_model_control_the_repository_cannot_be_changed(small_repo: Path, flags: tuple[str, ...],
                                                                start_server: Callable[..., ServerProcess]) -> None:
    proc = start_server(small_repo, *flags)
    assert "model control off" in proc.output
    kserve = triton.InferenceServerClient(proc.target)
    for change in (kserve.load_model, kserve.unload_model):
        with pytest.raises(InferenceServerException) as info:
            change(MODEL)
        assert "UNIMPLEMENTED" in str(info.value.status()) and "model control is off" in info.value.message()
    with pytest.raises(InferenceServerException, match="model control is off"):
        kserve.load_model("client_made_name")
    failures = [line for line in proc.metrics().splitlines() if line.startswith("coursezoo_request_failures_total{")]
    assert any('model=""' in line and "RepositoryModelLoad" in line for line in failures)
    assert not any("client_made_name" in line for line in failures)  # no series per name a client invents
    assert kserve.is_model_ready(MODEL)
    assert kserve.get_model_repository_index(as_json=True)["models"]  # reading stays allowed


# --- what reaches the file system -----------------------------------------------------------------------------------

TRAVERSALS = ("../outside", "..", "../outside/../outside", "outside/..", "a/b", "/etc/passwd", "models/../outside",
              "x\x00", ".hidden/..", "..\\outside", "%2e%2e/outside")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path,
            start_server: Callable[..., ServerProcess]) -> tuple[Path, ServerProcess]:
    """A repository beside a valid model called ``outside`` (reachable only through ``..``), and holding a
    ``tampered`` model whose ONNX file no longer matches its card: one bit of a weight flipped, a file ONNX
    Runtime still loads (checked here), so that only the sha256 check can refuse it. (A byte appended, as
    before, made a file ONNX Runtime refuses itself: INVALID_PROTOBUF.)"""
    root = tmp_path_factory.mktemp("guarded")
    version = max((exported_repo / MODEL).iterdir(), key=lambda p: int(p.name))
    shutil.copytree(version, root / "outside" / "1")
    _rename(root / "outside" / "1", "outside")
    repo = root / "models"
    shutil.copytree(version, repo / MODEL / "1")
    shutil.copytree(version, repo / "tampered" / "1")
    _rename(repo / "tampered" / "1", "tampered")
    onnx_file = repo / "tampered" / "1" / "model.onnx"
    weights = onnx.load(onnx_file).graph.initializer[0].raw_data
    data = bytearray(onnx_file.read_bytes())
    data[data.index(weights)] ^= 1  # the lowest mantissa bit of the first weight (little-endian float32)
    onnx_file.write_bytes(bytes(data))
    ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])  # loads: not the file the card vouches for
    return repo, start_server(repo)


def _rename(version_dir: Path, name: str) -> None:
    edit_card(version_dir, lambda card: card.update(name=name, version=version_dir.name))


@pytest.mark.parametrize("name", TRAVERSALS)
def test_model_names_from_requests_never_reach_the_file_system(guarded: tuple[Path, ServerProcess],
                                                               name: str) -> None:
    _, proc = guarded
    kserve = triton.InferenceServerClient(proc.target)
    for change in (kserve.load_model, kserve.unload_model):
        with pytest.raises(InferenceServerException) as info:
            change(name)
        assert "NOT_FOUND" in str(info.value.status()), info.value
    with pytest.raises(InferenceServerException, match="invalid model name|no model"):
        kserve.get_model_metadata(name)
    assert not kserve.is_model_ready(name)
    with CourseZooClient(proc.target, timeout=10) as client, pytest.raises(grpc.RpcError) as rpc_info:
        client.classify_diabetes([RECORD], model=name)
    assert rpc_info.value.code() == grpc.StatusCode.NOT_FOUND
    assert {m["name"] for m in kserve.get_model_repository_index(as_json=True)["models"]} == {MODEL, "tampered"}


def test_only_onnx_files_matching_their_card_are_served(guarded: tuple[Path, ServerProcess]) -> None:
    _, proc = guarded
    kserve = triton.InferenceServerClient(proc.target)
    index = {m["name"]: m for m in kserve.get_model_repository_index(as_json=True)["models"]}
    assert index["tampered"]["state"] == "UNAVAILABLE" and "sha256" in index["tampered"]["reason"]
    assert not kserve.is_model_ready("tampered")
    with CourseZooClient(proc.target, timeout=5) as client, pytest.raises(grpc.RpcError) as info:
        client.classify_diabetes([RECORD], model="tampered")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "sha256" in info.value.details()
