"""``coursezoo batch --server`` against a server that breaks the API's contract (tests/bad_server.py): no
answer lands on another file's row, and the run stops with one clear line instead of writing what it cannot
trust. Against an honest server the same files come back right, so the checks themselves refuse nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bad_server import BadServer, digit_png
from tests.batch.conftest import Run

Batch = Callable[..., Run]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    for digit in range(10):
        (folder / f"img_{digit}.png").write_bytes(digit_png(digit))
    return folder


def test_an_honest_server_answers_every_file(batch: Batch, pngs: Path, tmp_path: Path) -> None:
    with BadServer("honest") as server:
        run = batch(pngs, "--server", server.target, "--kind", "digits", out=tmp_path / "out.csv")
    assert run.code == 0, run.err
    assert {Path(p).stem: r["prediction"] for p, r in run.by_id().items()} == {f"img_{d}": str(d) for d in range(10)}


@pytest.mark.parametrize(("mode", "message"), [
    ("more", "answered 11 predictions for the 10 items 0..9"),  # one more: the rest shifted by one
    ("fewer", "answered 9 predictions for the 10 items 0..9"),  # was a StopIteration traceback, no rows
    ("wrong_model", "with other_model:9, asked for mnist_cnn"),  # was written as other_model's answers
    ("nan", "no digits model can make"),  # NaN written as a confidence, and as invalid JSON in jsonl
    ("digit_42", "label 42"),  # an IndexError traceback (-1 was written as the label 9)
    ("eleven_scores", "no digits model can make"),  # an IndexError traceback with --top-k
    ("no_labels", "without its labels"),  # an IndexError traceback at the first answer
])
def test_a_reply_that_does_not_answer_the_request_stops_the_run(batch: Batch, pngs: Path, tmp_path: Path,
                                                                 mode: str, message: str) -> None:
    with BadServer(mode) as server:
        run = batch(pngs, "--server", server.target, "--kind", "digits", "--top-k", "3", out=tmp_path / "out.csv")
    assert run.code == 1 and message in run.err, run.err
    assert "Traceback" not in run.err and not run.rows


def test_a_server_that_answers_nothing_in_time_is_named_slow_not_unreachable(batch: Batch, pngs: Path,
                                                                             tmp_path: Path) -> None:
    with BadServer("hang") as server:
        run = batch(pngs, "--server", server.target, "--kind", "digits", "--timeout", "0.5", "--retry-for", "1",
                    out=tmp_path / "out.csv")
    assert run.code == 1 and "no answer within --timeout: a slow or stuck server" in run.err, run.err


def test_an_answer_too_large_for_the_client_is_not_blamed_on_the_image(batch: Batch, pngs: Path,
                                                                      tmp_path: Path) -> None:
    """gRPC refuses a reply over the client's limit as RESOURCE_EXHAUSTED, the status the server gives an image too
    large: the 28x28 image got a failure row "image too large", which --resume then skipped for good."""
    with BadServer("huge_answer") as server:
        run = batch(pngs, "--server", server.target, "--kind", "digits", out=tmp_path / "out.csv")
    assert run.code == 1 and "answered one input with more than this client takes" in run.err, run.err
    assert not any(row["error"] for row in run.rows)


def test_a_version_that_comes_in_mid_run_is_labelled_with_its_own_labels(batch: Batch, pngs: Path,
                                                                        tmp_path: Path) -> None:
    """The labels were read once, at the start: a new version's answers were refused (names) or labelled with
    the old version's labels (digits, diabetes). Now each version's labels are asked of the server."""
    with BadServer("new_version") as server:
        run = batch(pngs, "--server", server.target, "--kind", "digits", "--batch-size", "5", "--in-flight", "1",
                    out=tmp_path / "out.csv")
    assert run.code == 0, run.err
    assert [(r["prediction"], r["model_version"]) for r in run.rows] == (
        [(str(d), "1") for d in range(5)] + [(f"digit {d}", "2") for d in range(5, 10)])
    assert "0: 1  1: 1  2: 1  3: 1  4: 1  digit 5: 1" in run.out  # the summary counts both versions' labels
