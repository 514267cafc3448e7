"""Container health probe: ask the local CourseZoo server's ``grpc.health.v1`` service, exit 0 if SERVING.

Docker's ``HEALTHCHECK`` and the compose ``healthcheck`` run ``python /app/docker/healthcheck.py``. It
reads the same environment as ``coursezoo serve`` (``COURSEZOO_HOST``, ``COURSEZOO_PORT``,
``COURSEZOO_TLS_CERT``, ``COURSEZOO_AUTH_TOKEN[_FILE]``), so a port, TLS or token change in the compose
file needs no second edit. It needs only grpcio and grpcio-health-checking, not the ``serving``
package, so a server bug that breaks imports shows up as an unhealthy container rather than as a
broken probe.

The server reports "" (the whole server) as SERVING once at least one model is ready, and each model
name as SERVING while a version of it is ready: ``--service mnist_cnn`` checks one model.

Exit codes follow Docker's convention: 0 healthy, 1 unhealthy (anything else is reserved).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Binding to every interface is not an address to connect to: use loopback inside the container.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def default_target(env: Mapping[str, str] = os.environ) -> str:
    host = env.get("COURSEZOO_HOST", "")
    host = "127.0.0.1" if host in _WILDCARDS else host
    if ":" in host and not host.startswith("["):  # a bare IPv6 address needs brackets before the port
        host = f"[{host}]"
    return f"{host}:{env.get('COURSEZOO_PORT', '50051')}"


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(target: str, env: Mapping[str, str] = os.environ) -> grpc.Channel:
    """An insecure channel, or TLS when the server runs with ``--tls-cert`` (trusting that certificate).

    ``COURSEZOO_HEALTHCHECK_CA`` overrides the trusted CA (a server certificate signed by a CA), and
    ``COURSEZOO_HEALTHCHECK_TLS_NAME`` the name checked against the certificate, since the probe dials
    loopback while the certificate names the service. With ``--tls-client-ca`` (mutual TLS) the probe
    presents ``COURSEZOO_HEALTHCHECK_CLIENT_CERT`` / ``COURSEZOO_HEALTHCHECK_CLIENT_KEY``.
    """
    cert = env.get("COURSEZOO_TLS_CERT")
    if not cert:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(env.get("COURSEZOO_HEALTHCHECK_CA") or cert),
        private_key=_read(env.get("COURSEZOO_HEALTHCHECK_CLIENT_KEY")),
        certificate_chain=_read(env.get("COURSEZOO_HEALTHCHECK_CLIENT_CERT")))
    options = []
    if env.get("COURSEZOO_HEALTHCHECK_TLS_NAME"):
        options.append(("grpc.ssl_target_name_override", env["COURSEZOO_HEALTHCHECK_TLS_NAME"]))
    return grpc.secure_channel(target, credentials, options=options)


def token_metadata(env: Mapping[str, str] = os.environ) -> list[tuple[str, str]]:
    """The server's own bearer token (``COURSEZOO_AUTH_TOKEN`` or ``_FILE``), for ``--auth-health``."""
    token = env.get("COURSEZOO_AUTH_TOKEN") or (_read(env.get("COURSEZOO_AUTH_TOKEN_FILE")) or b"").decode().strip()
    return [("authorization", f"Bearer {token}")] if token else []


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The status name the server reports for ``service`` (SERVING, NOT_SERVING, ...)."""
    with channel(target) as ch:
        response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout, metadata=token_metadata())
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=default_target(), help="HOST:PORT of the server [from COURSEZOO_HOST/PORT]")
    p.add_argument("--service", default=os.environ.get("COURSEZOO_HEALTHCHECK_SERVICE", ""),
                   help='"" for the whole server (default), or a model name')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds before the check counts as failed")
    args = p.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {args.target} {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:  # an unreadable certificate file
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
