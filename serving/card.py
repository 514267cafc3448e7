"""The model card (`exported/<name>/<version>/model.json`): the contract between training and serving.

Training writes it (``training/export.py``); the server, the batch CLI and the benchmarks read it and
know nothing else about a model. It lives in ``serving`` because serving must not import torch, while
training may import this plain-Python module: the schema is defined once, here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
#: A version folder's name: a number in ASCII digits, as ``training/export.py`` numbers them (its hidden staging
#: folders do not match).
VERSION_DIR = re.compile(r"[0-9]+")

#: Tasks: each picks the domain RPC that serves it (the batch CLI's ``--kind`` values are the tasks it classifies).
TASKS = ("digits", "diabetes", "names", "hello", "regression", "logistic")

#: KServe v2 datatype name -> numpy dtype name.
DATATYPES = {"FP32": "float32", "FP64": "float64", "INT64": "int64", "INT32": "int32", "UINT8": "uint8"}
#: numpy dtype -> KServe v2 datatype name: what an array is called on the wire and in error messages.
DATATYPE_OF = {np.dtype(numpy_name): name for name, numpy_name in DATATYPES.items()}


class CardError(ValueError):
    """A model card is missing, unreadable or inconsistent with its files."""


#: The preprocessing keys ``serving/preprocess.py`` reads for each task (see ``ModelCard``).
PREPROCESSING_KEYS = {"digits": ("height", "width", "fit_box", "mean", "std", "polarity"),
                      "diabetes": ("num_features",), "names": ("vocab_size",), "hello": ("vocabulary",),
                      "regression": (), "logistic": ()}
#: Card fields and the JSON type each must have: a card that is valid JSON but of other types was loaded, then
#: failed every request it served (``"metrics": []`` made every default-model choice INTERNAL).
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "version": (str, int), "task": str, "lecture": str, "description": str, "inputs": list,
    "outputs": list, "labels": list, "preprocessing": dict, "metrics": dict, "training": dict, "export": dict,
    "data_sha256": dict, "files": dict, "serving": dict, "created": str}
_JSON_TYPES = {str: "string", int: "number", dict: "object", list: "list"}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; ``-1`` marks a dynamic axis (the batch axis is always first)."""

    name: str
    datatype: str  # KServe v2 name, e.g. "FP32", "INT64"
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> str:
        return DATATYPES[self.datatype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        if d["datatype"] not in DATATYPES:
            raise CardError(f"tensor {d['name']!r}: unknown datatype {d['datatype']!r}")
        return cls(name=d["name"], datatype=d["datatype"], shape=tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class ModelCard:
    """Everything serving needs to know about one exported model version.

    ``preprocessing`` is task specific; the keys ``serving/preprocess.py`` reads are ``PREPROCESSING_KEYS``
    (digits: the image size, fit box, normalization and polarity; diabetes: the feature count and, optionally,
    ``feature_range``; names: ``vocab_size``; hello: ``vocabulary``, the characters in index order; regression
    and logistic: nothing, raw floats). Training records more (the names' ``padding_index`` and
    ``normalization``), which serving does not read.
    """

    name: str
    version: str
    task: str
    lecture: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    data_sha256: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)  # optional per-model batching hints
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelCard:
        try:
            if d.get("schema_version") != SCHEMA_VERSION:
                raise CardError(f"schema_version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            if d["task"] not in TASKS:
                raise CardError(f"unknown task {d['task']!r}; expected one of {', '.join(TASKS)}")
            for key, kinds in FIELD_TYPES.items():
                if key in d and (not isinstance(d[key], kinds) or isinstance(d[key], bool)):
                    expected = " or ".join(_JSON_TYPES[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                    raise CardError(f"{key!r} is {json.dumps(d[key])[:40]}: expected a JSON {expected}")
            kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
            kwargs["inputs"] = tuple(TensorSpec.from_json(t) for t in d["inputs"])
            kwargs["outputs"] = tuple(TensorSpec.from_json(t) for t in d["outputs"])
            kwargs["labels"] = tuple(d["labels"])
            kwargs["version"] = str(d["version"])
            card = cls(**kwargs)
        except CardError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"malformed model card: {e!r}") from e
        card.check()
        return card

    def check(self) -> None:
        """CardError where the card contradicts itself in what serving reads: labels that do not name the
        output's values (17 labels for names_gru's 18 logits answered INTERNAL for some names), a preprocessing
        setting its task needs missing, labels that are not strings."""
        missing = [key for key in PREPROCESSING_KEYS[self.task] if key not in self.preprocessing]
        if missing:
            raise CardError(f"a {self.task} card's preprocessing needs {', '.join(missing)}")
        if not all(isinstance(label, str) for label in self.labels):
            raise CardError("labels must be strings")
        if not self.labels and self.task != "regression":  # a regression's output is the answer itself
            raise CardError(f"a {self.task} card needs labels: the answers are named by them")
        if self.labels and self.outputs:
            output = self.outputs[0]
            width = output.shape[-1]
            expected = 2 if width == 1 else width  # one probability names both classes
            if width > 0 and len(self.labels) != expected:
                raise CardError(f"{len(self.labels)} labels for output {output.name!r} of {width} values per item: "
                                f"expected {expected}")

    @classmethod
    def load(cls, directory: Path) -> ModelCard:
        path = Path(directory) / CARD_FILE
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise CardError(f"cannot read {path}: {e}") from e

    @classmethod
    def load_version(cls, directory: Path) -> ModelCard:
        """The card of the version folder ``<repo>/<name>/<version>``, refused when it describes another model
        or version (a folder copied under another name): the server, the batch CLI and eval would otherwise
        serve, run or pass it under the folder's name."""
        directory = Path(directory)
        card = cls.load(directory)
        if (card.name, card.version) != (directory.parent.name, directory.name):
            raise CardError(f"{directory / CARD_FILE} describes {card.name}/{card.version}, not "
                            f"{directory.parent.name}/{directory.name}")
        return card

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    def verify_file(self, directory: Path, filename: str = ONNX_FILE) -> Path:
        """Return the file's path after checking its sha256 against the card; raise CardError otherwise."""
        path = Path(directory) / filename
        expected = self.files.get(filename, {}).get("sha256")
        if not expected:
            raise CardError(f"{self.name}/{self.version}: card lists no sha256 for {filename}")
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise CardError(f"{self.name}/{self.version}: cannot read {path}: {e}") from e
        if actual != expected:
            raise CardError(
                f"{self.name}/{self.version}: {filename} sha256 {actual[:12]}… does not match the card's "
                f"{expected[:12]}…"
            )
        return path


def preference(card: ModelCard) -> tuple[float, str]:
    """Sort key for choosing a task's default model: the most accurate card first, ties by name.

    The server (an empty ``model`` in a request) and the batch CLI (no ``--model``) both choose by it.
    """
    accuracy = card.metrics.get("accuracy")
    return (-float(accuracy) if isinstance(accuracy, int | float) else float("inf"), card.name)


def version_dirs(model_dir: Path) -> list[Path]:
    """``model_dir``'s version folders, newest first: the one rule for what is a version, which the server, the
    batch CLI, eval, export and the benchmarks share (before, each had its own, and they picked different
    versions of one model). None when ``model_dir`` does not exist; other OSErrors propagate."""
    try:
        found = [p for p in model_dir.iterdir() if p.is_dir() and VERSION_DIR.fullmatch(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
