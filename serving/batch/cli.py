"""``coursezoo batch``: classify folders of images, CSV files and name lists into one results file.

    coursezoo batch scans/ --recursive --out digits.csv          # every image under scans/
    coursezoo batch patients.csv --top-k 2                       # diabetes records (+ label column)
    coursezoo batch names.txt --server localhost:50051 --resume  # through a running server
    coursezoo batch scans/ --server models.example:50051 --tls-ca ca.pem --auth-token-file token  # TLS, token
    coursezoo batch scans/ -r --engine ray --ray-address auto    # as a Ray Data pipeline on a cluster

Every input becomes one row of the results file, in a stable order; inputs that cannot be classified
become rows with their reason, and the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from coursezoo.args import at_least
from serving.batch import pipeline, sources
from serving.batch.discover import check_inputs, first_files, infer_kind, iter_files
from serving.batch.engines import Engine
from serving.batch.items import LABELLED_KINDS, iter_items
from serving.batch.output import FORMATS, RenderedRows, ResultWriter, check_target, columns, partial_path
from serving.batch.summary import Summary
from serving.batch.types import KINDS, BatchError, Item
from serving.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from serving.workers import cores

if TYPE_CHECKING:  # Ray is an optional extra, gRPC needed only with --server: imported when they run
    import grpc

    from serving.batch.engines.ray import RayEngine

#: the variables `coursezoo serve` reads its bearer token from (serving.server: COURSEZOO_ + the setting)
TOKEN_ENV, TOKEN_FILE_ENV = "COURSEZOO_AUTH_TOKEN", "COURSEZOO_AUTH_TOKEN_FILE"
#: the batch client's own TLS files: not the server's COURSEZOO_TLS_* (a server's certificate is not a client's)
ENV_PREFIX = "COURSEZOO_BATCH_"
#: kinds whose inputs are both plain text lines (names or hello words), which content cannot tell apart
TEXT_KINDS = {"names", "hello"}
EXIT_OK, EXIT_FATAL, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS = """exit status:
  0    every input classified
  2    some inputs failed; each is a row of the output with its reason
  1    nothing could run (bad arguments, no model, server unreachable after retries or refusing the caller)
  130  interrupted; the results so far are kept for --resume"""


class _Parser(argparse.ArgumentParser):
    """Bad arguments exit with 1, the status the batch CLI promises for "nothing could run"; INPUTs may follow
    options (``coursezoo batch scans -r names.txt`` refused names.txt as an unrecognized argument)."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        args = sys.argv[1:] if args is None else list(args)
        if "--" in args:  # Python 3.11's intermixed parsing drops the INPUTs after "--" (batch -- -x.png)
            return super().parse_args(args, namespace)
        return self.parse_intermixed_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_FATAL, f"{self.prog}: error: {message}\n")


_positive, _non_negative = at_least(1), at_least(0)


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, > 0 (or >= 0 with ``zero``). A deadline of 0 or less failed
    every call at once, which was retried and then reported as an unreachable server."""
    least = "0 or more" if zero else "more than 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds, {least}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{text}: expected a number of seconds, {least}")
        return value

    return parse


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Classify folders of images, CSV files and name lists into one results file.",
                epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folders, files, glob patterns ('scans/**/*.png'), or s3:// and gs:// prefixes or objects")
    p.add_argument("--kind", choices=KINDS, help="what the inputs are; inferred from their content when unambiguous")
    p.add_argument("--model", metavar="NAME[:VERSION]", help="model to use; default: the most accurate of the kind")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run ONNX Runtime in this process (the default)")
    where.add_argument("--server", metavar="HOST:PORT", help="send batches to a running `coursezoo serve`")

    local = p.add_argument_group("--local")
    local.add_argument("--repo", type=Path, default=Path("exported"), help="model repository (default: exported)")
    local.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="ONNX Runtime device (default: auto)")
    local.add_argument("--threads", type=_non_negative, default=0, metavar="N",
                       help="CPU threads one model run may use; for images on the CPU the --workers processes run the "
                       "model, with N threads each (default: 1 when workers decode images, else one per core)")
    local.add_argument("--max-image-pixels", type=_positive, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help="larger images (width * height) are refused, as the server does (default: %(default)s)")
    local.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="run the model in this process, or as a Ray Data pipeline (pip install "
                       "'coursezoo[ray]') (default: local)")

    distributed = p.add_argument_group("--engine ray")
    distributed.add_argument("--ray-address", metavar="ADDRESS",
                             help="'auto' (the cluster this machine belongs to) or ray://HOST:10001; default: "
                             "start a Ray instance on this machine")
    distributed.add_argument("--num-gpus-per-worker", type=float, default=0.0, metavar="G",
                             help="GPUs per model actor; > 0 runs ONNX Runtime with CUDA (default: 0, CPU)")
    distributed.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                             help="model actors, one CPU each (default: 1)")

    remote = p.add_argument_group("--server")
    remote.add_argument("--in-flight", type=_positive, default=4, metavar="N",
                        help="requests in flight at once, so the server never waits (default: 4)")
    remote.add_argument("--timeout", type=_seconds(zero=False), default=60.0, metavar="S",
                        help="deadline of a request (default: 60)")
    remote.add_argument("--retry-for", type=_seconds(zero=True), default=60.0, metavar="S",
                        help="how long to retry an unavailable server before giving up (default: 60; 0: never)")
    # The client side of `coursezoo serve`'s security options (docs/operations.md). The token is the server's
    # own secret, so it comes from the server's variables; never from a flag, which would show in `ps`.
    remote.add_argument("--auth-token-file", default=os.environ.get(TOKEN_FILE_ENV, ""), metavar="FILE",
                        help="file holding the bearer token of a server started with one [env "
                        f"{TOKEN_FILE_ENV}]; or the token itself in {TOKEN_ENV}")
    remote.add_argument("--tls-ca", default=os.environ.get(f"{ENV_PREFIX}TLS_CA", ""), metavar="PEM",
                        help="speak TLS, trusting the server certificates this CA signed (or the server's own "
                        f"self-signed certificate) [env {ENV_PREFIX}TLS_CA]")
    remote.add_argument("--tls-cert", default=os.environ.get(f"{ENV_PREFIX}TLS_CERT", ""), metavar="PEM",
                        help="certificate this client presents to a server that demands one (--tls-client-ca, "
                        f"mutual TLS) [env {ENV_PREFIX}TLS_CERT]")
    remote.add_argument("--tls-key", default=os.environ.get(f"{ENV_PREFIX}TLS_KEY", ""), metavar="PEM",
                        help=f"private key of --tls-cert [env {ENV_PREFIX}TLS_KEY]")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="results file (default: results.csv, or results.jsonl)")
    out.add_argument("--format", choices=FORMATS, help="default: from --out's suffix, else csv")
    existing = out.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    existing.add_argument("--resume", action="store_true",
                          help="skip the inputs already in the results file, append the rest")
    out.add_argument("--top-k", type=_non_negative, default=0, metavar="K",
                     help="add the K best classes and their scores")

    run = p.add_argument_group("run")
    run.add_argument("--recursive", "-r", action="store_true", help="read sub-folders too")
    run.add_argument("--batch-size", type=_positive, default=256, metavar="N",
                     help="items per model call or request (default: 256)")
    run.add_argument("--workers", type=_non_negative, metavar="N",
                     help="processes reading images, and decoding them without --server (default: one per core; "
                     "with --server on local files 0, as the server decodes; 0: all in this process)")
    run.add_argument("--limit", type=_positive, metavar="N", help="stop after N new inputs (try a sample, then "
                     "--resume)")
    return p


def main(args: argparse.Namespace) -> int:
    writer: ResultWriter | None = None
    engine: Engine | RayEngine | None = None
    workers: pipeline.Workers | None = None
    try:
        if args.engine == "ray" and args.server:
            raise BatchError("--engine ray runs the models of --repo; it does not combine with --server")
        if args.server:
            _check_server(args.server)
        check_inputs(args.inputs)
        fmt = args.format or ("jsonl" if args.out and args.out.suffix in (".jsonl", ".json") else "csv")
        args.out = args.out or Path(f"results.{fmt}")
        check_target(args.out, overwrite=args.overwrite, resume=args.resume)  # before any slow start-up
        sample = first_files(args.inputs, args.recursive, _own_files(args))
        if not sample:
            raise BatchError(f"no files in {' '.join(args.inputs)}" + ("" if args.recursive else " (--recursive?)"))
        try:
            kind = args.kind or infer_kind(args.inputs, args.recursive, _own_files(args), sample)
        except BatchError:  # saying why the kind is ambiguous, which a --model settles
            if not args.model:
                raise
            kind = None
        if args.workers is None:
            args.workers = default_workers(args.server, args.inputs)
        if args.workers and kind in ("digits", None) and args.engine == "local":  # Ray decodes in its own tasks
            workers = pipeline.Workers(args.workers)  # their start-up overlaps the model's loading
        engine = _open_engine(args, kind)
        cols = columns(args.top_k, with_label=engine.kind in LABELLED_KINDS)
        writer = ResultWriter(args.out, fmt, cols, overwrite=args.overwrite, resume=args.resume)
        summary = Summary(str(writer.out), engine.description, engine.labels, resumed=writer.kept,
                          resumed_failed=writer.done_failed)
        _classify(args, engine, workers if engine.kind == "digits" else None, writer, summary)
    except BatchError as e:
        print(f"coursezoo batch: error: {e}{_kept(writer)}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print(f"\ncoursezoo batch: interrupted{_kept(writer)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for resource in (writer, engine, workers):
            if resource:
                resource.close()
    print(summary.render())
    return EXIT_SOME_FAILED if summary.failed + writer.done_failed else EXIT_OK


def default_workers(server: str | None, inputs: list[str]) -> int:
    """One worker process per core, except for local files sent to a server: the server decodes, and
    reading a file costs ~10 µs, less than handing its bytes over from another process. Measured on 2
    cores sharing them with the server, 20,000 MNIST PNGs: 12,830-14,407 images/s with two workers,
    13,332-17,056 without, and a third less client CPU. Objects in a bucket are still read by workers,
    each waiting on its own requests."""
    if server and not any(sources.is_uri(i) for i in inputs):
        return 0
    return cores()


def _kept(writer: ResultWriter | None) -> str:
    if writer is None or not writer.rows:
        return ""
    return f"\ncoursezoo batch: {writer.rows} results are kept in {writer.partial}; run again with --resume to finish"


def _open_engine(args: argparse.Namespace, kind: str | None) -> Engine | RayEngine:
    """The engine for ``--kind``, else for ``--model`` (its task is the kind), else for the inferred kind.

    A named model whose task contradicts what the inputs clearly are (a diabetes model for a list of
    names) is refused rather than turning every input into an error row.
    """
    engine = _engine(args, args.kind or (None if args.model else kind))
    if not args.kind and kind and kind != engine.kind and not {kind, engine.kind} <= TEXT_KINDS:
        engine.close()
        raise BatchError(f"--model {args.model} classifies {engine.kind} but the inputs look like {kind}; "
                         f"pass --kind {engine.kind} to read them as {engine.kind} anyway")
    return engine


def _engine(args: argparse.Namespace, kind: str | None) -> Engine | RayEngine:
    if args.engine == "ray":
        from serving.batch.engines.ray import RayEngine

        return RayEngine.open(args.repo, args.model, kind, address=args.ray_address,
                              num_gpus=args.num_gpus_per_worker, concurrency=args.concurrency, device=args.device,
                              top_k=args.top_k, max_image_pixels=args.max_image_pixels, threads=args.threads or None)
    if args.server:
        from serving.batch.engines.remote import RemoteEngine

        return RemoteEngine.open(args.server, args.model, kind, top_k=args.top_k, in_flight=args.in_flight,
                                 timeout=args.timeout, retry_for=args.retry_for, token=_token(args),
                                 credentials=_tls(args))
    from serving.batch.engines.local import LocalEngine

    return LocalEngine.open(args.repo, args.model, kind, device=args.device, top_k=args.top_k,
                            max_image_pixels=args.max_image_pixels, threads=args.threads or None,
                            decode_workers=args.workers)


def _check_server(target: str) -> None:
    """Refuse a ``--server`` address without a port, or a URL, before any work: the client would dial it and
    retry for ``--retry-for`` seconds, then call the server unreachable (``serving.client.check_target``)."""
    from serving.client import check_target

    try:
        check_target(target)
    except ValueError as e:
        raise BatchError(str(e)) from e


def _token(args: argparse.Namespace) -> str:
    """The server's bearer token ("" = none), read and checked as `coursezoo serve` reads its own: from
    ``--auth-token-file`` (default ``COURSEZOO_AUTH_TOKEN_FILE``) or ``COURSEZOO_AUTH_TOKEN``."""
    from serving.security import ConfigError, load_token

    try:
        return load_token(os.environ.get(TOKEN_ENV, ""), args.auth_token_file)
    except ConfigError as e:
        raise BatchError(str(e)) from e


def _tls(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from ``--tls-ca``/``--tls-cert``/``--tls-key``, or None for a plaintext connection."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from serving.client import tls_credentials

    if bool(args.tls_cert) != bool(args.tls_key):
        raise BatchError("--tls-cert and --tls-key go together: the certificate this client presents and its "
                         "private key")
    try:
        return tls_credentials(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)
    except ValueError as e:  # not PEM
        raise BatchError(str(e)) from e
    except OSError as e:
        raise BatchError(f"cannot read the TLS file {e.filename}: {e.strerror or e}") from e


def _todo(args: argparse.Namespace, kind: str, writer: ResultWriter, *, warn_skipped: bool = False) -> Iterator[Item]:
    """The inputs this run classifies: every item not already in the output, up to ``--limit``; only the
    listing that feeds the work warns about skipped subfolders (``iter_files``)."""
    files = iter_files(args.inputs, args.recursive, _own_files(args), warn_skipped=warn_skipped)
    items = (item for item in iter_items(files, kind) if not writer.has(item.id))
    return itertools.islice(items, args.limit)


def _own_files(args: argparse.Namespace) -> set[str]:
    """The results file and its partial file, never inputs (``coursezoo batch . --resume`` must not read them)."""
    return {os.path.abspath(args.out), os.path.abspath(partial_path(args.out))}


def _classify(args: argparse.Namespace, engine: Engine | RayEngine, workers: pipeline.Workers | None,
              writer: ResultWriter, summary: Summary) -> None:
    bar = tqdm(unit="item", dynamic_ncols=True, disable=not sys.stderr.isatty())
    if not bar.disable:  # the total is counted on the side, so the first results are not held back for it
        threading.Thread(target=_count_total, args=(bar, _todo(args, engine.kind, writer)), daemon=True).start()

    def write(rows: RenderedRows) -> None:
        writer.write(rows)
        summary.tally.merge(rows.tally)
        bar.update(rows.count)

    todo = _todo(args, engine.kind, writer, warn_skipped=True)
    with bar:
        if args.engine == "ray":
            engine.run(todo, batch_size=args.batch_size, on_batch=lambda pairs: write(writer.format.render(pairs)))
        else:
            pipeline.run(todo, engine, batch_size=args.batch_size, workers=workers, finish=writer.format.render,
                         on_batch=write)
    summary.finish()
    writer.commit()


def _count_total(bar: tqdm, items: Iterator[Item]) -> None:
    bar.total = sum(1 for _ in items)
    bar.refresh()
