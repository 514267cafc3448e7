"""The closing report of a run: counts, failures by reason, throughput and the class histogram."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from serving.batch.types import Failure, Item, Prediction

#: classes listed in the histogram; the hello models' output strings can be many
MAX_CLASSES = 20


@dataclass
class Tally:
    """What outcomes add to the summary, counted where their rows are made (``output.RowFormat``: a worker
    process, for digits on the CPU) and merged into the run's ``Summary``, so no outcome crosses back one by one."""

    failures: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    labelled: int = 0  # items whose input gave a truth label (a CSV's label column)
    correct: int = 0

    def add(self, item: Item, outcome: Prediction | Failure) -> None:
        if isinstance(outcome, Failure):
            self.failures[outcome.reason] += 1
            return
        self.classes[outcome.label] += 1
        if item.label is not None:
            self.labelled += 1
            self.correct += item.label == outcome.label

    def merge(self, other: Tally) -> None:
        self.failures.update(other.failures)
        self.classes.update(other.classes)
        self.labelled += other.labelled
        self.correct += other.correct

    @property
    def classified(self) -> int:
        return sum(self.classes.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


@dataclass
class Summary:
    """The run's ``Tally`` (and what ``--resume`` found already done), with what the closing report says of it."""

    out: str
    engine: str
    labels: tuple[str, ...] = ()  # the model's classes, to list the histogram in their order
    resumed: int = 0  # rows the output held already (--resume): rows, so the first line counts the whole file
    resumed_failed: int = 0
    tally: Tally = field(default_factory=Tally)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def failed(self) -> int:
        return self.tally.failed

    @property
    def processed(self) -> int:
        return self.tally.classified + self.tally.failed

    def finish(self) -> None:
        self.finished = time.perf_counter()

    def render(self) -> str:
        seconds = (self.finished or time.perf_counter()) - self.started
        lines = [f"{self.processed + self.resumed} inputs -> {self.out}   [{self.engine}]"]
        if self.resumed:
            lines.append(f"  resumed       {self.resumed} already in the output ({self.resumed_failed} failed)")
        tally = self.tally
        lines.append(f"  classified    {tally.classified}")
        lines.append(f"  failed        {tally.failed}")
        width = max(map(len, tally.failures), default=0)
        lines += [f"    {reason:<{width}}  {n}" for reason, n in tally.failures.most_common()]
        rate = self.processed / seconds if seconds > 0 else 0.0
        lines.append(f"  throughput    {rate:,.1f} items/s ({self.processed} in {seconds:.2f} s)")
        if tally.classes:
            # the model's label order, then any other answer (a hello model's strings, a new version's labels)
            order = ([c for c in self.labels if c in tally.classes]
                     + [c for c, _ in tally.classes.most_common() if c not in self.labels])
            shown = order[:MAX_CLASSES]
            more = f"  (+{len(order) - len(shown)} more)" if len(order) > len(shown) else ""
            lines.append("  classes       " + "  ".join(f"{c}: {tally.classes[c]}" for c in shown) + more)
        if tally.labelled:
            lines.append(f"  accuracy      {tally.correct / tally.labelled:.4f} ({tally.correct}/{tally.labelled} rows "
                         "with a label column)")
        return "\n".join(lines)
