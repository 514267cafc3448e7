"""The closing report of a run: counts, failures by reason, throughput and the class histogram."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from serving.batch.types import Failure, Item, Prediction

#: classes listed in the histogram; the hello models' output strings can be many
MAX_CLASSES = 20


@dataclass
class Summary:
    """Accumulates the outcome of every item of this run (and what ``--resume`` found already done)."""

    out: str
    engine: str
    labels: tuple[str, ...] = ()  # the model's classes, to list the histogram in their order
    resumed: int = 0  # rows the output held already (--resume): rows, so the first line counts the whole file
    resumed_failed: int = 0
    classified: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    labelled: int = 0
    correct: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def add(self, item: Item, outcome: Prediction | Failure) -> None:
        if isinstance(outcome, Failure):
            self.failures[outcome.reason] += 1
            return
        self.classified += 1
        self.classes[outcome.label] += 1
        if item.label is not None:
            self.labelled += 1
            self.correct += item.label == outcome.label

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def processed(self) -> int:
        return self.classified + self.failed

    def finish(self) -> None:
        self.finished = time.perf_counter()

    def render(self) -> str:
        seconds = (self.finished or time.perf_counter()) - self.started
        lines = [f"{self.processed + self.resumed} inputs -> {self.out}   [{self.engine}]"]
        if self.resumed:
            lines.append(f"  resumed       {self.resumed} already in the output ({self.resumed_failed} failed)")
        lines.append(f"  classified    {self.classified}")
        lines.append(f"  failed        {self.failed}")
        width = max(map(len, self.failures), default=0)
        lines += [f"    {reason:<{width}}  {n}" for reason, n in self.failures.most_common()]
        rate = self.processed / seconds if seconds > 0 else 0.0
        lines.append(f"  throughput    {rate:,.1f} items/s ({self.processed} in {seconds:.2f} s)")
        if self.classes:
            # the model's label order, then any other answer (a hello model's strings, a new version's labels)
            order = ([c for c in self.labels if c in self.classes]
                     + [c for c, _ in self.classes.most_common() if c not in self.labels])
            shown = order[:MAX_CLASSES]
            more = f"  (+{len(order) - len(shown)} more)" if len(order) > len(shown) else ""
            lines.append("  classes       " + "  ".join(f"{c}: {self.classes[c]}" for c in shown) + more)
        if self.labelled:
            lines.append(f"  accuracy      {self.correct / self.labelled:.4f} ({self.correct}/{self.labelled} rows "
                         "with a label column)")
        return "\n".join(lines)
