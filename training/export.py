"""``coursezoo export NAME|all``: TorchScript + ONNX + model card, checked before anything is written.

Reads the checkpoint ``coursezoo train`` left in ``runs/<name>/``, and writes
``<repo>/<name>/<version>/{model.onnx, model.pt, model.json}`` with the next free version number.
Every export must pass ``onnx.checker`` and agree with the eager model (TorchScript and ONNX Runtime,
batch sizes 1 and >1, max abs difference <= 1e-4) on real held-out inputs, on the data the run trained on;
otherwise nothing is written. Nor is anything when the newest version already holds the very same files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

from coursezoo.logs import one_line
from serving.card import ONNX_FILE, TORCHSCRIPT_FILE, CardError, ModelCard, sha256_file, version_dirs
from training import data, evaluate
from training.catalog import CHECKPOINT, DEFAULT_RUNS, REPORT, Entry, resolve
from training.models import build

PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """An export failed a check; nothing was written."""


@dataclass(frozen=True)
class Exported:
    """Where an export's version lives, and whether this export wrote it."""

    path: Path
    #: False when the newest version already held these very files (the same run exported again: a restarted
    #: trainer job would otherwise add a version, and a reload, per restart)
    written: bool


def next_version(model_dir: Path) -> str:
    versions = version_dirs(model_dir)
    return str(int(versions[0].name) + 1) if versions else "1"


#: Names beside the held-out sample in the parity batch: the edges of a packed sequence (one step, and a long
#: name that pads every other row by far more than the test set's longest does).
EDGE_NAMES = ("A", "Wolfeschlegelsteinhausenbergerdorff")


def parity_inputs(entry: Entry, cfg: data.DataConfig) -> list[dict[str, np.ndarray]]:
    """Real held-out inputs at batch size 1 and at a larger batch that reaches the edges of the model's
    dynamic axes: sequence lengths from 1 to well past the data's, and for names, every country."""
    chunk = evaluate.held_out(entry, cfg)[0][0]
    if entry.task == "hello":  # one held-out word: add the other course words, one letter and a long text
        chunk = evaluate.encoded(entry, ["hello", "ohlol", "hell", "lol", "h", "hello" * 8])
    elif entry.task == "names":  # the test file is sorted by country: take names from each in turn, then the edges
        by_country: dict[int, list[str]] = {}
        for name, country in data.NamesDataset(train=False, cfg=cfg).items:
            by_country.setdefault(country, []).append(name)
        in_turn = [name for names in itertools.zip_longest(*by_country.values()) for name in names if name]
        chunk = evaluate.encoded(entry, [*in_turn[: 64 - len(EDGE_NAMES)], *EDGE_NAMES])
    elif entry.task in ("regression", "logistic"):  # the three training points and the held-out ones
        name = entry.inputs[0].name
        chunk = {name: np.concatenate([chunk[name], np.array([[1.0], [2.0], [3.0]], dtype=np.float32)])}
    big = {k: v[:64] for k, v in chunk.items()}
    one = {k: v[:1] for k, v in chunk.items()}
    if entry.task == "names":  # trim the padding to the batch's own longest name
        chars, lengths = (t.name for t in entry.inputs)
        one[chars] = one[chars][:, : int(one[lengths][0])]
        big[chars] = big[chars][:, : int(big[lengths].max())]
    return [one, big]


def _check_close(what: str, got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise ExportError(f"{what}: output shape {got.shape}, eager model gives {want.shape}")
    diff = float(np.abs(got - want).max())
    if not diff <= PARITY_ATOL:  # also catches NaN
        raise ExportError(f"{what}: max abs diff {diff:.2e} from the eager model > {PARITY_ATOL}")
    return diff


def export_one(entry: Entry, cfg: data.DataConfig, runs_dir: Path = DEFAULT_RUNS,
               out_root: Path = Path("exported"), *, allow_below_bar: bool = False) -> Exported:
    """Export the checkpoint ``coursezoo train`` left for ``entry`` as the next version under ``out_root``.

    Nothing is written unless every check passes, the ONNX file's accuracy on the test split meeting the
    model's bar included: the server serves the newest version, so a smoke run (``--epochs 1``) must not
    become it by accident; ``allow_below_bar`` publishes such a model on purpose. The data must be what the
    run trained on (its report's sha256s): the bar is judged on it and the card names it. Nothing is written
    either when the newest version already holds the very same files.
    """
    model, report = _load_run(entry, runs_dir / entry.name)
    batches = parity_inputs(entry, cfg)  # reads the held-out split, which the data check then compares
    _check_data(entry, cfg, report)
    _check_writable(entry, out_root / entry.name)
    in_names = [t.name for t in entry.inputs]
    out_names = [t.name for t in entry.outputs]
    example = tuple(torch.from_numpy(batches[-1][n]) for n in in_names)
    dynamic = {t.name: {i: f"{t.name}_dim{i}" for i, d in enumerate(t.shape) if d == -1}
               for t in (*entry.inputs, *entry.outputs)}

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        onnx_path, ts_path = tmp_dir / ONNX_FILE, tmp_dir / TORCHSCRIPT_FILE
        onnx_module = model.export_form() if hasattr(model, "export_form") else model
        # TorchScript (torch.jit) and the TorchScript-based ONNX exporter are deprecated upstream but are
        # the ones that handle the course's loops and packed sequences; their notices are expected.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(ts_path))
            loaded_ts = torch.jit.load(str(ts_path))
            torch.onnx.export(onnx_module, example, str(onnx_path), input_names=in_names,
                              output_names=out_names, dynamic_axes=dynamic, opset_version=entry.opset,
                              dynamo=False)
        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        parity = {}
        for batch in batches:
            args = [torch.from_numpy(batch[n]) for n in in_names]
            with torch.no_grad():
                want = model(*args).numpy()
                ts_out = loaded_ts(*args).numpy()
            n = len(args[0])
            parity[f"torchscript_batch{n}"] = _check_close(f"{entry.name} TorchScript, batch {n}", ts_out, want)
            parity[f"onnx_batch{n}"] = _check_close(f"{entry.name} ONNX Runtime, batch {n}",
                                                    session.run(None, batch)[0], want)

        metrics = evaluate.measure(entry, evaluate.onnx_predictor(str(onnx_path)), cfg)
        ok, verdict = evaluate.meets_bar(entry, metrics)
        if not ok and not allow_below_bar:
            held_out = " on the test split" if "split" in metrics else ""  # the toy models have none
            raise ExportError(f"{entry.name}: {verdict}{held_out}, below its bar: not exported (train with "
                              "the recipe's settings, or pass --allow-below-bar to publish it anyway)")
        card = ModelCard(
            name=entry.name, version=next_version(out_root / entry.name), task=entry.task,
            lecture=entry.lecture, description=entry.description, inputs=entry.inputs,
            outputs=entry.outputs, labels=entry.labels, preprocessing=dict(entry.preprocessing),
            metrics={**metrics, "meets_bar": ok, "bar": entry.bar, "verdict": verdict,
                     "measured_on": "ONNX export, CPUExecutionProvider"},
            training={k: report[k] for k in ("epochs", "seconds", "device", "seed", "recipe", "train_limit",
                                             "losses")} | {"eager_metrics": report["metrics"]},
            export={"opset": entry.opset, "exporter": "torch.onnx (TorchScript-based)",
                    "parity_max_abs_diff": parity, "parity_atol": PARITY_ATOL,
                    "onnx_module": type(onnx_module).__name__, "versions": _versions()},
            data_sha256=report["data_sha256"],
            files={f: {"sha256": sha256_file(tmp_dir / f), "bytes": (tmp_dir / f).stat().st_size}
                   for f in (ONNX_FILE, TORCHSCRIPT_FILE)},
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        same = _newest_with_files(out_root / entry.name, card.files)
        if same is not None:
            return Exported(same, written=False)
        card.save(tmp_dir)
        dest = out_root / entry.name / card.version
        _publish(entry, tmp_dir, dest)
    return Exported(dest, written=True)


def _publish(entry: Entry, files: Path, dest: Path) -> None:
    """Copy the checked files into a hidden sibling of ``dest`` of their own, then rename it ``dest``: the
    server never sees a half-written version, two exports at once never write into one folder, and an export
    that fails (a full disk, Ctrl-C) takes its staging folder with it."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    except OSError as e:
        raise ExportError(f"{entry.name}: cannot write into {dest.parent} ({e.strerror})") from e
    try:
        shutil.copytree(files, staging, dirs_exist_ok=True)
        staging.chmod(0o755)  # mkdtemp's folders are 0700: a server running as another user must read it
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError | shutil.Error):  # shutil.Error: copytree's list of the files it could not copy
            raise ExportError(f"{entry.name}: cannot write {dest} ({e}); nothing was published") from e
        raise
    try:
        staging.rename(dest)  # refused if another export wrote this version meanwhile
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"{entry.name}: version {dest.name} appeared while exporting (another export?): "
                          "export again for the next free version") from e


def _check_data(entry: Entry, cfg: data.DataConfig, report: dict[str, Any]) -> None:
    """Refuse data other than the run's: the bar would be judged, and the card's accuracy measured, on data
    the card does not name (a report without sha256s, from before they were recorded, is taken as it is)."""
    trained_on = report.get("data_sha256")
    if trained_on is None:
        return
    if differ := data.data_differences(entry.dataset, cfg, trained_on):
        raise ExportError(f"{entry.name}: the data under {cfg.root} is not what the run trained on "
                          f"({', '.join(differ)}: not the sha256 its report names): export with that data, or train "
                          "again on this")


def _check_writable(entry: Entry, model_dir: Path) -> None:
    """Refuse a repository this process cannot write before the export's work, not after it; nothing is
    created (a refused export leaves no empty model folder for the server to list)."""
    existing = next(p for p in (model_dir, *model_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ExportError(f"{entry.name}: cannot write into the repository at {existing} (not a writable folder): "
                          "choose another --repo")


def _newest_with_files(model_dir: Path, files: dict[str, dict[str, Any]]) -> Path | None:
    """The newest version, when its card lists these very files and its folder still holds them."""
    versions = version_dirs(model_dir)
    if not versions:
        return None
    try:
        card = ModelCard.load_version(versions[0])
        if card.files != files:
            return None
        for name in files:
            card.verify_file(versions[0], name)
    except (CardError, OSError):
        return None
    return versions[0]


def _load_run(entry: Entry, run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model and its training report, checked to belong together."""
    ckpt, report_path = run_dir / CHECKPOINT, run_dir / REPORT
    again = f"run `coursezoo train {entry.name}`"
    if not ckpt.exists():
        raise ExportError(f"{entry.name}: no checkpoint at {ckpt}; {again} first")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{entry.name}: no readable training report at {report_path} ({e}); {again} again") from e
    # Runs from before the report named its checkpoint carry no sha256; any later pair must match.
    expected = report.get("checkpoint_sha256")
    if expected is not None and expected != sha256_file(ckpt):
        raise ExportError(f"{entry.name}: {ckpt} is not the checkpoint {report_path} describes (an interrupted "
                          f"or concurrent run?); {again} again")
    model = build(entry)
    try:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as e:  # torch's words for a truncated or foreign file
        raise ExportError(f"{entry.name}: cannot load {ckpt} ({e}); {again} again") from e
    model.eval()
    return model, report


def _versions() -> dict[str, Any]:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export trained models to TorchScript and ONNX.")
    p.add_argument("names", nargs="+", help="model names from the catalogue, or 'all'")
    p.add_argument("--repo", "--out", type=Path, default=Path("exported"), dest="repo",
                   help="model repository to write into, as `serve`, `eval` and `batch` call it (default: exported; "
                        "--out is its former name)")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                   help=f"where `coursezoo train` left checkpoints (default: {DEFAULT_RUNS})")
    p.add_argument("--allow-below-bar", action="store_true",
                   help="export a model whose test accuracy misses its bar (refused by default: the server "
                        "serves the newest version)")
    data.DataConfig.add_arguments(p)
    return p


def main(args: argparse.Namespace) -> int:
    cfg = data.DataConfig.from_args(args)
    entries, failed = resolve(args.names), []
    for entry in entries:  # each model on its own: one that fails does not hold back the others
        try:
            result = export_one(entry, cfg, args.runs, args.repo, allow_below_bar=args.allow_below_bar)
        except Exception as e:  # noqa: BLE001 - this model fails (a check, onnx's checker, ORT...): the others go on
            print(f"export failed: {e if isinstance(e, ExportError | data.DataError) else one_line(e)}",
                  file=sys.stderr)
            failed.append(entry.name)
            continue
        verdict = ModelCard.load(result.path).metrics["verdict"]
        if result.written:
            print(f"{entry.name}: wrote {result.path} ({verdict})")
        else:
            print(f"{entry.name}: unchanged, {result.path} already holds this run's files ({verdict})")
    if failed and len(entries) > 1:
        print(f"coursezoo export: {len(failed)} of {len(entries)} not exported: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
