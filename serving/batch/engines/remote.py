"""The server engine: batches go to a running ``coursezoo serve`` through the domain API (CourseZooClient).

The pipeline calls ``classify`` from ``--in-flight`` threads at once, so while the server runs one batch
the next ones are already on the wire and it never waits for this client. A restart of the server
loses nothing: UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff for up to
``retry_for`` seconds (then the run stops with exit status 1 and ``--resume`` finishes it later).
A batch the server refuses as a whole because of one bad input (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)
is split in halves until the bad inputs stand alone, so each becomes its own error row. Any other
refusal (no or a wrong token, a call the server does not know) stops the run with its status and what
to do about it, never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from serving.batch.engines import EngineError, diabetes_answer, model_spec, top_classes
from serving.batch.prepare import INVALID, TOO_LARGE, Preparer
from serving.batch.types import KINDS, Failure, Prediction
from serving.client import BadReply, CourseZooClient
from serving.protos import classifier_pb2 as pb

log = logging.getLogger(__name__)

TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: the server refused the input, not the request: split the batch to find which item
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0
#: encoded images per request are capped by bytes too, well under gRPC's 64 MiB message limit
MAX_REQUEST_BYTES = 16 << 20
#: connections to the server, at least: its worker processes (--workers) each take whole connections, and
#: with 8 the chance that all of them land on one of 2 workers is 1 in 128
CONNECTIONS = 8
#: what to do when the server refuses who is calling rather than what was sent
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "it wants the bearer token it was started with: pass --auth-token-file FILE, "
                                     "or set COURSEZOO_AUTH_TOKEN_FILE or COURSEZOO_AUTH_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "these credentials may not make the call; ask the server's operator for "
                                       "a token or client certificate that may",
    grpc.StatusCode.UNIMPLEMENTED: "it does not serve CourseZoo's domain API; expected the address of a "
                                   "`coursezoo serve`",
}


class RemoteEngine:
    """Classifies through a server; the model is resolved once, from ``ListModels``, so it stays fixed."""

    worker_classify = None  # the calls go out from this process's threads

    def __init__(self, client: CourseZooClient, retrying: Retrying, info: pb.ModelInfo, version: str, *,
                 top_k: int, in_flight: int) -> None:
        self.client, self.retrying, self.name, self.version = client, retrying, info.name, version
        self.target = retrying.target
        self.kind = info.task
        self.labels = tuple(info.labels)
        # Each version's labels: a server may bring a new version in mid-run, and its labels with it.
        self._labels = {info.version: self.labels}
        self._labels_lock = threading.Lock()
        self.top_k = top_k
        self.concurrency = in_flight
        self.preparer = Preparer(self.kind)
        self.description = f"{info.name} v{version or info.version}, server {self.target}, {info.provider}"

    @classmethod
    def open(cls, target: str, spec: str | None, kind: str | None, *, top_k: int, in_flight: int, timeout: float,
             retry_for: float, token: str = "", credentials: grpc.ChannelCredentials | None = None) -> RemoteEngine:
        """Connect and pick the model: ``spec`` (NAME[:VERSION]) or the server's default model of ``kind``.

        ``token`` and ``credentials`` (TLS) are what a server started with ``--auth-token-file`` or
        ``--tls-cert`` asks of its clients.
        """
        name, version = model_spec(spec)
        # Several connections, so a server of several worker processes (--workers) gets the job on all of them.
        client = CourseZooClient(target, timeout=timeout, max_in_flight=1, connections=max(in_flight, CONNECTIONS),
                                 token=token or None, credentials=credentials)
        retrying = Retrying(target, retry_for)
        try:
            try:
                models = retrying(client.list_models)
            except grpc.RpcError as e:
                raise _failed(target, e) from e
            info = _choose(models, target, name, version, kind)
            if not info.labels:  # the answers name labels by index
                raise EngineError(f"server {target} lists {info.name} without its labels: expected its card's")
        except EngineError:
            client.close()
            raise
        return cls(client, retrying, info, version, top_k=top_k, in_flight=in_flight)

    def classify(self, inputs: Sequence[Any]) -> list[Prediction | Failure]:
        if self.kind == "digits":
            return [answer for group in _by_size(inputs, MAX_REQUEST_BYTES) for answer in self._split(group)]
        return self._split(inputs)

    def _split(self, inputs: Sequence[Any]) -> list[Prediction | Failure]:
        """Answers for ``inputs``; when the server refuses the batch, halves until each refused item is alone."""
        try:
            return self._answers(self.retrying(lambda: self._request(inputs)))
        except grpc.RpcError as e:
            if e.code() not in REFUSED:
                raise _failed(self.target, e) from e
            if len(inputs) == 1:
                if "CLIENT: Received message larger than max" in (e.details() or ""):  # gRPC's words: the reply
                    raise EngineError(f"server {self.target} answered one input with more than this client takes "
                                      f"({e.details()})") from e
                too_large = self.kind == "digits" and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return [Failure(TOO_LARGE if too_large else INVALID[self.kind], e.details() or e.code().name)]
            half = len(inputs) // 2
            return self._split(inputs[:half]) + self._split(inputs[half:])

    def _request(self, inputs: Sequence[Any]) -> Any:
        if self.kind == "digits":
            return self.client.classify_digits(inputs, self.name, self.version)
        if self.kind == "diabetes":
            return self.client.classify_diabetes(inputs, self.name, self.version)
        return self.client.classify_sequences(inputs, self.name, max(self.top_k, 1), self.version)

    def _answers(self, reply: Any) -> list[Prediction | Failure]:
        """The reply's predictions as rows; EngineError for an answer no model of this kind can give (the client
        has checked that the reply answers each input once, from the model asked for)."""
        model, version = reply.model, reply.model_version
        labels = self._labels_of(version)
        for p in reply.predictions:
            self._check(p, labels)
        if self.kind == "digits":
            return [Prediction(labels[p.digit], p.confidence, model, version,
                               top_classes(p.probabilities, labels, self.top_k)) for p in reply.predictions]
        if self.kind == "diabetes":
            answers = []
            for p in reply.predictions:
                confidence, scores = diabetes_answer(p.label, p.probability)
                answers.append(Prediction(labels[p.label], confidence, model, version,
                                          top_classes(scores, labels, self.top_k)))
            return answers
        return [Prediction(p.label, p.confidence, model, version,
                           tuple((t.label, t.score) for t in p.top[: self.top_k])) for p in reply.predictions]

    def _labels_of(self, version: str) -> tuple[str, ...]:
        """The labels of the model's ``version``: asked of the server (``ListModels``) the first time a version
        answers; a version it no longer lists as the model's newest has answered with labels nobody can tell."""
        with self._labels_lock:
            if version not in self._labels:
                listed = next((m for m in self.retrying(self.client.list_models) if m.name == self.name), None)
                if listed is None or listed.version != version or not listed.labels:
                    raise EngineError(f"server {self.target} answered with {self.name} v{version}, whose labels it "
                                      "does not list: run again (--resume) to classify the rest with one version")
                self._labels[version] = tuple(listed.labels)
            return self._labels[version]

    def _check(self, p: Any, labels: tuple[str, ...]) -> None:
        """A prediction a model with ``labels`` can make: a label it has (by index for digits and diabetes, by
        name for names; a hello answer is a string of its characters), a score for each label, scores from 0
        to 1 (NaN is none)."""
        if self.kind == "digits":
            known = 0 <= p.digit < len(labels) and len(p.probabilities) == len(labels)
            label, scores = p.digit, [p.confidence, *p.probabilities]
        elif self.kind == "diabetes":
            known, label, scores = 0 <= p.label < len(labels), p.label, [p.probability]
        else:
            names = [p.label, *(t.label for t in p.top)] if self.kind == "names" else []
            known = all(n in labels for n in names) and (self.kind == "names" or set(p.label) <= set(labels))
            label, scores = p.label, [p.confidence, *(t.score for t in p.top)]
        if not known or not all(0.0 <= x <= 1.0 for x in scores):
            raise EngineError(f"server {self.target} answered a prediction no {self.kind} model can make (label "
                              f"{label!r}, scores {scores[:3]}): nothing of this batch is kept")

    def close(self) -> None:
        """Stop retrying and cancel calls still in flight (an aborted run must not wait for them)."""
        self.retrying.stop.set()
        self.client.close()


def _failed(target: str, error: grpc.RpcError) -> EngineError:
    """A call the server (or the connection) ended with a status that no retry or split can help: one line
    with the status, the server's words and, for a refusal of the caller, what to do."""
    if isinstance(error, BadReply):
        return EngineError(f"server {target}: {error.details()}")
    message = f"server {target} answered {error.code().name} ({error.details()})"
    hint = HINTS.get(error.code())
    return EngineError(f"{message}: {hint}" if hint else message)


def _choose(models: Sequence[pb.ModelInfo], target: str, name: str, version: str, kind: str | None) -> pb.ModelInfo:
    """The ready model ``name`` (at ``version``, if given), else the server's default model of ``kind``."""
    ready = [m for m in models if m.ready]
    if not name:
        info = next((m for m in ready if m.task == kind and m.is_default), None)
        if info is None:
            raise EngineError(f"server {target} has no ready {kind} model")
        return info
    info = next((m for m in ready if m.name == name), None)
    if info is None:
        raise EngineError(f"server {target} has no ready model {name!r}; it serves "
                          f"{', '.join(f'{m.name}:{m.version}' for m in ready) or 'nothing'}")
    if version and version not in info.versions:
        raise EngineError(f"model {name!r} has no version {version!r} ready on server {target}; versions: "
                          f"{', '.join(info.versions)}")
    if info.task not in KINDS or (kind and info.task != kind):
        raise EngineError(f"{name} is a {info.task} model; the inputs are {kind or ', '.join(KINDS)}")
    return info


class Retrying:
    """Runs calls, retrying while the server is unavailable (restarting, loading) for up to ``retry_for`` s.

    One instance is shared by the threads in flight; ``stop`` ends every wait at once when the run ends.
    """

    def __init__(self, target: str, retry_for: float) -> None:
        self.target, self.retry_for = target, retry_for
        self.stop = threading.Event()

    def __call__(self, call: Callable[[], Any]) -> Any:
        give_up, backoff = None, FIRST_BACKOFF_S
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in TRANSIENT or self.stop.is_set():
                    raise
                now = time.monotonic()
                give_up = give_up or now + self.retry_for
                if now >= give_up:
                    raise EngineError(f"server {self.target} unreachable for {self.retry_for:g} s "
                                      f"({e.code().name}: {e.details()}): {_unreachable_hint(e)}") from e
                log.warning("server unavailable, retrying", extra={"target": self.target, "code": e.code().name,
                                                                   "backoff_s": backoff})
                if self.stop.wait(min(backoff, give_up - now)):
                    raise
                backoff = min(2 * backoff, MAX_BACKOFF_S)


def _unreachable_hint(error: grpc.RpcError) -> str:
    """What to check about a server that never answered: a host name that does not resolve has nothing to do
    with TLS (gRPC's resolvers say "DNS resolution failed for ..." or "errors resolving ..."), and a server
    that answered nothing within the deadline may be up but slow (or stuck)."""
    if any(words in (error.details() or "") for words in ("DNS resolution failed", "errors resolving")):
        return "is the host name right, and known to this machine's DNS?"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ("no answer within --timeout: a slow or stuck server (a larger --timeout or a smaller --batch-size "
                "gives it more time per request), or a host and port that do not answer gRPC at all")
    return ("is it running there, and does this run's TLS match the server's (none for plaintext, --tls-ca for TLS, "
            "and --tls-cert/--tls-key for mutual TLS)?")


def _by_size(images: Sequence[bytes], budget: int) -> list[Sequence[bytes]]:
    """Consecutive groups of encoded images of at most ``budget`` bytes each (a bigger image goes alone)."""
    groups, start, size = [], 0, 0
    for i, data in enumerate(images):
        if i > start and size + len(data) > budget:
            groups.append(images[start:i])
            start, size = i, 0
        size += len(data)
    groups.append(images[start:])
    return groups
