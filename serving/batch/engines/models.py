"""Which model version of a repository the local engine runs: named, or the most accurate of the kind.

Read from the cards alone (no session is built for models that are not chosen), with the server's
rules: the newest valid version of a name by default, the highest card accuracy for a task.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.batch.engines import EngineError, model_spec
from serving.batch.types import KINDS
from serving.card import CARD_FILE, CardError, ModelCard, preference, version_dirs

log = logging.getLogger(__name__)


def find_model(repo: Path, spec: str | None, kind: str | None) -> list[tuple[ModelCard, Path]]:
    """The versions to try, newest first, of the model ``spec`` names ("NAME" or "NAME:VERSION"), else of
    the most accurate model of ``kind`` (ties by name, as the server breaks them)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise EngineError(f"model repository {repo} is not a folder (pass --repo)")
    name, version = model_spec(spec)
    if name:
        versions = _versions(repo / name)
        if not versions:
            raise EngineError(f"no model {name!r} in {repo}; it has {', '.join(_names(repo)) or 'no models'}")
        if version:
            versions = _pinned(versions, name, version)
        task = versions[0][0].task
        if task not in KINDS:
            raise EngineError(f"{name} is a {task} model; coursezoo batch classifies {', '.join(KINDS)}")
        if kind and task != kind:
            raise EngineError(f"{name} is a {task} model but the inputs are {kind}")
        return versions
    models = [v for v in (_versions(repo / name) for name in _names(repo)) if v and v[0][0].task == kind]
    if not models:
        raise EngineError(f"no {kind} model in {repo}")
    return min(models, key=lambda versions: preference(versions[0][0]))


def _versions(folder: Path) -> list[tuple[ModelCard, Path]]:
    """A model's versions with a readable card, newest first."""
    found = []
    for directory in version_dirs(folder):
        if not (directory / CARD_FILE).is_file():
            continue
        try:
            card = ModelCard.load_version(directory)
        except CardError as e:
            log.warning("skipping a model version with a broken card", extra={"path": str(directory), "error": str(e)})
            continue
        found.append((card, directory))
    return found


def _pinned(versions: list[tuple[ModelCard, Path]], name: str, version: str) -> list[tuple[ModelCard, Path]]:
    """The one of ``versions`` numbered ``version`` ("1" is folder 1 or 01, as the server finds it), else an
    error listing the versions there are, as the server's."""
    pinned = [v for v in versions if int(v[0].version) == int(version)]
    if not pinned:
        raise EngineError(f"model {name!r} has no version {version!r}; versions: "
                          f"{', '.join(card.version for card, _ in reversed(versions))}")
    return pinned


def _names(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.is_dir())
