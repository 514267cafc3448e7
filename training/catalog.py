"""The model catalogue: each course model described once.

Training, evaluation and export read these entries; serving reads the model cards that export writes
from them. The canonical names below are used everywhere (CLI, exports, RPCs, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.card import TensorSpec

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_LABELS = tuple(str(d) for d in range(10))
HELLO_VOCAB = ("e", "h", "l", "o")
NAMES_COUNTRIES = (
    "Arabic", "Chinese", "Czech", "Dutch", "English", "French", "German", "Greek", "Irish", "Italian",
    "Japanese", "Korean", "Polish", "Portuguese", "Russian", "Scottish", "Spanish", "Vietnamese",
)  # sorted, as the course builds its country list
NAMES_VOCAB_SIZE = 128  # ASCII code points; 0 is padding

#: Where ``coursezoo train`` leaves each model's run, ``<runs>/<name>/``, for export and the benchmarks' eager rows
#: (here, not in training/train.py, so that the benchmarks read it without torchvision, which train needs).
DEFAULT_RUNS = Path("runs")
#: what a run leaves in ``<runs>/<name>/``
CHECKPOINT, REPORT = "model.pt", "metrics.json"

DIGITS_PREPROCESSING = {
    "height": 28, "width": 28, "fit_box": 20, "mean": MNIST_MEAN, "std": MNIST_STD,
    "polarity": "light_on_dark", "centering": "center_of_mass",
    "note": "grayscale, white digit on black, scaled to [0,1], then (x - mean) / std",
}


@dataclass(frozen=True)
class Recipe:
    """How a model is trained; ``course`` says what the lecture used where we differ."""

    epochs: int
    optimizer: str  # "sgd" or "adam"
    lr: float
    momentum: float = 0.0
    batch_size: int = 64
    schedule: str = "none"  # "none" or "cosine"
    seed: int = 0  # the toy RNNs reach "ohlol" or not depending on the initial weights
    course: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Entry:
    name: str
    lecture: str
    task: str
    architecture: str  # class name in training.models
    dataset: str  # key in training.data.DATASETS
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    recipe: Recipe
    bar: dict[str, Any]  # what "trained" means, checked by training.evaluate.meets_bar
    preprocessing: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    opset: int = 18


def _digits(name: str, lecture: str, arch: str, desc: str, recipe: Recipe, bar: float) -> Entry:
    return Entry(
        name=name, lecture=lecture, task="digits", architecture=arch, dataset="mnist", description=desc,
        inputs=(TensorSpec("image", "FP32", (-1, 1, 28, 28)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        labels=DIGIT_LABELS, recipe=recipe, bar={"accuracy": bar}, preprocessing=DIGITS_PREPROCESSING,
    )


def _hello(name: str, arch: str, desc: str, recipe: Recipe) -> Entry:
    return Entry(
        name=name, lecture="L12", task="hello", architecture=arch, dataset="hello", description=desc,
        inputs=(TensorSpec("chars", "INT64", (-1, -1)),),
        outputs=(TensorSpec("logits", "FP32", (-1, -1, len(HELLO_VOCAB))),),
        labels=HELLO_VOCAB, recipe=recipe, bar={"output": "ohlol"},
        preprocessing={"vocabulary": list(HELLO_VOCAB), "note": "one index per character; "
                       "one-hot encoding happens inside the graph"},
    )


_COURSE_MNIST = "SGD lr=0.01 momentum=0.5, batch 64, 10 epochs"

CATALOG: dict[str, Entry] = {e.name: e for e in (
    Entry(
        name="linear_regression", lecture="L5", task="regression", architecture="LinearModel",
        dataset="linear_points", description="y = w*x + b fitted to x=1,2,3 / y=2,4,6 (MSE, SGD).",
        inputs=(TensorSpec("x", "FP32", (-1, 1)),), outputs=(TensorSpec("y", "FP32", (-1, 1)),),
        labels=(), recipe=Recipe(epochs=3000, optimizer="sgd", lr=0.01, batch_size=3,
                                 course="SGD lr=0.01, 1000 epochs, full batch: y(4) = 7.92 from seed 0"),
        bar={"x": 4.0, "y": 8.0, "tolerance": 0.05},
    ),
    Entry(
        name="logistic_regression", lecture="L6", task="logistic", architecture="LogisticRegressionModel",
        dataset="logistic_points", description="P(pass | hours studied), fitted to 1,2,3 h / 0,0,1 (BCE).",
        inputs=(TensorSpec("hours", "FP32", (-1, 1)),), outputs=(TensorSpec("probability", "FP32", (-1, 1)),),
        labels=("fail", "pass"), recipe=Recipe(epochs=1000, optimizer="sgd", lr=0.01, batch_size=3,
                                               course="SGD lr=0.01, 1000 epochs, full batch"),
        bar={"p_above": 4.0, "p_below": 1.0},
    ),
    Entry(
        name="diabetes_mlp", lecture="L7-8", task="diabetes", architecture="DiabetesMLP",
        dataset="diabetes", description="8-6-4-1 sigmoid MLP on the scaled Pima diabetes set (BCE).",
        inputs=(TensorSpec("features", "FP32", (-1, 8)),),
        outputs=(TensorSpec("probability", "FP32", (-1, 1)),),
        labels=("0", "1"),
        recipe=Recipe(epochs=300, optimizer="sgd", lr=0.1, momentum=0.9, batch_size=32,
                      course="SGD lr=0.01, batch 32, 100 epochs: majority class only, 0.6316"),
        bar={"accuracy": 0.75},
        preprocessing={
            "num_features": 8, "feature_range": [-1.0, 1.0],
            "label_1": "the majority class of the course file (496 of 759 rows): libsvm's +1 class of the "
                       "scaled Pima set, 'tested negative for diabetes' in the original data",
            "note": "features as in the course CSV: the 8 Pima columns each scaled to [-1, 1]",
        },
    ),
    # The course recipe gave 0.9727 (softmax) and 0.9852 (cnn) here: at the bars. Momentum 0.9 and a
    # cosine schedule over the same 10 epochs leave a margin; the architectures are unchanged.
    _digits("mnist_softmax", "L9", "SoftmaxMLP", "784-512-256-128-64-10 ReLU MLP (CrossEntropy).",
            Recipe(epochs=10, optimizer="sgd", lr=0.01, momentum=0.9, schedule="cosine",
                   course=_COURSE_MNIST), 0.970),
    _digits("mnist_cnn", "L10", "BasicCNN", "conv 1->10 k5, conv 10->20 k5, maxpool 2, fc 320->10.",
            Recipe(epochs=10, optimizer="sgd", lr=0.01, momentum=0.9, schedule="cosine",
                   course=_COURSE_MNIST), 0.985),
    _digits("mnist_inception", "L11", "InceptionNet", "two InceptionA blocks (88 channels), fc 1408->10.",
            Recipe(epochs=8, optimizer="sgd", lr=0.02, momentum=0.9, schedule="cosine",
                   course=_COURSE_MNIST), 0.988),
    _digits("mnist_resnet", "L11", "ResNet", "ResidualBlock(16), ResidualBlock(32), fc 512->10.",
            Recipe(epochs=8, optimizer="sgd", lr=0.02, momentum=0.9, schedule="cosine",
                   course=_COURSE_MNIST), 0.990),
    _hello("hello_rnncell", "HelloRNNCell", "RNNCell(4, 4) stepped over one-hot characters.",
           Recipe(epochs=15, optimizer="adam", lr=0.1, batch_size=1, seed=2,
                  course="Adam lr=0.1, 15 epochs")),
    _hello("hello_rnn", "HelloRNN", "RNN(4, 4) over one-hot characters.",
           Recipe(epochs=15, optimizer="adam", lr=0.05, batch_size=1, seed=2,
                  course="Adam lr=0.05, 15 epochs")),
    _hello("hello_embedding", "HelloEmbedding", "Embedding(4, 10) + RNN(10, 8, 2 layers) + Linear(8, 4).",
           Recipe(epochs=15, optimizer="adam", lr=0.05, batch_size=1, course="Adam lr=0.05, 15 epochs")),
    Entry(
        name="names_gru", lecture="L13", task="names", architecture="NamesGRU", dataset="names",
        description="char Embedding(128, 100) + bidirectional 2-layer GRU(100) + Linear(200, 18), "
                    "packed sequences.",
        inputs=(TensorSpec("chars", "INT64", (-1, -1)), TensorSpec("lengths", "INT64", (-1,))),
        outputs=(TensorSpec("logits", "FP32", (-1, len(NAMES_COUNTRIES))),),
        labels=NAMES_COUNTRIES,
        recipe=Recipe(epochs=12, optimizer="adam", lr=0.001, batch_size=256,
                      course="Adam lr=0.001, batch 256, 100 epochs"),
        bar={"accuracy": 0.80},
        preprocessing={
            "vocab_size": NAMES_VOCAB_SIZE, "padding_index": 0, "normalization": "NFKD-ascii",
            "note": "chars[i, t] = ord(name[t]) for t < lengths[i], 0 after; names are NFKD-normalized "
                    "and must then be ASCII (code points 1..127)",
        },
        model_kwargs={"vocab_size": NAMES_VOCAB_SIZE, "hidden_size": 100,
                      "num_classes": len(NAMES_COUNTRIES), "num_layers": 2},
    ),
)}


def resolve(names: list[str] | str) -> list[Entry]:
    """Map ``all`` or a list of names to catalogue entries, with a clear error for unknown names."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in CATALOG and n != "all"]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from: all, {', '.join(CATALOG)}")
    if "all" in names:  # beside names too: ``train all hello_rnn`` refused "all" while listing it as a choice
        return list(CATALOG.values())
    return [CATALOG[n] for n in dict.fromkeys(names)]  # a name given twice runs once
