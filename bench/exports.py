"""Which shipped exports a run measures, and the small repository the benchmark servers load.

The harness reads only model cards here (no torch), so the same selection drives the in-process
baselines, the CourseZoo server, the batch CLI and the PyTriton peer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.card import ONNX_FILE, TORCHSCRIPT_FILE, CardError, ModelCard, version_dirs

#: tasks whose models the benchmarks know how to feed
TASKS = ("digits", "diabetes", "names")
#: what ``--models`` means when not given: one of each task in --quick, every digits model otherwise
QUICK_MODELS = ("mnist_cnn", "diabetes_mlp", "names_gru")
FULL_MODELS = ("mnist_softmax", "mnist_cnn", "mnist_resnet", "mnist_inception", "diabetes_mlp", "names_gru")


@dataclass(frozen=True)
class Export:
    """One exported model version: its folder and its card."""

    name: str
    version: str
    path: Path
    card: ModelCard

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def torchscript(self) -> Path:
        return self.path / TORCHSCRIPT_FILE


def latest(repo: Path, name: str) -> Export | None:
    """The newest version of ``name`` under ``repo`` with a readable card and its ONNX file, as the server
    would serve it (it skips a version that fails to load), or None."""
    for path in version_dirs(repo / name):
        if (path / ONNX_FILE).is_file():
            try:
                card = ModelCard.load_version(path)
            except CardError:
                continue
            return Export(name=name, version=card.version, path=path, card=card)
    return None


def select(repo: Path, names: list[str]) -> tuple[list[Export], list[str]]:
    """The exports to measure and a note for each requested model that is missing or of another task."""
    found, missing = [], []
    for name in names:
        export = latest(repo, name)
        if export is None:
            missing.append(f"{name}: not exported under {repo}")
        elif export.task not in TASKS:
            missing.append(f"{name}: task {export.task} is not benchmarked")
        else:
            found.append(export)
    return found, missing


#: the digits model the server, batch-CLI and peer cases use when it is selected (the targets name it)
SERVER_DIGITS = "mnist_cnn"


def first_of(exports: list[Export], task: str) -> Export | None:
    """The model of ``task`` that the server cases use: mnist_cnn for digits when selected, else the first."""
    matching = [e for e in exports if e.task == task]
    return next((e for e in matching if e.name == SERVER_DIGITS), matching[0] if matching else None)


def server_repository(exports: list[Export]) -> tempfile.TemporaryDirectory:
    """A temporary repository holding links to just the measured versions.

    The server then loads (and warms up) only what is measured, which keeps its start quick; the shipped
    ``exported/`` folder is never written to.
    """
    tmp = tempfile.TemporaryDirectory(prefix="coursezoo-bench-repo-")
    for e in exports:
        (Path(tmp.name) / e.name).mkdir()
        (Path(tmp.name) / e.name / e.version).symlink_to(e.path.resolve(), target_is_directory=True)
    return tmp
