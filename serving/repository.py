"""The model repository: ``root/<name>/<version>/{model.onnx, model.json}`` -> served model versions.

Every version directory is loaded (a request may name any version; Triton's version policy ``all``), or
with ``latest_versions`` N only the N newest that load (``latest N``, except that a newer version that
fails to load does not push an older one out); the newest ready one serves by default. A version is only
loaded after its ``model.onnx`` matches the card's sha256 and it has run a warm-up batch; until then, or
if that fails, the previous state keeps serving, so a half-copied or broken export never takes a model
down. All state changes happen on the event loop between awaits, so ``get`` always sees either the old or
the new version, never a mixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.batching import BatcherClosed, BatchObserver, DynamicBatcher
from serving.card import CARD_FILE, ONNX_FILE, VERSION_DIR, CardError, ModelCard, preference, version_dirs
from serving.preprocess import InputError, quote
from serving.runtime import CPU, OnnxModel, ProviderError, device_for
from serving.statistics import InferenceStatistics

log = logging.getLogger("coursezoo.repository")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a directory name: at most 255 characters
#: Triton's versions are 64-bit numbers; a longer one names no version (and ``int`` refuses over 4,300 digits).
_VERSION_DIGITS = 18

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"  # KServe RepositoryIndex states


class ModelNotFound(LookupError):
    """No such model or version (maps to NOT_FOUND)."""


class ModelNotReady(RuntimeError):
    """The model or version exists but cannot serve now: loading, broken or unloaded (maps to UNAVAILABLE)."""


class ServingObserver(BatchObserver, Protocol):
    """Metrics hooks: every batch (from the batchers) and every version going in or out of service."""

    def set_model_ready(self, model: str, version: str, ready: bool | None) -> None:
        """True: the version serves; False: it does not (unloaded, or it failed to load); None: it is gone, or held
        back by ``latest_versions``."""


@dataclass(frozen=True)
class ServingSettings:
    """How models are run and batched; ``coursezoo serve`` builds it from its flags, whose defaults these are.

    A card's ``serving`` dict may override the batching and thread fields for its model (the card knows
    the model's best batch size), see ``settings_for``.
    """

    device: str = "auto"  # auto | cuda | cpu
    max_batch_size: int = 64
    max_queue_delay_ms: float = 1.0
    adaptive_queue_delay: bool = True  # wait for as many requests as the last batch held, not the whole delay
    max_queue_items: int = 4096
    intra_op_threads: int = 0  # CPU threads one run may use (runtime.OnnxModel); 0: one per core
    inline_run_ms: float = 1.0  # batches expected to run faster than this run on the event loop (see batching)
    max_items_per_request: int = 1024  # the largest client batch, which runs as one execution (see batching)
    poll_interval_s: float = 5.0  # 0: no polling; RepositoryModelLoad still loads new versions
    latest_versions: int = 0  # 0: every version directory is loaded; N: the N newest that load (see the module)

    def __post_init__(self) -> None:
        for name, least in MINIMUM.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= least):  # NaN compares as never less
                raise ValueError(f"{name} {value}: expected a number of at least {least}")


#: The least value of each numeric setting, whether it comes from a flag, a variable or a card's ``serving``.
MINIMUM = {"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_items": 1, "intra_op_threads": 0,
           "inline_run_ms": 0, "max_items_per_request": 1, "poll_interval_s": 0, "latest_versions": 0}


def _true_or_false(value: Any) -> bool:
    """A card's JSON boolean; ``bool()`` would take the string "false" for true."""
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


#: Fields a card's ``serving`` dict may set, with their types.
CARD_OVERRIDES = {"max_batch_size": int, "max_queue_delay_ms": float, "adaptive_queue_delay": _true_or_false,
                  "max_queue_items": int, "intra_op_threads": int, "inline_run_ms": float}


def settings_for(settings: Any, card: ModelCard) -> ServingSettings:
    """The settings one model runs with: ``settings`` (a ServingSettings, or any object with its fields,
    such as the server's own settings) overridden by the card's ``serving`` dict (its ``device``, "cpu" or
    "auto", by ``runtime.device_for``)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(ServingSettings)}
    known = {*CARD_OVERRIDES, "device"}
    unknown = sorted(set(card.serving) - known)
    if unknown:
        raise CardError(f"{card.name}/{card.version}: unknown serving keys {unknown}; known: {sorted(known)}")
    values["device"] = device_for(values["device"], card)
    try:
        values.update({k: CARD_OVERRIDES[k](v) for k, v in card.serving.items() if k != "device"})
        return ServingSettings(**values)
    except (TypeError, ValueError) as e:
        raise CardError(f"{card.name}/{card.version}: bad serving value: {e}") from e


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: str  # READY | UNAVAILABLE | LOADING
    reason: str = ""


class ServedModel:
    """One loaded model version: its card, ONNX Runtime session and dynamic batcher."""

    def __init__(self, card: ModelCard, session: OnnxModel, batcher: DynamicBatcher, settings: ServingSettings):
        self.card = card
        self.session = session
        self.batcher = batcher
        self.settings = settings
        self.ready = True

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    @property
    def statistics(self) -> InferenceStatistics:
        return self.batcher.statistics

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InputError unless the tensors match the card's names, datatypes and shapes (for ModelInfer)."""
        self.session.validate(inputs)

    async def infer(self, inputs: Mapping[str, np.ndarray], *, wait_for_room: bool = False) -> dict[str, np.ndarray]:
        """Outputs by the card's names, computed as part of a dynamic batch (``wait_for_room``: see
        ``DynamicBatcher.submit``)."""
        if not self.ready:
            raise ModelNotReady(f"{self.name}/{self.version} is no longer served")
        start = time.perf_counter_ns()
        try:
            outputs = await self.batcher.submit(inputs, wait_for_room=wait_for_room)
        except BaseException as e:  # cancelled too: Triton counts a cancelled request as failed
            self.statistics.failed(start)
            if isinstance(e, BatcherClosed):
                raise ModelNotReady(f"{self.name}/{self.version} is no longer served") from e
            raise
        self.statistics.answered(len(next(iter(outputs.values()))), start)
        return outputs

    async def retire(self) -> None:
        """Stop taking requests and finish the queued ones."""
        self.ready = False
        await self.batcher.close()


@dataclass
class _Version:
    """What the repository knows about one version directory."""

    fingerprint: tuple  # (mtime_ns, size) of its files: a change means "load it again"
    served: ServedModel | None = None
    state: str = LOADING
    reason: str = ""
    held_back: bool = False  # behind the newest ``latest_versions`` that load: not loaded, by policy


class ModelRepository:
    """Scans, loads, serves and hot-reloads the model versions under ``root``."""

    def __init__(self, root: Path, settings: ServingSettings, *, metrics: ServingObserver | None = None,
                 executor: Executor | None = None):
        """``executor`` runs the models' batches that do not run on the event loop (None: the loop's default
        one, which every ``asyncio.to_thread`` shares: the server gives the models threads of their own)."""
        self.root = Path(root)
        self._executor = executor
        self.settings = settings
        self._metrics = metrics
        self._models: dict[str, dict[str, _Version]] = {}
        self._unloaded: dict[str, list[str]] = {}  # RepositoryModelUnload's: name -> versions; polling leaves them out
        self._root_missing = False  # whether the last scan found no repository directory (said once)
        self._scan_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._changes: set[asyncio.Task[None]] = set()  # RepositoryModelLoad and Unload calls, until they end

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every version under root; start polling when ``poll_interval_s`` > 0.

        A broken version is logged and left unavailable; ProviderError (``device="cuda"`` without a usable
        GPU) is a configuration error and propagates.
        """
        await self._scan_all()
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        """Stop polling, then let every model finish its queued requests."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        async with self._scan_lock:
            versions = [v for versions in self._models.values() for v in versions.values()]
            self._models.clear()
            await asyncio.gather(*(self._retire(v) for v in versions))

    async def load(self, name: str) -> None:
        """(Re)load a model's new or changed versions now (RepositoryModelLoad); it is polled again too.

        The load runs to its end even if the caller is cancelled (its deadline passed, it went away), as
        Triton's does: a load cut off half way would leave the version neither loaded nor retried.
        """
        _check_name(name)
        await self._to_the_end(self._load(name), f"load-{name}")

    async def _to_the_end(self, change: Coroutine[Any, Any, None], what: str) -> None:
        """Run a load or an unload to its end even if the caller is cancelled."""
        task = asyncio.get_running_loop().create_task(change, name=what)
        self._changes.add(task)  # the loop keeps only weak references to tasks; a shielded one may outlive its caller
        task.add_done_callback(self._change_done)
        await asyncio.shield(task)

    async def _load(self, name: str) -> None:
        """The load and its outcome in one hold of the scan lock, as ``unload`` runs: Load, Unload and Load
        again, each answered OK, ended unloaded (the name left the unloaded set before the lock, and the
        unload put it back after), with the versions loaded behind it and a SERVING health check."""
        async with self._scan_lock:
            self._unloaded.pop(name, None)
            await self._scan_model(name)
            versions = self._models.get(name)
            if not versions:
                raise ModelNotFound(f"no model {name!r} in {self.root}: expected {self.root}/{name}/<version>/")
            if not any(v.state == READY for v in versions.values()):
                raise ModelNotReady(f"model {name!r} has no loadable version: {_reasons(versions)}")

    def _change_done(self, task: asyncio.Task[None]) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # a caller that went away has no use for it: not "never retrieved"

    async def unload(self, name: str) -> None:
        """Take every version of a model out of service (RepositoryModelUnload) until ``load(name)``.

        A name with no directory in the repository has nothing to unload: done, as Triton answers it (clean-up
        code unloads what it may never have loaded). One whose directory has not been scanned yet stays out.
        Like a load, it runs to its end when the caller goes away: the versions' queued requests are answered.
        """
        _check_name(name)
        await self._to_the_end(self._unload(name), f"unload-{name}")

    async def _unload(self, name: str) -> None:
        async with self._scan_lock:
            if not self.knows(name) and not await asyncio.to_thread((self.root / name).is_dir):
                log.info("unload of %s: no such model, nothing to do", name, extra={"model": name})
                return
            versions = self._models.pop(name, {})
            self._unloaded[name] = self._unloaded.get(name) or _sorted(versions)
            await asyncio.gather(*(self._retire(v) for v in versions.values()))
        log.info("unloaded %s", name, extra={"model": name})

    # --- queries ----------------------------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The newest ready version of ``name``, or the one asked for."""
        _check_name(name)
        if name in self._unloaded:
            raise ModelNotReady(f"model {name!r} is unloaded; RepositoryModelLoad loads it again")
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"no model {name!r}; available: {', '.join(sorted(self._models)) or 'none'}")
        if not version:
            ready = [v.served for _, v in _newest_first(versions) if v.served is not None]
            if not ready:
                raise ModelNotReady(f"model {name!r} has no ready version: {_reasons(versions)}")
            return ready[0]
        entry = versions.get(str(version)) or _by_number(versions, version)
        if entry is None:
            raise ModelNotFound(f"model {name!r} has no version {quote(version)}; versions: "
                                f"{', '.join(_sorted(versions))}")
        if entry.served is None:
            raise ModelNotReady(f"{name}/{version} is {entry.state.lower()}: {entry.reason or 'loading'}")
        return entry.served

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model of this repository, loaded or unloaded (a bounded set of names)."""
        return name in self._models or name in self._unloaded

    def models(self) -> list[ServedModel]:
        """Every serving version, by name then version."""
        return [v.served for name in sorted(self._models) for _, v in reversed(_newest_first(self._models[name]))
                if v.served is not None]

    def index(self) -> list[IndexEntry]:
        """Every version the repository knows, with its state and why it is not ready (RepositoryIndex)."""
        rows = [IndexEntry(name, version, v.state, v.reason)
                for name in sorted(self._models) for version, v in reversed(_newest_first(self._models[name]))]
        rows += [IndexEntry(name, version, UNAVAILABLE, "unloaded")
                 for name in sorted(self._unloaded) for version in self._unloaded[name] or [""]]
        return rows

    async def listing(self) -> list[IndexEntry]:
        """``index()``, and the model directories not scanned yet (no polling, or a new one before the next poll),
        as Triton's index lists the models it has not loaded: a client finds them there, then loads them."""
        try:
            found = await asyncio.to_thread(_model_dirs, self.root)
        except OSError:  # not listed: what is known still is
            found = set()
        return self.index() + [IndexEntry(name, "", UNAVAILABLE, "not loaded: RepositoryModelLoad loads it")
                               for name in sorted(found) if not self.knows(name)]

    def default_model(self, task: str) -> str:
        """The name of the most accurate ready model of ``task`` (card metrics ``accuracy``), ties by name."""
        candidates = []
        for name in self._models:
            with contextlib.suppress(ModelNotReady, ModelNotFound):
                served = self.get(name)
                if served.card.task == task:
                    candidates.append(served.card)
        if not candidates:
            raise ModelNotFound(f"no ready {task} model in {self.root}")
        return min(candidates, key=preference).name

    # --- scanning and loading ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self._scan_all()
            except Exception:  # noqa: BLE001 - a bad scan must not end polling; the old models keep serving
                log.exception("repository scan of %s failed", self.root)

    async def _scan_all(self) -> None:
        async with self._scan_lock:
            try:
                found = await asyncio.to_thread(_model_dirs, self.root)
            except (FileNotFoundError, NotADirectoryError):  # gone, or never there: no models
                if not self._root_missing:  # said once, not at every poll
                    log.warning("the model repository %s is not a directory", self.root, extra={"path": str(self.root)})
                self._root_missing, found = True, set()
            except OSError as e:  # there, but not listed (out of file descriptors, an NFS hiccup)
                log.warning("cannot list the model repository %s (%s); the models loaded keep serving", self.root,
                            e.strerror or e, extra={"path": str(self.root)})
                return
            else:
                self._root_missing = False
            for name in set(self._unloaded) - found:  # unloaded, then its folder went: forgotten, as any gone model
                del self._unloaded[name]
            names = (found | set(self._models)) - set(self._unloaded)
            await asyncio.gather(*(self._scan_model(name) for name in sorted(names)))

    async def _scan_model(self, name: str) -> None:
        """Bring one model in line with its directory: load new or changed versions, retire removed ones.
        A directory that cannot be listed changes nothing (only one that is gone retires its versions)."""
        try:
            found = await asyncio.to_thread(_version_dirs, self.root / name)
        except OSError as e:
            log.warning("cannot list %s (%s); its versions stay as they are", self.root / name, e.strerror or e,
                        extra={"model": name})
            return
        versions = self._models.setdefault(name, {})
        keep = self.settings.latest_versions or len(found)
        serving = 0
        for version, fingerprint in sorted(found.items(), key=lambda kv: int(kv[0]), reverse=True):
            entry = versions.get(version)
            if serving >= keep:  # behind the newest `keep` that load: out (Triton's version policy latest N)
                await self._hold_back(name, version, fingerprint)
                continue
            if entry is None or entry.fingerprint != fingerprint or entry.held_back:
                await self._load_version(name, version, fingerprint)
            serving += versions[version].served is not None
        # After the loads: a version whose folder went serves until the one taking its place is ready (a rollback
        # by deleting the newest with --latest-versions 1 refused calls while the older one loaded).
        gone = set(versions) - set(found)
        for version in gone:
            await self._retire(versions.pop(version))
            if self._metrics is not None:  # its ready series goes with it, whether it served or failed to load
                self._metrics.set_model_ready(name, version, None)
            log.info("retired %s/%s: its directory is gone", name, version, extra={"model": name, "version": version})
        if not versions:
            del self._models[name]
        if gone and not any(v.served is not None for v in versions.values()):  # calls to it now fail NOT_FOUND
            log.warning("model %s has no version serving any more (the directories of versions %s are gone)", name,
                        ", ".join(sorted(gone, key=int)), extra={"model": name})

    async def _load_version(self, name: str, version: str, fingerprint: tuple) -> None:
        versions = self._models[name]
        old = versions.get(version)
        placeholder = _Version(fingerprint)
        if old is None:
            versions[version] = placeholder
        try:
            card, session, settings = await asyncio.to_thread(self._prepare, name, version)
        except (ProviderError, asyncio.CancelledError):
            if versions.get(version) is placeholder:  # left LOADING with this fingerprint, no scan would retry it
                del versions[version]
            raise
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the files, this version just does not serve
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, CardError) else str(e)
            log.warning("%s/%s not loaded: %s", name, version, reason,
                        extra={"model": name, "version": version, "reason": reason})
            keep = old.served if old is not None else None  # a re-export that fails leaves the old one serving
            versions[version] = _Version(fingerprint, keep, READY if keep else UNAVAILABLE, reason)
            if keep is None and self._metrics is not None:  # a failed deploy shows: model_ready 0, not no series
                self._metrics.set_model_ready(name, version, False)
            return
        batcher = DynamicBatcher(
            session.run, max_batch_size=settings.max_batch_size, max_delay_ms=settings.max_queue_delay_ms,
            max_queue_items=settings.max_queue_items, name=name, version=version, observer=self._metrics,
            inline_budget_ms=settings.inline_run_ms, inline_batches=session.provider == CPU,
            chunk_size=settings.max_items_per_request, adaptive=settings.adaptive_queue_delay, executor=self._executor,
        )
        versions[version] = _Version(fingerprint, ServedModel(card, session, batcher, settings), READY)
        if self._metrics is not None:
            self._metrics.set_model_ready(name, version, True)
        log.info("loaded %s/%s on %s", name, version, session.provider,
                 extra={"model": name, "version": version, "provider": session.provider})
        if card.metrics.get("meets_bar") is False:  # exported with --allow-below-bar: served, but not silently
            log.warning("%s/%s misses its quality bar (%s) and serves: exported with --allow-below-bar", name, version,
                        card.metrics.get("verdict", "no verdict"), extra={"model": name, "version": version})
        if old is not None and old.served is not None:
            await old.served.retire()  # after the swap: requests already queued there still finish

    async def _hold_back(self, name: str, version: str, fingerprint: tuple) -> None:
        """Leave a version out of service under ``latest_versions``: retired if it served, never loaded if not.
        Its ready series goes (an alert on ``model_ready == 0`` must not fire for every old version), and the
        index keeps it, saying why; it loads again if the versions ahead of it go."""
        versions = self._models[name]
        entry = versions.get(version)
        if entry is not None and entry.held_back and entry.fingerprint == fingerprint:
            return
        n = self.settings.latest_versions
        versions[version] = _Version(fingerprint, None, UNAVAILABLE, f"not served: only the newest {n} version"
                                     f"{'s' if n > 1 else ''} that load are (--latest-versions {n})", held_back=True)
        if entry is not None and entry.served is not None:
            await self._retire(entry)
            log.info("retired %s/%s: %d newer versions serve", name, version, n,
                     extra={"model": name, "version": version})
        if self._metrics is not None:
            self._metrics.set_model_ready(name, version, None)

    def _prepare(self, name: str, version: str) -> tuple[ModelCard, OnnxModel, ServingSettings]:
        """Blocking part of a load, run in a thread: card, sha256, session, warm-up."""
        directory = self.root / name / version
        card = ModelCard.load_version(directory)
        settings = settings_for(self.settings, card)
        session = OnnxModel(card.verify_file(directory, ONNX_FILE), card, settings.device, settings.intra_op_threads)
        session.warmup()
        return card, session, settings

    async def _retire(self, entry: _Version) -> None:
        if entry.served is None:
            return
        if self._metrics is not None:
            self._metrics.set_model_ready(entry.served.name, entry.served.version, False)
        await entry.served.retire()


def _check_name(name: str) -> None:
    """Refuse anything that is not a plain model name before it gets near the file system."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ModelNotFound(f"invalid model name {quote(str(name))}: expected letters, digits, '_', '.' and '-' "
                            "only, at most 255")


def _by_number(versions: dict[str, _Version], version: str) -> _Version | None:
    """The version numbered ``version`` written another way ("01" is version 1, as in Triton)."""
    number = version_number(version)
    return next((entry for name, entry in versions.items() if int(name) == number), None)


def version_number(version: str) -> int:
    """A requested version as its number; InputError unless it is a whole number > 0 in ASCII digits (``int``
    alone would take "1_0" for 10 and other scripts' digits)."""
    digits = version.lstrip("0") if VERSION_DIR.fullmatch(version) else ""
    if not digits or len(digits) > _VERSION_DIGITS:
        raise InputError(f"model version {quote(version)} is not a whole number > 0 of at most {_VERSION_DIGITS} "
                         "digits: expected a version such as \"1\", or none for the newest")
    return int(digits)


def _model_dirs(root: Path) -> set[str]:
    """The model directories' names. OSError when the repository cannot be listed: the caller tells one that
    is gone (FileNotFoundError, NotADirectoryError: no models) from one that is there but failed to list
    (out of file descriptors, an NFS hiccup), where "no models" would retire every one of them."""
    return {p.name for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and ".." not in p.name}


def _version_dirs(model_dir: Path) -> dict[str, tuple]:
    """Version directory name -> fingerprint of its files (None for a missing file); none when the model's
    directory is gone, and an OSError when it cannot be listed (see ``_model_dirs``)."""
    return {p.name: tuple(_stat(p / f) for f in (CARD_FILE, ONNX_FILE)) for p in version_dirs(model_dir)}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _newest_first(versions: dict[str, _Version]) -> list[tuple[str, _Version]]:
    return sorted(versions.items(), key=lambda kv: int(kv[0]), reverse=True)


def _sorted(versions: dict[str, _Version]) -> list[str]:
    return sorted(versions, key=int)


def _reasons(versions: dict[str, _Version]) -> str:
    return "; ".join(f"version {v}: {e.reason or e.state.lower()}" for v, e in reversed(_newest_first(versions)))
