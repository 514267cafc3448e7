#!/usr/bin/env python
"""Write MNIST test digits as PNG files, to try the server and the batch CLI on (the README's examples).

    python scripts/mnist_pngs.py samples              # samples/digit_00.png (a 7), digit_01.png (a 2), ... 20 in all
    python scripts/mnist_pngs.py samples --count 1000

The digits are the first of the held-out test split, read from the data root or the mirror as the benchmark
reads them (``--data-root``/``COURSEZOO_DATA_ROOT``, ``--data-mirror``/``COURSEZOO_DATA_MIRROR``); their labels
are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import data
from coursezoo.args import at_least


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where the PNG files go (made if missing)")
    p.add_argument("--count", type=at_least(1), default=20, help="how many digits, at most 10,000 (default: 20)")
    data.add_place_options(p)
    args = p.parse_args(argv)
    data.choose_places(args.data_root, args.data_mirror)
    count = min(args.count, 10_000)
    try:
        pngs, digits = data.pngs(count), data.mnist_test_labels()[:count].tolist()
    except FileNotFoundError as e:
        print(f"mnist_pngs: {e}", file=sys.stderr)
        return 1
    args.folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(pngs):
        (args.folder / f"digit_{i:0{max(2, len(str(count - 1)))}d}.png").write_bytes(png)
    print(f"wrote {count} PNG files to {args.folder}; their digits: {' '.join(map(str, digits))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
