"""Who may talk to the server: TLS (optionally mutual), bearer-token authentication, model control.

Kept apart from the transport code in ``serving.server`` so that every decision about trust is in one
file: which certificates the port presents and asks for, which RPCs need a token, and whether clients
may change the model repository. Nothing here imports the generated protobuf modules, so the tests
can exercise the policy in-process.

Tokens are secrets: they are compared in constant time and never logged, echoed in an error message
or shown in ``--help`` (a value from ``COURSEZOO_AUTH_TOKEN`` would otherwise appear as the default).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from coursezoo.logs import Throttle
from serving.services.plumbing import Refused, refusal

log = logging.getLogger("coursezoo.security")

AUTH_HEADER = "authorization"
SCHEME = "bearer"

#: RPCs a probe must reach without credentials: gRPC health and the KServe liveness/readiness calls
#: (they say "up", and a per-model check whether that model exists). ``--auth-health`` puts them behind the
#: token too. Everything else, server reflection included (it lists the whole API surface), needs the token
#: when one is set.
HEALTH_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})

#: Modes of the options that open state-changing RPCs (model control, shared memory).
CONTROL_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A security option is missing a companion, unreadable or empty; ``coursezoo serve`` exits with it."""


class ModelControlOff(RuntimeError):
    """RepositoryModelLoad/Unload on a server started without model control (maps to UNIMPLEMENTED)."""


class SharedMemoryOff(RuntimeError):
    """A system shared memory RPC on a server started without it (maps to UNIMPLEMENTED)."""


class SecuritySettings(Protocol):
    """The fields of ``ServerSettings`` this module reads."""

    host: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    auth_token: str
    auth_token_file: str
    auth_health: bool
    model_control: str
    shared_memory: str


@dataclass(frozen=True)
class Security:
    """The resolved policy of one server: read once at start-up, so a bad file fails before models load."""

    token: str = field(default="", repr=False)
    credentials: grpc.ServerCredentials | None = field(default=None, repr=False)
    mutual_tls: bool = False
    protect_health: bool = False
    model_control: bool = True
    shared_memory: bool = True

    @classmethod
    def from_settings(cls, settings: SecuritySettings) -> Security:
        token = load_token(settings.auth_token, settings.auth_token_file)
        return cls(token=token,
                   credentials=server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
                   mutual_tls=bool(settings.tls_client_ca), protect_health=bool(settings.auth_health),
                   model_control=control_enabled("--model-control", settings.model_control, settings.host, token),
                   # a token is not enough here: shared memory serves clients on this host alone, and a remote
                   # caller could only name other programs' objects under /dev/shm, to read and write them
                   shared_memory=control_enabled("--shared-memory", settings.shared_memory, settings.host, ""))

    def interceptors(self, on_refused: Refused) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors to run before any other: a refused call must not reach the handlers' code.
        ``on_refused(method, code)`` counts each refusal (``Metrics.observe_refusal``)."""
        if not self.token:
            return []
        return [AuthInterceptor(self.token, on_refused, protect_health=self.protect_health)]

    def describe(self) -> str:
        """One banner line; says whether a token is required, never what it is."""
        tls = "mutual TLS" if self.mutual_tls else "TLS" if self.credentials is not None else "plaintext (no TLS)"
        if not self.token:
            auth = "no authentication"
        else:
            auth = "bearer token required" + ("" if self.protect_health else " (health checks open)")
        return (f"security: {tls}; {auth}; model control {'on' if self.model_control else 'off'}; "
                f"shared memory {'on' if self.shared_memory else 'off'}")


def load_token(token: str, token_file: str) -> str:
    """The bearer token from ``--auth-token``/``COURSEZOO_AUTH_TOKEN`` or ``--auth-token-file`` ("" = none).

    A file (a Kubernetes or compose secret) is the recommended source: a flag shows in ``ps``. Leading
    and trailing whitespace is dropped, so a trailing newline in the file is harmless.
    """
    if token and token_file:
        raise ConfigError("give the token once: --auth-token (or COURSEZOO_AUTH_TOKEN) or --auth-token-file")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --auth-token-file {token_file}: {type(e).__name__}") from e
        if not token.strip():
            raise ConfigError(f"--auth-token-file {token_file} is empty")
    token = token.strip()
    if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        # gRPC metadata values are printable ASCII; a token a client cannot send would lock everyone out.
        raise ConfigError("the auth token must be printable ASCII without spaces")
    return token


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from elsewhere


def control_enabled(flag: str, mode: str, host: str, token: str) -> bool:
    """Whether the RPCs behind ``flag`` are allowed: RepositoryModelLoad/Unload (``--model-control``), or
    reading and writing the host's shared memory objects (``--shared-memory``, which passes no ``token``).
    ``auto``: only when a token guards them or the port is reachable from this machine alone, so an open
    port never lets strangers unload models or read and write this host's shared memory."""
    if mode not in CONTROL_MODES:
        raise ConfigError(f"{flag} {mode!r}: expected one of {', '.join(CONTROL_MODES)}")
    if mode == "auto":
        return bool(token) or is_loopback(host)
    return mode == "on"


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for a plaintext port (no ``--tls-cert``).

    With ``client_ca`` the server also demands a client certificate signed by that CA (mutual TLS);
    a client without one fails the handshake and never reaches a handler.
    """
    if not cert and not key:
        if client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    pems = {flag: _read_pem(flag, path) for flag, path in
            (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)) if path}
    return grpc.ssl_server_credentials([(pems["--tls-key"], pems["--tls-cert"])],
                                       root_certificates=pems.get("--tls-client-ca"),
                                       require_client_auth="--tls-client-ca" in pems)


def _read_pem(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path} is not a PEM file")
    return data


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse RPCs without ``authorization: Bearer <token>`` with UNAUTHENTICATED, before any handler runs.

    The check happens on the call's metadata, so a refused request is never deserialized. The expected
    header is held as bytes and compared with ``hmac.compare_digest``: the time taken does not reveal
    how much of a guess was right.
    """

    def __init__(self, token: str, on_refused: Refused, *, protect_health: bool = False) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = token.encode("ascii")
        self._open = frozenset() if protect_health else HEALTH_METHODS
        self._on_refused = on_refused
        self._throttle = Throttle()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self._open:
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED, as it would anyway, unlogged
            return None
        # Anyone who can reach the port can send refused calls, so each one must not cost a log line at the levels
        # a deployment runs (it cost ~4 KB at INFO); the metric counts them, and a WARNING a minute per reason
        # names the last caller, so that a client left without the token (or with an old one) can be found.
        log.debug("refused an unauthenticated call", extra={"rpc": method, "reason": problem})
        self._on_refused(method, grpc.StatusCode.UNAUTHENTICATED.name)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                       f"{problem}: send the metadata 'authorization: Bearer <token>'",
                       on_call=lambda context: self._warn(problem, method, context.peer()))

    def _warn(self, problem: str, method: str, peer: str) -> None:
        unlogged = self._throttle.due(problem)  # a few fixed reasons: bounded
        if unlogged is not None:
            log.warning("refused calls without valid credentials (%s); the latest from %s", problem, peer,
                        extra={"rpc": method, "reason": problem, "peer": peer, "unlogged_since_last": unlogged})

    def _problem(self, metadata: Any) -> str | None:
        """Why the call's credentials are not accepted (None: they are). Never includes the value sent."""
        values = [value for key, value in metadata if key == AUTH_HEADER]
        if not values:
            return "missing credentials"
        if len(values) > 1:
            return "more than one authorization header"
        value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        scheme, _, credentials = value.partition(b" ")
        if scheme.lower() != SCHEME.encode():
            return "unsupported authorization scheme (expected Bearer)"
        if not hmac.compare_digest(credentials.strip(), self._expected):
            return "invalid token"
        return None
