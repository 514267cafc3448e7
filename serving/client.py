"""CourseZooClient: a small typed client of the domain API (coursezoo.v1.Classifier).

    from serving.client import CourseZooClient
    with CourseZooClient("localhost:50051") as client:
        reply = client.classify_files(["seven.png"])
        print(reply.model, reply.predictions[0].digit, reply.predictions[0].confidence)

Replies are the proto messages (``ClassifyDigitsResponse``, ...): typed, and what the server sent.
Large jobs are split into requests of ``chunk_size`` items, sent ``max_in_flight`` at a time, and the
answers merged back in order into one reply. Calls that fail with UNAVAILABLE (server restarting, a
model still loading) or that a stopping server CANCELLED are retried by gRPC itself through the
channel's service config. Failures are raised as ``grpc.RpcError`` with the server's status code and
message.

A server started with TLS and a token (docs/operations.md):

    creds = tls_credentials(ca="ca.pem")  # + cert=, key= for mutual TLS
    client = CourseZooClient("models.example:50051", credentials=creds, token=os.environ["COURSEZOO_AUTH_TOKEN"])
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from serving.card import VERSION_DIR
from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc

#: What ``classify_digits`` accepts per image: an encoded file's bytes, 28x28 uint8 pixels, or an Image.
ImageLike = bytes | np.ndarray | pb.Image
Reply = TypeVar("Reply", pb.ClassifyDigitsResponse, pb.ClassifyDiabetesResponse, pb.ClassifySequencesResponse)

#: Classification has no side effects, so resending is always safe. CANCELLED is retried too: a gRPC
#: server that stops cancels the calls it has received but not yet handed to a handler (grpc/grpc#41785,
#: open), a window the server's drain (serving.server.DrainGate) narrows but cannot close while calls keep
#: arriving, as they do through a load balancer. gRPC never retries a call the caller cancelled itself.
_RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "coursezoo.v1.Classifier"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
    }],
})


#: A connection whose peer stopped answering (its host gone, the network path cut) shows no error by itself:
#: a stream, or a call without a deadline, would wait for ever. gRPC pings the server every ``KEEPALIVE_S``
#: while calls are open and drops the connection (UNAVAILABLE) when a ping goes unanswered for
#: ``PING_TIMEOUT_S``. The server accepts pings this often (``serving.server.MIN_CLIENT_PING_INTERVAL_S``).
KEEPALIVE_S = 30.0
PING_TIMEOUT_S = 20.0


#: gRPC's own schemes whose address is a path or a socket name, not HOST:PORT (grpc/doc/naming.md)
_PATH_SCHEMES = ("unix:", "unix-abstract:", "vsock:")
_EXAMPLE = "localhost:50051"


def check_target(target: str) -> None:
    """Refuse a server address that gRPC would accept but never reach as meant, saying what is expected.

    gRPC dials ``localhost`` (no port) at :443, looks ``50051`` up as a host name and reads
    ``http://localhost:50051`` as a domain name: each fails only as an unreachable server, retried until the
    caller gives up. Accepted: HOST:PORT, [IPv6]:PORT and gRPC's own schemes (``dns:///HOST:PORT``,
    ``ipv4:ADDR:PORT,...``, ``ipv6:[ADDR]:PORT,...``, ``unix:/path``, ``unix-abstract:NAME``, ``vsock:CID:PORT``).
    """
    if target.startswith(_PATH_SCHEMES):
        return
    if target.startswith("dns:"):
        address = target.removeprefix("dns:")
        if address.startswith("//"):  # dns://[AUTHORITY]/HOST:PORT
            address = address[2:].partition("/")[2]
        _check_host_port(target, address)
    elif target.startswith(("ipv4:", "ipv6:")):
        for address in target[len("ipv4:"):].split(","):
            _check_host_port(target, address)
    elif "://" in target:
        raise ValueError(f"server address {target!r} is a URL: expected HOST:PORT without "
                         f"{target.split('://', 1)[0]}:// (e.g. {_EXAMPLE})")
    else:
        _check_host_port(target, target)


def _check_host_port(target: str, address: str) -> None:
    """``address``, all or part of ``target``, is HOST:PORT or [IPv6]:PORT with a port 1..65535."""
    host, port = _host_and_port(target, address)
    if port is None and address.isdigit():
        raise ValueError(f"server address {target!r} has no host: expected HOST:PORT (e.g. localhost:{address})")
    if port is None:
        raise ValueError(f"server address {target!r} has no port: expected HOST:PORT (e.g. {_EXAMPLE})")
    if not host:
        raise ValueError(f"server address {target!r} has no host: expected HOST:PORT (e.g. localhost:{port})")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"server address {target!r} has port {port!r}: expected HOST:PORT with a port 1..65535 "
                         f"(e.g. {_EXAMPLE})")


def _host_and_port(target: str, address: str) -> tuple[str, str | None]:
    """(host, port) of HOST:PORT or [IPv6]:PORT; port None when the address has none."""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise ValueError(f"server address {target!r} is not [IPv6]:PORT: expected e.g. [::1]:50051")
        return host, rest[1:] if rest else None
    if address.count(":") > 1:
        raise ValueError(f"server address {target!r} is an IPv6 address outside brackets or has no port: expected "
                         "HOST:PORT, an IPv6 address in brackets (e.g. [::1]:50051)")
    host, colon, port = address.partition(":")
    return (host, port) if colon else (address, None)


def tls_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                    key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: ``ca`` to trust (None = the system roots), ``cert``/``key`` the
    client's own certificate for a server that demands one (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")

    def read(path: str | Path | None) -> bytes | None:
        """The file's bytes, refused unless PEM: gRPC would only fail at connecting, as an unreachable server."""
        if path is None:
            return None
        data = Path(path).read_bytes()
        if b"-----BEGIN " not in data:
            raise ValueError(f"{path} is not a PEM file: expected -----BEGIN CERTIFICATE----- (or a key)")
        return data

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def to_image(item: ImageLike) -> pb.Image:
    """bytes -> ``Image.encoded`` (a PNG/JPEG/... file); a 28x28 (or 784) array of integer grey levels
    0..255 -> ``Image.pixels``.

    Other arrays are refused, not cast: floats of 0..1 (as torchvision's ToTensor gives) cast to uint8 were
    a near-blank image, answered with a confident wrong digit.
    """
    if isinstance(item, pb.Image):
        return item
    if isinstance(item, bytes | bytearray | memoryview):
        return pb.Image(encoded=bytes(item))
    pixels = np.asarray(item)
    if pixels.shape not in ((28, 28), (784,), (1, 28, 28)):
        raise ValueError(f"pixels of shape {pixels.shape}: expected 28x28 (or 784) grey levels")
    if pixels.dtype.kind not in "ui" or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"pixels of dtype {pixels.dtype} from {pixels.min()} to {pixels.max()}: expected integer "
                         "grey levels 0..255 (scale floats yourself: (x * 255).round().astype(np.uint8))")
    return pb.Image(pixels=pixels.astype(np.uint8, copy=False).tobytes())


class CourseZooClient:
    """Blocking client, safe to share between threads.

    ``target`` is HOST:PORT, or an address in one of gRPC's own schemes; anything else is refused at once
    (``check_target``) rather than retried as an unreachable server. ``credentials`` (see ``tls_credentials``)
    makes the channels TLS; ``token`` sends ``authorization: Bearer <token>`` with every call, as a server
    started with ``--auth-token`` requires.
    ``connections`` > 1 opens that many TCP connections and sends each call on the next one in turn: a
    server of several worker processes (``coursezoo serve --workers N``) spreads connections over its
    workers, not calls, so one connection would keep a whole job on one worker.
    """

    def __init__(self, target: str, *, timeout: float = 30.0, chunk_size: int = 256, max_in_flight: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
                 token: str | None = None, max_message_mb: int = 64, connections: int = 1,
                 keepalive_s: float = KEEPALIVE_S, ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        check_target(target)
        for name, value in (("connections", connections), ("chunk_size", chunk_size),
                            ("max_in_flight", max_in_flight)):
            if value < 1:
                raise ValueError(f"{name}={value}: expected 1 or more")
        ping_timeout_ms = int(ping_timeout_s * 1000)
        options = [("grpc.max_send_message_length", max_message_mb << 20),
                   ("grpc.max_receive_message_length", max_message_mb << 20),
                   ("grpc.enable_retries", 1), ("grpc.service_config", _RETRY_SERVICE_CONFIG),
                   # gRPC 1.85 drops an unanswered keepalive ping after the ping timeout (60 s by default),
                   # not after the keepalive timeout alone: both are set. And it sends at most 2 pings while no
                   # data goes out unless told otherwise: a stream quiet for a minute stopped pinging, and then
                   # waited for ever on a server that went away.
                   ("grpc.keepalive_time_ms", int(keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", ping_timeout_ms),
                   ("grpc.http2.ping_timeout_ms", ping_timeout_ms), ("grpc.http2.max_pings_without_data", 0),
                   # Channels of one process otherwise share one connection per target and options.
                   ("grpc.use_local_subchannel_pool", int(connections > 1))]
        self.channels = [grpc.secure_channel(target, credentials, options) if credentials is not None
                         else grpc.insecure_channel(target, options) for _ in range(connections)]
        self._stubs = [classifier_pb2_grpc.ClassifierStub(channel) for channel in self.channels]
        self._turn = itertools.count()
        self.target = target
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_in_flight = max_in_flight
        self.metadata = (*metadata, ("authorization", f"Bearer {token}")) if token else tuple(metadata)

    def __enter__(self) -> CourseZooClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stub(self) -> classifier_pb2_grpc.ClassifierStub:
        """The stub of the next connection in turn (``next`` on a count is atomic, so threads may share it)."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every connection is up (raises ``grpc.FutureTimeoutError`` after ``timeout``)."""
        for channel in self.channels:
            grpc.channel_ready_future(channel).result(timeout=timeout)

    def list_models(self, task: str = "") -> list[pb.ModelInfo]:
        reply = self.stub.ListModels(pb.ListModelsRequest(task=task), timeout=self.timeout, metadata=self.metadata)
        return list(reply.models)

    def classify_digits(self, images: Sequence[ImageLike], model: str = "", version: str = "") -> \
            pb.ClassifyDigitsResponse:
        """Digits for encoded image files and/or raw pixels, in order; ``model=""`` = the best digits model."""
        requests = [pb.ClassifyDigitsRequest(model=model, version=version, images=[to_image(i) for i in chunk])
                    for chunk in _chunks(images, self.chunk_size)]
        # An empty job still sends one request: the server's answer (INVALID_ARGUMENT) is the direct call's.
        requests = requests or [pb.ClassifyDigitsRequest(model=model, version=version)]
        return self._merge("ClassifyDigits", requests, pb.ClassifyDigitsResponse())

    def classify_files(self, paths: Iterable[str | Path], model: str = "", version: str = "") -> \
            pb.ClassifyDigitsResponse:
        return self.classify_digits([Path(p).read_bytes() for p in paths], model, version)

    def stream_classify_digits(self, images: Iterable[ImageLike], model: str = "", version: str = "",
                               timeout: float | None = None) -> Iterator[pb.ClassifyDigitsResponse]:
        """Pipeline a long (even unbounded) sequence of images over one stream, ``chunk_size`` per message.

        Yields one reply per chunk, in order; each reply's ``id`` is the chunk's index, and each is checked to
        answer its chunk (BadReply otherwise, as for a stream that ends with chunks unanswered). ``timeout``
        bounds the whole stream (None: no deadline, for an unbounded one).
        """
        sent: collections.deque[pb.ClassifyDigitsRequest] = collections.deque()  # sent, not answered: no images

        def requests() -> Iterator[pb.ClassifyDigitsRequest]:
            for i, chunk in enumerate(_chunks(images, self.chunk_size)):
                request = pb.ClassifyDigitsRequest(model=model, version=version, images=[to_image(x) for x in chunk],
                                                   id=str(i))
                sent.append(pb.ClassifyDigitsRequest(model=model, version=version, id=request.id,
                                                     images=[pb.Image()] * len(chunk)))
                yield request

        for reply in self.stub.StreamClassifyDigits(requests(), timeout=timeout, metadata=self.metadata):
            if not sent or reply.id != sent[0].id:
                raise BadReply(f"the stream answered id {reply.id!r}, expected {sent[0].id if sent else 'none'!r}")
            yield _answering(sent.popleft(), reply, int(reply.id) * self.chunk_size)
        if sent:
            raise BadReply(f"the stream ended with {len(sent)} messages unanswered, from id {sent[0].id!r}")

    def classify_diabetes(self, records: Sequence[Sequence[float]], model: str = "", version: str = "") -> \
            pb.ClassifyDiabetesResponse:
        requests = [pb.ClassifyDiabetesRequest(model=model, version=version,
                                               records=[pb.DiabetesRecord(features=r) for r in chunk])
                    for chunk in _chunks(records, self.chunk_size)]
        requests = requests or [pb.ClassifyDiabetesRequest(model=model, version=version)]
        return self._merge("ClassifyDiabetes", requests, pb.ClassifyDiabetesResponse())

    def classify_sequences(self, texts: Sequence[str], model: str = "", top_k: int = 0, version: str = "") -> \
            pb.ClassifySequencesResponse:
        """Countries of names (names models) or output strings (hello models); ``model=""`` = best names model."""
        requests = [pb.ClassifySequencesRequest(model=model, version=version, texts=chunk, top_k=top_k)
                    for chunk in _chunks(texts, self.chunk_size)]
        requests = requests or [pb.ClassifySequencesRequest(model=model, version=version, top_k=top_k)]
        return self._merge("ClassifySequences", requests, pb.ClassifySequencesResponse())

    def _merge(self, method: str, requests: list, reply: Reply) -> Reply:
        """Send the chunks ``max_in_flight`` at a time, each on the next connection, and concatenate their
        predictions in order.

        Each chunk names the model as the caller did ("" = the default, newest version), so a version that
        comes into service mid-call answers only the later chunks: those answered by another model version
        than the last chunk are asked again of that one, and the reply is one version's throughout.
        """
        parts = []
        for start in range(0, len(requests), self.max_in_flight):
            futures = [getattr(self.stub, method).future(r, timeout=self.timeout, metadata=self.metadata)
                       for r in requests[start:start + self.max_in_flight]]
            for i, future in enumerate(futures, start):
                try:
                    parts.append(_answering(requests[i], future.result(), i * self.chunk_size))
                except BadReply:  # it says which items already
                    raise
                except grpc.RpcError as e:
                    if len(requests) == 1:
                        raise
                    raise ChunkError(e, i * self.chunk_size, len(_items_of(requests[i]))) from e
        final = parts[-1]
        for i, part in enumerate(parts):
            if (part.model, part.model_version) != (final.model, final.model_version):
                pinned = type(requests[i])()
                pinned.CopyFrom(requests[i])
                pinned.model, pinned.version = final.model, final.model_version
                parts[i] = _answering(pinned, getattr(self.stub, method)(pinned, timeout=self.timeout,
                                                                         metadata=self.metadata), i * self.chunk_size)
        reply.model, reply.model_version = final.model, final.model_version
        for part in parts:
            reply.predictions.extend(part.predictions)
        return reply


class ClientError(grpc.RpcError):
    """An error this client raises itself, read as a server's (``code``, ``details``) by whoever handles gRPC's."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class BadReply(ClientError):
    """The server's reply does not answer the request sent: another number of predictions than items, or
    another model or version than the one named. Its predictions cannot be matched to the items, so none is
    kept (status INTERNAL: the server broke the API's contract)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, details)


def _answering(request: Message, reply: Reply, start: int) -> Reply:
    """``reply``, checked to answer ``request`` (its items from ``start`` of the call): one prediction per item,
    from the model and version the request named, if it named them (BadReply otherwise)."""
    items, answered = len(_items_of(request)), len(reply.predictions)
    where = f"items {start}..{start + items - 1} of this call" if items else "this call"
    if answered != items:
        raise BadReply(f"the server answered {answered} predictions for the {items} {where}: none can be matched "
                       "to its item")
    wrong_version = request.version and not _same_version(reply.model_version, request.version)
    if (request.model and reply.model != request.model) or wrong_version:
        asked = f"{request.model or 'the default model'}{':' + request.version if request.version else ''}"
        raise BadReply(f"the server answered {where} with {reply.model}:{reply.model_version}, asked for {asked}")
    return reply


def _same_version(answered: str, asked: str) -> bool:
    """Whether the version a reply names is the one asked for: the server reads "01" as version 1."""
    numbers = [int(v) if VERSION_DIR.fullmatch(v) else v for v in (answered, asked)]
    return numbers[0] == numbers[1]


class ChunkError(ClientError):
    """A request of a job sent in chunks failed: the server's status code, and its message prefixed with the
    items that request carried, as the server counts positions within its request ("name 1" of items 8..11
    is the caller's item 9)."""

    def __init__(self, error: grpc.RpcError, start: int, count: int) -> None:
        super().__init__(error.code(), f"items {start}..{start + count - 1} of this call, sent as one request: "
                                       f"{error.details()}")


def _items_of(request: Message) -> Sequence[object]:
    """The repeated field a chunked request carries its items in."""
    return next(getattr(request, f) for f in ("images", "records", "texts") if hasattr(request, f))


T = TypeVar("T")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size``; a lone ``str`` or ``bytes`` is refused, as iterating it would make each character
    (or byte) an item: ``classify_sequences("Rossi")`` answered five one-letter names."""
    if isinstance(items, str | bytes | bytearray):
        raise TypeError(f"expected a sequence of items, got a single {type(items).__name__}: wrap it in a list")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
