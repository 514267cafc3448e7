"""``coursezoo batch --server``: the same answers as ``--local``, bad inputs isolated to their own rows, a server
restart mid-run loses nothing, an unreachable server is a clear exit 1, a server with a token and (mutual) TLS
is reached with them, from the command line and from the compose batch job, and refuses clearly without."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.batch.cli import default_workers, get_args_parser
from serving.batch.output import partial_path
from serving.workers import cores
from tests.batch.conftest import BROKEN_DIGITS, Run, digit_label, read_rows
from tests.conftest import EXPORTED, REPO_ROOT, ServerProcess
from tests.deploy.deploy_helpers import host_command, render, run
from tests.reliability.test_security import Pki

Batch = Callable[..., Run]
TOKEN = "cz-batch-4e9d1a7c"  # distinctive, so a leak into the output is found by a plain search
NAMES = ["Nakamura", "Rossi", "Schmidt"]


def _same_answers(a: Run, b: Run) -> None:
    """The same rows, failures included word for word: through a server they named the input's position in its
    request ("invalid image: image 0: cannot decode ...")."""
    assert [r["path"] for r in a.rows] == [r["path"] for r in b.rows]
    for x, y in zip(a.rows, b.rows, strict=True):
        assert (x["prediction"], x["error"]) == (y["prediction"], y["error"]), x["path"]
        if x["confidence"]:
            assert float(x["confidence"]) == pytest.approx(float(y["confidence"]), abs=1e-5)


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["read-here", "read-in-workers"])
def test_digits_through_the_server_match_local(batch: Batch, server: ServerProcess, digits_dir: Path,
                                               best_digits_repo: Path, tmp_path: Path,
                                               workers: tuple[str, ...]) -> None:
    """Same files, same answers and the same failure reasons, whichever process reads the files; the server's
    refusals of a whole request are narrowed down to the one bad file."""
    remote = batch(digits_dir, "-r", "--server", server.target, "--batch-size", "50", "--top-k", "2", *workers,
                   out=tmp_path / "remote.csv")
    local = batch(digits_dir, "-r", "--repo", best_digits_repo, "--batch-size", "50", "--top-k", "2",
                  out=tmp_path / "local.csv")
    assert remote.code == local.code == 2, remote.err
    _same_answers(remote, local)
    failed = {Path(r["path"]).name: r["error"].split(":")[0] for r in remote.rows if r["error"]}
    assert failed == BROKEN_DIGITS
    good = [r for r in remote.rows if not r["error"]]
    assert sum(r["prediction"] == digit_label(r["path"]) for r in good) >= 0.95 * len(good) == 0.95 * 200
    assert f"server {server.target}" in remote.out


def test_records_and_names_through_the_server_match_local(batch: Batch, server: ServerProcess,
                                                          diabetes_rows: list[list[str]],
                                                          names_rows: list[tuple[str, str]], tmp_path: Path) -> None:
    records = [",".join(row[:8]) for row in diabetes_rows[:300]] + ["inf,0,0,0,0,0,0,0", "1,2", "0,6,0,0,0,0,0,0"]
    (tmp_path / "records.csv").write_text("\n".join(records) + "\n")
    names = [name for name, _ in names_rows[::40]] + ["", "Stra\u00dfe", "\u00e9\u00e9"]  # skipped, refused, "ee"
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    failed = {}
    for data in ("records.csv", "names.txt"):
        remote = batch(tmp_path / data, "--server", server.target, "--top-k", "2", "--batch-size", "64",
                       out=tmp_path / f"{data}.remote.csv")
        local = batch(tmp_path / data, "--repo", EXPORTED, "--top-k", "2", "--batch-size", "64",
                      out=tmp_path / f"{data}.local.csv")
        assert remote.code == local.code == 2, remote.err
        _same_answers(remote, local)
        failed[data] = [r["error"] for r in remote.rows if r["error"]]
    assert [e.split(":")[0] for e in failed["records.csv"]] == ["bad row"] * 3
    # the record's column, not its position in a one-record request ("record 0 feature 1 is 6")
    the_row, _, unscaled = failed["records.csv"]
    assert the_row.startswith("bad row: the row has NaN or infinite values")
    assert unscaled.startswith("bad row: column 2 is 6: expected features scaled as in the course CSV")
    assert failed["names.txt"][0].startswith("invalid name: name 'Straße' has 'ß'")
    unknown = batch(tmp_path / "names.txt", "--server", server.target, "--model", "names_gru:999", out=tmp_path / "x")
    assert unknown.code == 1 and f"model 'names_gru' has no version '999' ready on server {server.target}; " \
        "versions: 1" in unknown.err
    not_a_number = batch(tmp_path / "names.txt", "--server", server.target, "--model", "names_gru:x",
                         out=tmp_path / "x")
    assert not_a_number.code == 1 and "version 'x' is not a whole number" in not_a_number.err


def test_unreachable_server_is_exit_1(batch: Batch, tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("Smith\n")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = batch(tmp_path / "names.txt", "--server", f"127.0.0.1:{port}", "--retry-for", "1", out=tmp_path / "o.csv")
    assert run.code == 1 and "unreachable" in run.err and not run.rows


@pytest.mark.parametrize("address", ["localhost", "52201", "http://localhost:52201"])
def test_a_server_address_without_a_port_or_a_url_is_refused_at_once(batch: Batch, tmp_path: Path,
                                                                        address: str) -> None:
    """Each was dialled and retried for all of --retry-for (60 s, a dozen warnings), then blamed on TLS."""
    (tmp_path / "names.txt").write_text("Smith\n")
    started = time.monotonic()
    run = batch(tmp_path / "names.txt", "--server", address, "--retry-for", "5", out=tmp_path / "o.csv")
    assert run.code == 1 and not run.rows and time.monotonic() - started < 3
    assert run.err.splitlines() == [run.err.strip()] and run.err.startswith(f"coursezoo batch: error: server "
                                                                             f"address {address!r} ")
    assert "expected HOST:PORT" in run.err and "TLS" not in run.err


def test_a_deadline_of_zero_is_refused_and_an_unknown_host_is_not_blamed_on_tls(batch: Batch, tmp_path: Path) -> None:
    """--timeout 0 failed every call at once, retried and reported as an unreachable server; a host name that does
    not resolve was reported with a hint about TLS."""
    (tmp_path / "names.txt").write_text("Smith\n")
    for timeout in ("0", "-1", "nan"):
        run = batch(tmp_path / "names.txt", "--server", "localhost:1", "--timeout", timeout, out=tmp_path / "o.csv")
        assert run.code == 1 and f"--timeout: {timeout}: expected a number of seconds, more than 0" in run.err
    unknown = batch(tmp_path / "names.txt", "--server", "no-such-host.invalid:52399", "--retry-for", "0",
                    out=tmp_path / "o.csv")
    assert unknown.code == 1 and "unreachable" in unknown.err, unknown.err
    assert "is the host name right" in unknown.err and "--tls-cert" not in unknown.err


def test_server_restart_mid_run_loses_nothing(diabetes_rows: list[list[str]], tmp_path: Path) -> None:
    """SIGKILL the server while requests are in flight, start it again on the same port: the run waits,
    retries and ends with every record answered exactly once."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "diabetes_mlp").symlink_to((EXPORTED / "diabetes_mlp").resolve())  # one small model: quick starts
    records = tmp_path / "records.csv"
    records.write_text("\n".join(",".join(row) for row in diabetes_rows * 8) + "\n")
    out = tmp_path / "out.csv"
    first = ServerProcess(repo, "--poll-interval-s", "0").start()
    port = first.target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "coursezoo", "batch", str(records), "--server", first.target, "--out", str(out),
               "--batch-size", "4", "--in-flight", "2", "--retry-for", "60"]
    batch_proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        partial = partial_path(out)
        while batch_proc.poll() is None and (not partial.exists() or partial.stat().st_size < 5_000):
            time.sleep(0.02)
        first.stop(signal.SIGKILL)
        if batch_proc.poll() is not None:
            pytest.skip("the run finished before the server was killed")
        time.sleep(1.0)  # the client now retries against a closed port
        second = ServerProcess(repo, "--poll-interval-s", "0", "--port", port).start()
        stdout, stderr = batch_proc.communicate(timeout=120)
    finally:
        batch_proc.kill()
        first.stop()
        if second:
            second.stop()
    assert batch_proc.returncode == 0, stderr
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [f"{records}:{n}" for n in range(1, 8 * len(diabetes_rows) + 1)]
    assert all(r["prediction"] in ("0", "1") and not r["error"] for r in rows)
    assert "server unavailable, retrying" in stderr


def test_local_files_sent_to_a_server_are_read_in_this_process_by_default() -> None:
    """The server decodes, so worker processes would only read local files; objects in a bucket keep them."""
    assert default_workers("localhost:8001", ["scans", "more/*.png"]) == 0
    assert default_workers("localhost:8001", ["scans", "s3://bucket/scans"]) == cores() > 0
    assert default_workers(None, ["scans"]) == cores()


@pytest.fixture(scope="module")
def names_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small model, so the servers with security options start quickly."""
    repo = tmp_path_factory.mktemp("names-repo")
    (repo / "names_gru").symlink_to((EXPORTED / "names_gru").resolve())
    return repo


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pki]:
    """The token file (with the newline `echo` leaves) and the certificates of a mutual-TLS server."""
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "token").write_text(TOKEN + "\n")
    return folder / "token", Pki(folder)


@pytest.fixture(scope="module")
def token_server(start_server: Callable[..., ServerProcess], names_repo: Path,
                 secrets: tuple[Path, Pki]) -> ServerProcess:
    return start_server(names_repo, "--auth-token-file", str(secrets[0]), "--poll-interval-s", "0")


@pytest.fixture(scope="module")
def mtls_server(start_server: Callable[..., ServerProcess], names_repo: Path,
                secrets: tuple[Path, Pki]) -> ServerProcess:
    """Mutual TLS and a token: everything a locked-down server asks of a client."""
    token, pki = secrets
    cert, key = pki.pair("server")
    return start_server(names_repo, "--auth-token-file", str(token), "--tls-cert", str(cert), "--tls-key", str(key),
                        "--tls-client-ca", str(pki.ca), "--poll-interval-s", "0")


@pytest.fixture
def names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A names file, and no token or TLS setting from the developer's own environment."""
    for variable in ("COURSEZOO_AUTH_TOKEN", "COURSEZOO_AUTH_TOKEN_FILE", "COURSEZOO_BATCH_TLS_CA",
                     "COURSEZOO_BATCH_TLS_CERT", "COURSEZOO_BATCH_TLS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    return tmp_path / "names.txt"


def test_a_server_with_a_token_is_reached_with_it_and_refused_clearly_without(
        batch: Batch, token_server: ServerProcess, secrets: tuple[Path, Pki], names_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the token the run is one line naming UNAUTHENTICATED and where the token goes, exit 1 (it was a
    gRPC traceback); with it, from --auth-token-file or the server's own variables, the run classifies. The token
    is never printed, --help included."""
    token_file = secrets[0]
    target = ("--server", token_server.target)
    missing = batch(names_file, *target, out=tmp_path / "missing.csv")
    assert missing.code == 1 and not missing.rows, missing.err
    assert "UNAUTHENTICATED (missing credentials" in missing.err and "--auth-token-file" in missing.err
    monkeypatch.setenv("COURSEZOO_AUTH_TOKEN", "cz-not-the-token")
    wrong = batch(names_file, *target, out=tmp_path / "wrong.csv")
    assert wrong.code == 1 and "UNAUTHENTICATED (invalid token" in wrong.err and "cz-not-the-token" not in wrong.err
    runs = []
    monkeypatch.setenv("COURSEZOO_AUTH_TOKEN", TOKEN)
    runs.append(batch(names_file, *target, out=tmp_path / "env.csv"))
    monkeypatch.delenv("COURSEZOO_AUTH_TOKEN")
    runs.append(batch(names_file, *target, "--auth-token-file", token_file, out=tmp_path / "flag.csv"))
    monkeypatch.setenv("COURSEZOO_AUTH_TOKEN_FILE", str(token_file))
    runs.append(batch(names_file, *target, out=tmp_path / "env_file.csv"))
    for done in runs:
        assert done.code == 0 and [r["model"] for r in done.rows] == ["names_gru"] * len(NAMES), done.err
    monkeypatch.setenv("COURSEZOO_AUTH_TOKEN", TOKEN)  # and the file: given twice, refused as the server does
    twice = batch(names_file, *target, out=tmp_path / "twice.csv")
    assert twice.code == 1 and "give the token once" in twice.err
    helped = batch("--help", out=tmp_path / "help")
    assert "--auth-token-file" in helped.out and "--tls-ca" in helped.out
    assert all(TOKEN not in done.out + done.err for done in [missing, wrong, *runs, twice, helped])


def test_a_mutual_tls_server_is_reached_with_its_ca_and_a_client_certificate(
        batch: Batch, mtls_server: ServerProcess, secrets: tuple[Path, Pki], names_file: Path,
        tmp_path: Path) -> None:
    """--tls-ca, --tls-cert and --tls-key reach a mutual-TLS server; TLS options that do not match it end in
    one line that says which options to check, and files that cannot be used are named before any call."""
    token, pki = secrets
    cert, key = pki.pair("client")
    common = (names_file, "--server", mtls_server.target, "--auth-token-file", token, "--retry-for", "1")
    done = batch(*common, "--tls-ca", pki.ca, "--tls-cert", cert, "--tls-key", key, out=tmp_path / "mtls.csv")
    assert done.code == 0 and len(done.rows) == len(NAMES), done.err
    for mismatch in ((), ("--tls-ca", pki.ca)):  # plaintext to a TLS port; TLS without the client certificate
        refused = batch(*common, *mismatch, out=tmp_path / "refused.csv")
        assert refused.code == 1 and "unreachable" in refused.err and "--tls-cert/--tls-key" in refused.err
        assert not refused.rows and "Traceback" not in refused.err
    half = batch(*common, "--tls-ca", pki.ca, "--tls-cert", cert, out=tmp_path / "half.csv")
    assert half.code == 1 and "--tls-cert and --tls-key go together" in half.err
    missing = batch(*common, "--tls-ca", tmp_path / "no-ca.pem", out=tmp_path / "missing.csv")
    assert missing.code == 1 and f"cannot read the TLS file {tmp_path / 'no-ca.pem'}" in missing.err
    not_pem = batch(*common, "--tls-ca", token, out=tmp_path / "not-pem.csv")  # was retried as unreachable
    assert not_pem.code == 1 and f"{token} is not a PEM file" in not_pem.err and "unreachable" not in not_pem.err


def test_the_compose_batch_job_passes_the_servers_token_and_tls(mtls_server: ServerProcess,
                                                                 secrets: tuple[Path, Pki], tmp_path: Path) -> None:
    """The documented job (`docker compose --profile batch run --rm batch`), rendered by Compose and run against a
    server with a token and mutual TLS, with the settings an operator puts in .env: it used to get no token.
    Without its own CA setting it trusts what the health probe trusts; each variable it sets, `coursezoo batch`
    reads."""
    token, pki = secrets
    cert, key = pki.pair("client")
    inbox, outbox = tmp_path / "input", tmp_path / "output"
    inbox.mkdir()
    outbox.mkdir()
    (inbox / "names.txt").write_text("\n".join(NAMES) + "\n")
    settings = {"COURSEZOO_BATCH_INPUT": str(inbox), "COURSEZOO_BATCH_OUTPUT": str(outbox),
                "COURSEZOO_AUTH_TOKEN_FILE": str(token), "COURSEZOO_BATCH_TLS_CA": str(pki.ca),
                "COURSEZOO_BATCH_TLS_CERT": str(cert), "COURSEZOO_BATCH_TLS_KEY": str(key)}
    job = render("cpu", settings)["services"]["batch"]
    result = run(host_command(job, "server", addresses={"server:50051": mtls_server.target}, home=tmp_path),
                 timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(read_rows(outbox / "results.csv")) == len(NAMES)
    assert TOKEN not in result.stdout + result.stderr

    def trusted(**env: str) -> str:
        return render("cpu", env)["services"]["batch"]["environment"]["COURSEZOO_BATCH_TLS_CA"]

    assert trusted(COURSEZOO_TLS_CERT="/run/secrets/server.pem") == "/run/secrets/server.pem"
    assert trusted(COURSEZOO_TLS_CERT="/run/secrets/server.pem", COURSEZOO_HEALTHCHECK_CA="/ca.pem") == "/ca.pem"
    assert trusted() == ""  # plaintext
    read = set(re.findall(r"COURSEZOO_\w+", get_args_parser().format_help()))
    assert {v for v in job["environment"] if v.startswith("COURSEZOO_")} <= read
