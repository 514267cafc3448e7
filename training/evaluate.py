"""Held-out evaluation, shared by training (eager model), export (ONNX) and ``coursezoo eval``.

A model is evaluated through a ``Predict`` callable (named numpy inputs -> first output), so the
PyTorch module and the ONNX export are measured by the same code on the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coursezoo.logs import one_line
from serving.card import CARD_FILE, ONNX_FILE, CardError, ModelCard, version_dirs
from serving.postprocess import diabetes_predictions
from serving.preprocess import decode_hello, encode_items
from training import data
from training.catalog import HELLO_VOCAB, Entry, resolve

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]
CHUNK = 1000


def torch_predictor(model: torch.nn.Module, entry: Entry, device: str = "cpu") -> Predict:
    model = model.to(device).eval()

    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            args = [torch.from_numpy(inputs[t.name]).to(device) for t in entry.inputs]
            return model(*args).cpu().numpy()

    return predict


def onnx_predictor(path: str) -> Predict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)[0]


def named(entry: Entry, *tensors: np.ndarray) -> dict[str, np.ndarray]:
    """Tensors in the order of the entry's inputs -> the named inputs a ``Predict`` takes: the catalogue
    names them."""
    return dict(zip((t.name for t in entry.inputs), tensors, strict=True))


def encoded(entry: Entry, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts -> the entry's named inputs, encoded as serving encodes them, with the settings its card will
    carry (the names vocabulary size among them)."""
    return named(entry, *encode_items(entry.task, entry.preprocessing, texts))


def held_out(entry: Entry, cfg: data.DataConfig) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """The evaluation inputs in chunks, and the targets (None for the toy regression checks)."""
    if entry.dataset == "mnist":
        x, y = data.mnist_arrays(train=False, cfg=cfg)
        return [named(entry, x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)], y
    if entry.dataset == "diabetes":
        _, test = data.diabetes_splits(cfg)
        x, y = test.tensors
        return [named(entry, x.numpy())], y.numpy().reshape(-1).astype(np.int64)
    if entry.dataset == "names":
        items = data.NamesDataset(train=False, cfg=cfg).items
        chunks = [encoded(entry, [n for n, _ in items[i : i + CHUNK]]) for i in range(0, len(items), CHUNK)]
        return chunks, np.array([c for _, c in items], dtype=np.int64)
    if entry.dataset == "hello":
        x, _ = data.hello_pair()
        return [named(entry, x.numpy())], None
    if entry.dataset == "linear_points":
        return [named(entry, np.array([[entry.bar["x"]]], dtype=np.float32))], None
    if entry.dataset == "logistic_points":
        hours = np.array([[entry.bar["p_below"]], [entry.bar["p_above"]]], dtype=np.float32)
        return [named(entry, hours)], None
    raise ValueError(f"no held-out data for {entry.dataset}")


def measure(entry: Entry, predict: Predict, cfg: data.DataConfig) -> dict[str, Any]:
    """Metrics on the held-out split, in the shape the model card stores."""
    chunks, targets = held_out(entry, cfg)
    out = np.concatenate([predict(c) for c in chunks])
    if entry.task in ("digits", "names"):
        correct = int((out.argmax(axis=1) == targets).sum())
        return {"accuracy": correct / len(targets), "correct": correct, "examples": len(targets),
                "split": "test"}
    if entry.task == "diabetes":  # labelled by the rule serving answers with, so the card's accuracy is serving's
        labels = np.array([r.label for r in diabetes_predictions(out)], dtype=np.int64)
        correct = int((labels == targets).sum())
        return {"accuracy": correct / len(targets), "correct": correct, "examples": len(targets),
                "split": f"test ({data.DIABETES_TEST_FRACTION:.0%} of the file, seed {data.DIABETES_SPLIT_SEED})"}
    if entry.task == "hello":
        return {"input": "hello", "output": decode_hello(out, ["hello"], HELLO_VOCAB)[0]}
    if entry.task == "regression":
        return {"x": entry.bar["x"], "y": float(out[0, 0])}
    if entry.task == "logistic":
        return {"p_below": float(out[0, 0]), "p_above": float(out[1, 0]),
                "hours_below": entry.bar["p_below"], "hours_above": entry.bar["p_above"]}
    raise ValueError(entry.task)


def meets_bar(entry: Entry, metrics: dict[str, Any]) -> tuple[bool, str]:
    """Whether the metrics reach the catalogue's bar, and a one-line explanation."""
    bar = entry.bar
    if "accuracy" in bar:
        ok = metrics["accuracy"] >= bar["accuracy"]
        return ok, f"accuracy {metrics['accuracy']:.4f} (bar {bar['accuracy']:.3f})"
    if "output" in bar:
        return metrics["output"] == bar["output"], f"'hello' -> {metrics['output']!r} (bar {bar['output']!r})"
    if "tolerance" in bar:
        ok = abs(metrics["y"] - bar["y"]) <= bar["tolerance"]
        return ok, f"y({bar['x']:g}) = {metrics['y']:.4f} (bar {bar['y']:g} ± {bar['tolerance']:g})"
    ok = metrics["p_above"] > 0.5 > metrics["p_below"]
    return ok, (f"P({bar['p_above']:g}h) = {metrics['p_above']:.3f} > 0.5 > "
                f"P({bar['p_below']:g}h) = {metrics['p_below']:.3f}")


# --- `coursezoo eval`: re-evaluate the shipped ONNX exports -----------------------------------------

METRIC_TOLERANCE = 0.002  # 0.2 points of accuracy between the card and a fresh evaluation


def latest_version(repo: Path, name: str) -> Path:
    """The newest version folder of ``name``, readable card or not: eval reports a broken newest version rather
    than pass over it to an older one."""
    versions = version_dirs(repo / name)
    if not versions:
        raise FileNotFoundError(f"no exported versions of {name} under {repo / name}")
    return versions[0]


def contract_differences(entry: Entry, card: ModelCard) -> list[str]:
    """The card fields serving acts on (and the bar) where the card disagrees with the catalogue.

    The server labels, encodes and shapes requests by the card alone: a card whose labels were reordered
    would have every answer named wrong while its accuracy, measured by index, still matched. The
    preprocessing's ``note`` is prose for people and may be reworded without a new export.
    """
    def plain(value: Any) -> Any:  # tuples and lists alike, as the card's JSON holds them
        return json.loads(json.dumps(value, default=lambda spec: spec.to_json()))

    def settings(preprocessing: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in preprocessing.items() if k != "note"}

    pairs = {"task": (card.task, entry.task), "inputs": (card.inputs, entry.inputs),
             "outputs": (card.outputs, entry.outputs), "labels": (card.labels, entry.labels),
             "preprocessing": (settings(card.preprocessing), settings(dict(entry.preprocessing))),
             "bar": (card.metrics.get("bar"), entry.bar)}
    return [field for field, (on_card, in_catalogue) in pairs.items() if plain(on_card) != plain(in_catalogue)]


def evaluate_export(entry: Entry, version_dir: Path, cfg: data.DataConfig) -> dict[str, Any]:
    """Fresh held-out metrics of an exported ONNX file, compared with its card and its bar, and the card's
    contract compared with the catalogue. A card of another model or version, or one whose tensors or task
    are not the catalogue's, is refused before anything runs (a CardError), as the server refuses it."""
    card = ModelCard.load_version(version_dir)
    differs = contract_differences(entry, card)
    if unrunnable := [f for f in ("task", "inputs", "outputs") if f in differs]:
        raise CardError(f"{version_dir / CARD_FILE}: its {', '.join(unrunnable)} differ from the catalogue's "
                        f"{entry.name}: not measured")
    onnx_path = card.verify_file(version_dir, ONNX_FILE)
    metrics = measure(entry, onnx_predictor(str(onnx_path)), cfg)
    missing = sorted(set(metrics) - set(card.metrics))
    if missing:
        raise CardError(f"{version_dir / CARD_FILE}: its metrics lack {', '.join(missing)}")
    ok, verdict = meets_bar(entry, metrics)
    on_card = {k: _card_metric(version_dir, k, card.metrics[k], metrics[k]) for k in metrics}
    if "accuracy" in metrics:
        delta = abs(metrics["accuracy"] - on_card["accuracy"])
        matches = delta <= METRIC_TOLERANCE
    else:
        delta, matches = 0.0, all(metrics[k] == on_card[k] if isinstance(metrics[k], str)
                                  else abs(metrics[k] - on_card[k]) <= 1e-4 for k in metrics)
    return {"name": entry.name, "version": card.version, "metrics": metrics, "meets_bar": ok,
            "verdict": verdict, "card_delta": delta, "matches_card": matches,
            "differs_from_catalogue": differs,
            # measured on other data than the card's: its figures cannot be compared, and the model is not to blame
            "data_differs": data.data_differences(entry.dataset, cfg, card.data_sha256)}


def _card_metric(version_dir: Path, key: str, value: Any, measured: Any) -> Any:
    """The card's value of a metric, refused (a CardError, not a TypeError) when it is not of the measured kind."""
    if isinstance(measured, str) == isinstance(value, str) and not isinstance(value, bool) and value is not None \
            and isinstance(value, str | int | float):
        return value
    raise CardError(f"{version_dir / CARD_FILE}: its metrics.{key} is {value!r}, expected a "
                    f"{'text' if isinstance(measured, str) else 'number'}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Re-evaluate the newest version of each exported model on the held-out "
                                "data, and check its card against its bar and the catalogue; exit 1 if any is "
                                "[BAD] or [ERR].")
    p.add_argument("names", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--repo", type=Path, default=Path("exported"), help="model repository (default: exported)")
    data.DataConfig.add_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p


def main(args: argparse.Namespace) -> int:
    cfg = data.DataConfig.from_args(args)
    if not args.repo.is_dir():  # else one "no exported versions" line per model, never the reason
        print(f"coursezoo eval: the model repository {args.repo} is not a directory (--repo)", file=sys.stderr)
        return 1
    results, bad = [], 0
    for entry in resolve(args.names):
        try:
            r = evaluate_export(entry, latest_version(args.repo, entry.name), cfg)
        except Exception as e:  # noqa: BLE001 - one broken version (ORT's errors included) must not hide the others
            error = str(e) if isinstance(e, FileNotFoundError | CardError | data.DataError) else one_line(e)
            print(f"[ERR] {entry.name}: {error}")
            results.append({"name": entry.name, "error": error})
            bad += 1
            continue
        results.append(r)
        good = r["meets_bar"] and r["matches_card"] and not r["differs_from_catalogue"] and not r["data_differs"]
        bad += not good
        notes = ([] if r["matches_card"] else ["differs from its card"]) + \
            ([f"card and catalogue differ: {', '.join(r['differs_from_catalogue'])}"]
             if r["differs_from_catalogue"] else []) + \
            ([f"measured on other data than the card's: {', '.join(r['data_differs'])} under {cfg.root}"]
             if r["data_differs"] else [])
        print(f"[{'ok ' if good else 'BAD'}] {r['name']} v{r['version']}: {r['verdict']}"
              + "".join(f" ({note})" for note in notes))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if bad else 0
