"""``coursezoo train NAME|all``: seeded training of the course models, one loop for every task.

Each run writes ``runs/<name>/model.pt`` (state dict) and ``runs/<name>/metrics.json`` (held-out
metrics, epochs, seconds, device, seed, recipe, data sha256), which ``coursezoo export`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from coursezoo.args import at_least
from coursezoo.logs import one_line
from training import data, evaluate
from training.catalog import CHECKPOINT, DEFAULT_RUNS, REPORT, Entry, resolve
from training.models import build

log = logging.getLogger("coursezoo.train")

#: Held by a run in its folder while it trains: see ``run_lock``.
LOCK = ".lock"
#: numpy's seeds are 32-bit: a larger one was numpy's ValueError traceback.
MAX_SEED = 2**32 - 1


class TrainError(RuntimeError):
    """A run could not start or keep its result; the message says why and what to do."""

LOSSES = {"regression": nn.MSELoss, "logistic": nn.BCELoss, "diabetes": nn.BCELoss,
          "digits": nn.CrossEntropyLoss, "names": nn.CrossEntropyLoss, "hello": nn.CrossEntropyLoss}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to PyTorch here")
    return device


def train_batches(entry: Entry, cfg: data.DataConfig, generator: torch.Generator,
                  limit: int | None) -> Sized | Iterable[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The (inputs, target) batches of one epoch of the entry's data set, re-iterable, with a length.

    ``limit`` keeps N training examples drawn at random with ``generator`` (the tests' short runs): the
    first N of a file sorted by class (the names file is, by country) would hold a few classes only.
    """
    if entry.dataset == "hello":  # one example: CrossEntropy over every time step, [T, 4] logits vs [T] targets
        x, y = data.hello_pair()
        return [((x,), y.reshape(-1))]
    if entry.dataset in ("linear_points", "logistic_points"):  # a few points, one batch
        x, y = {"linear_points": data.linear_points, "logistic_points": data.logistic_points}[entry.dataset]()
        if limit is not None and limit < len(x):
            keep = torch.randperm(len(x), generator=generator)[:limit]
            x, y = x[keep], y[keep]
        return [((x,), y)]
    if entry.dataset == "mnist":
        ds, collate = data.mnist(train=True, cfg=cfg), None
    elif entry.dataset == "diabetes":
        ds, collate = data.diabetes_splits(cfg)[0], None
    else:
        ds, collate = data.NamesDataset(train=True, cfg=cfg), data.names_collate
    if limit is not None and limit < len(ds):  # a limit that keeps everything is the full run, draws included
        ds = Subset(ds, torch.randperm(len(ds), generator=generator)[:limit].tolist())
    return _LoaderBatches(DataLoader(ds, batch_size=entry.recipe.batch_size, shuffle=True,
                                     generator=generator, collate_fn=collate))


class _LoaderBatches:
    """A DataLoader whose batches are split into (model inputs, target)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for *inputs, target in self.loader:
            yield tuple(inputs), target


def make_optimizer(entry: Entry, model: nn.Module, steps: int):
    r = entry.recipe
    if r.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=r.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if r.schedule == "cosine" else None
    return opt, sched


def train_one(entry: Entry, cfg: data.DataConfig, *, epochs: int | None = None, device: str = "auto",
              seed: int | None = None, limit: int | None = None, runs_dir: Path = DEFAULT_RUNS,
              progress: bool | None = None) -> dict[str, Any]:
    """Train one model, evaluate it on its held-out split, save checkpoint and report in ``runs_dir/<name>``.

    What would stop it after the epochs is found before the first: the run folder must be writable and free
    (``run_lock``), and every file of the data set there, the held-out split's included.
    """
    device = pick_device(device)
    run_dir = runs_dir / entry.name
    with run_lock(run_dir):
        data.ensure_files(entry.dataset, cfg)
        model, report = _fit(entry, cfg, epochs=epochs, device=device, seed=seed, limit=limit,
                             progress=sys.stderr.isatty() if progress is None else progress)  # quiet in CI and logs
        save_run(run_dir, model, report)
    return report


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for the whole run. Two trainings of one model into one folder would write their
    checkpoints and reports in turn, and the last report could name the other run's checkpoint. An ``flock``
    is given back by the kernel when the process ends, SIGKILL included, so a dead run never blocks the next."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(13, "not writable")
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrainError(f"cannot write into {run_dir} ({e.strerror}): choose a writable --runs folder") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another `coursezoo train {run_dir.name}` is writing {run_dir}: wait for it to "
                             "finish, or give this one another --runs folder") from None
        except OSError as e:  # a file system without locks (ENOLCK on some NFS mounts)
            raise TrainError(f"cannot lock {run_dir / LOCK} ({e.strerror}): use a local --runs folder") from e
        yield
    finally:
        os.close(fd)


def _fit(entry: Entry, cfg: data.DataConfig, *, epochs: int | None, device: str, seed: int | None,
         limit: int | None, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The seeded training loop and the held-out evaluation: the trained model and its report."""
    seed = entry.recipe.seed if seed is None else seed
    generator = seed_everything(seed)
    epochs = entry.recipe.epochs if epochs is None else epochs
    model = build(entry).to(device)
    loss_fn = LOSSES[entry.task]()

    batches = train_batches(entry, cfg, generator, limit)
    optimizer, scheduler = make_optimizer(entry, model, epochs * len(batches))

    started, losses, batch_losses = time.perf_counter(), [], []
    toy = entry.dataset in ("linear_points", "logistic_points", "hello")
    epoch_bar = tqdm(range(epochs), desc=entry.name, unit="epoch", disable=not progress or not toy)
    for epoch in epoch_bar:
        model.train()
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"{entry.name} epoch {epoch + 1}/{epochs}",
                   unit="batch", disable=not progress or toy, leave=False)
        for inputs, target in bar:
            inputs = tuple(t.to(device) for t in inputs)
            target = target.to(device)
            out = model(*inputs)
            if entry.task == "hello":
                out = out.reshape(-1, out.size(-1))
            loss = loss_fn(out, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler:
                scheduler.step()
            batch_losses.append(loss.item())
            total += batch_losses[-1] * target.size(0)
            count += target.size(0)
            bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / count)
        epoch_bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if not toy:
            log.info("epoch done", extra={"model": entry.name, "epoch": epoch + 1, "loss": round(losses[-1], 5)})
    seconds = time.perf_counter() - started

    metrics = evaluate.measure(entry, evaluate.torch_predictor(model, entry, device), cfg)
    ok, verdict = evaluate.meets_bar(entry, metrics)
    report = {
        "model": entry.name, "metrics": metrics, "meets_bar": ok, "verdict": verdict,
        "epochs": epochs, "seconds": round(seconds, 2), "device": device, "seed": seed,
        "train_limit": limit, "losses": [round(v, 6) for v in losses],
        # mean loss of the first and last few optimizer steps: shows learning even in a one-epoch run
        "first_steps_loss": float(np.mean(batch_losses[:5])),
        "last_steps_loss": float(np.mean(batch_losses[-5:])),
        "recipe": entry.recipe.as_dict(),
        "data_sha256": data.data_sha256(entry.dataset, cfg), "torch": torch.__version__,
    }
    return model, report


def save_run(out_dir: Path, model: nn.Module, report: dict[str, Any]) -> None:
    """Checkpoint, then the report naming the sha256 of the very bytes written, each written aside and renamed
    in: a run interrupted here leaves no torn file, and a new checkpoint beside the previous report is one
    ``export`` refuses (the report does not name it)."""
    buffer = io.BytesIO()
    torch.save(model.cpu().state_dict(), buffer)
    checkpoint = buffer.getvalue()
    report["checkpoint_sha256"] = hashlib.sha256(checkpoint).hexdigest()
    try:
        _replace(out_dir / CHECKPOINT, checkpoint)
        _replace(out_dir / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    except OSError as e:
        raise TrainError(f"cannot save the run in {out_dir} ({e.strerror}); the folder keeps its previous run") from e


def _replace(path: Path, content: bytes) -> None:
    """Write ``content`` beside ``path`` under a name of this writer's own, then rename it over ``path``."""
    fd, staged = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(staged, 0o644)  # mkstemp's files are 0600: an export running as another user reads them
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train course models on their real data sets.",
        epilog="exit status: 1 when a model misses its bar with its recipe's settings; 0 when every model meets it, "
               "and for runs that change the recipe (--epochs, --seed, --limit), whose [LOW] is expected of a smoke "
               "run (`coursezoo export` still refuses to publish it); 1 also for an unknown name, and for a model that "
               "could not train (missing or unreadable data, a run folder in use or not writable), reported as [ERR] "
               "while the others still train")
    p.add_argument("names", nargs="+", help="model names from the catalogue, or 'all'")
    p.add_argument("--epochs", type=at_least(1), default=None, help="override the recipe's epochs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where PyTorch trains: auto = cuda when available (default: auto)")
    p.add_argument("--seed", type=at_least(0, MAX_SEED), default=None, help="override the recipe's seed")
    p.add_argument("--limit", type=at_least(1), default=None,
                   help="train on at most N examples drawn at random (seeded)")
    data.DataConfig.add_arguments(p)
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"where checkpoints and reports go (default: "
                                                                  f"{DEFAULT_RUNS})")
    return p


def main(args: argparse.Namespace) -> int:
    cfg = data.DataConfig.from_args(args)
    failed, errors = [], []
    for entry in resolve(args.names):
        try:
            report = train_one(entry, cfg, epochs=args.epochs, device=args.device, seed=args.seed,
                               limit=args.limit, runs_dir=args.runs)
        except KeyboardInterrupt:
            print(f"coursezoo train: interrupted while training {entry.name}; {args.runs / entry.name} keeps its "
                  "previous run", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - this model cannot train (no data, CUDA out of memory...): the others can
            print(f"[ERR] {entry.name}: {e if isinstance(e, data.DataError | TrainError) else one_line(e)}",
                  file=sys.stderr)
            errors.append(entry.name)
            continue
        mark = "ok " if report["meets_bar"] else "LOW"
        print(f"[{mark}] {entry.name}: {report['verdict']}, {report['epochs']} epochs, "
              f"{report['seconds']:.1f}s on {report['device']}")
        if not report["meets_bar"]:
            failed.append(entry.name)
    overridden = args.limit is not None or args.epochs is not None or args.seed is not None
    return 1 if errors or (failed and not overridden) else 0
