"""How well the serving image preprocessing copes with realistic photos and scans of digits.

    python -m bench.robustness                                   # mnist_cnn, the first 1,000 MNIST test digits
    python -m bench.robustness --models mnist_cnn mnist_resnet --count 200 --json /tmp/robustness.json

MNIST's test digits are redrawn as the image files a client really uploads (an off-centre drawing, a noisy
grey scan, a paint app's palette PNG, a phone photo with uneven light or a dark desk around the sheet, a form's
printed box, ruled notebook paper, a thin pen, a phone camera's full-size photo), decoded by
``serving.preprocess.decode_digits`` as the server decodes them and read by each model's ONNX export on ONNX
Runtime's CPU provider. Per variant and model it
prints and writes (JSON) the share read right (an image the decoder refuses counts as wrong, and is counted as
refused too) and the decode time per image. ``plain`` is the control: MNIST's own PNG, which any loss of the
others is measured against. Every random choice comes from ``--seed``, so a run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw
from tqdm import tqdm

from bench import data, exports, harness, inprocess, machine, report
from bench.exports import Export
from coursezoo.args import at_least
from serving import preprocess
from serving.card import sha256_file
from serving.preprocess import decode_digits

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "robustness.json"
DEFAULT_MODELS = ("mnist_cnn",)
#: Images per ``decode_digits`` call and per ONNX Runtime run, as a large request reaches the server's decoders;
#: one call for all would hold every decoded image of a large ``--count`` at once
CHUNK = 256
#: The photo-like variants draw the digit this many times MNIST's 28 pixels (a 112-pixel digit)
UPSCALE = 4
#: ... near the centre of their canvas, shifted by up to this fraction of its side along each axis
MAX_OFFSET = 0.04

Variant = Callable[[np.ndarray, np.random.Generator], bytes]


# --- Drawing helpers: a digit's ink as floats 0..1 (1 = full ink), put on paper as grey levels --------------------


def _ink(digit: np.ndarray) -> np.ndarray:
    """MNIST's grey levels (light ink 255 on black 0) as ink coverage, float32 0..1."""
    return digit.astype(np.float32) / 255


def _upscaled(digit: np.ndarray, side: int = 28 * UPSCALE) -> np.ndarray:
    """The digit's ink ``side`` pixels square, by default ``UPSCALE`` times MNIST's (Lanczos, as a camera sees a
    smooth stroke), float32 0..1."""
    big = np.asarray(Image.fromarray(_ink(digit)).resize((side, side), Image.Resampling.LANCZOS))
    return np.clip(big, 0, 1)


def _on_canvas(ink: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """``ink`` in a ``side`` x ``side`` canvas of no ink, centred up to ``MAX_OFFSET`` of the side off: a photo
    is rarely framed exactly on the digit."""
    canvas = np.zeros((side, side), dtype=np.float32)
    h, w = ink.shape
    reach = int(side * MAX_OFFSET)
    top, left = ((side - n) // 2 + int(rng.integers(-reach, reach + 1)) for n in (h, w))
    canvas[top:top + h, left:left + w] = ink
    return canvas


def _on_paper(ink: np.ndarray, paper: float | np.ndarray, ink_level: float | np.ndarray) -> np.ndarray:
    """Dark ink on light paper, float grey levels: full ink is ``ink_level``, no ink the paper's own grey."""
    return paper - (paper - ink_level) * ink


def _noisy(grey: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian sensor noise of ``sigma`` grey levels added."""
    return grey + sigma * rng.standard_normal(grey.shape, dtype=np.float32)


def _ink_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """Top, left, bottom, right (exclusive) of the pixels with at least half ink: where a reader sees the digit."""
    rows, cols = np.flatnonzero((ink >= 0.5).any(axis=1)), np.flatnonzero((ink >= 0.5).any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _image(grey: np.ndarray) -> Image.Image:
    """Grey levels (any float or int array, [h, w] or [h, w, 3]) rounded and clipped to uint8, as an image."""
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))


def _encode(grey: np.ndarray, fmt: str, **options: Any) -> bytes:
    """``_image`` of the grey levels, as an image file."""
    buf = io.BytesIO()
    _image(grey).save(buf, format=fmt, **options)
    return buf.getvalue()


# --- The variants -----------------------------------------------------------------------------------------------------


def plain(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """MNIST's own 28x28 PNG, light on black (the control: what the models were trained on)."""
    return _encode(digit, "PNG")


def off_centre(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit drawn off-centre in a small black-on-white canvas: shifted 3-4 px, as a user's drawing lands."""
    ink = digit > 0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    direction = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx][rng.integers(8)]
    # As far as the digit stays whole (np.roll would wrap its edge round to the other side): less where it must.
    room = {(1, 0): 27 - rows[-1], (-1, 0): rows[0], (1, 1): 27 - cols[-1], (-1, 1): cols[0]}
    shift = min([int(rng.integers(3, 5))] + [int(room[(sign, axis)]) for axis, sign in enumerate(direction) if sign])
    moved = np.roll(digit, (direction[0] * shift, direction[1] * shift), axis=(0, 1))
    return _encode(255 - moved.astype(np.int16), "PNG")


def noisy_scan(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A flatbed scan: dark ink on grey recycled paper, sensor noise, saved as a JPEG of quality 75."""
    grey = _on_paper(_on_canvas(_upscaled(digit), 300, rng), paper=200.0, ink_level=30.0)
    return _encode(_noisy(grey, 10.0, rng), "JPEG", quality=75)


def keyed_palette(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A paint app's drawing: black strokes on white, saved as a 16-colour palette PNG with white transparent."""
    grey = _on_paper(_on_canvas(_upscaled(digit), 200, rng), paper=255.0, ink_level=0.0)
    image = _image(grey).convert("RGB").quantize(16)
    palette = np.asarray(image.getpalette()[:16 * 3]).reshape(16, 3)
    white = int(np.argmax(palette.sum(axis=1)))  # the paper's own colour: most of the image, so quantized exactly
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=white)
    return buf.getvalue()


def gradient(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo under uneven light: the paper falls from 235 to 90 across the frame (any direction), JPEG 85."""
    side = 300
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    along = np.cos(angle) * x + np.sin(angle) * y  # brightest at one side or corner, darkest at the opposite one
    along = (along - along.min()) / (along.max() - along.min())
    paper = 235 - (235 - 90) * along
    grey = _on_paper(_on_canvas(_upscaled(digit), side, rng), paper, 0.3 * paper)
    return _encode(_noisy(grey, 4.0, rng), "JPEG", quality=85)


def dark_border(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo of a sheet on a dark desk: light paper over the central ~75-85%, dark desk around, JPEG 85."""
    side = 300
    top, left, bottom, right = (int(side * rng.uniform(0.075, 0.125)) for _ in range(4))
    paper = np.full((side, side), 35.0, dtype=np.float32)
    paper[top:side - bottom, left:side - right] = 220.0
    grey = _on_paper(_on_canvas(_upscaled(digit), side, rng), paper, 30.0)
    return _encode(_noisy(grey, 4.0, rng), "JPEG", quality=85)


def tilted_sheet(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """The sheet on a dark desk photographed askew: turned 3-10 degrees either way, desk all round, JPEG 85."""
    side = 300
    margin = int(side * rng.uniform(0.08, 0.12))
    paper = np.full((side, side), 35.0, dtype=np.float32)
    paper[margin:side - margin, margin:side - margin] = 220.0
    sheet = _image(_on_paper(_on_canvas(_upscaled(digit), side, rng), paper, 30.0))
    turned = sheet.rotate(rng.uniform(3, 10) * rng.choice([-1, 1]), Image.Resampling.BILINEAR, fillcolor=35)
    return _encode(_noisy(np.asarray(turned, dtype=np.float32), 4.0, rng), "JPEG", quality=85)


def form_box(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A form's printed box around a handwritten digit: a ~3 px outline, 10-20% of the box's side from the ink."""
    side = 200
    ink = _on_canvas(_upscaled(digit), side, rng)
    top, left, bottom, right = _ink_box(ink)
    # A square box, as forms print them, with a margin of ``share`` of its side: box = extent / (1 - 2 share).
    box = max(bottom - top, right - left) / (1 - 2 * rng.uniform(0.10, 0.20))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    corners = [round(cx - box / 2), round(cy - box / 2), round(cx + box / 2), round(cy + box / 2)]
    image = Image.new("L", (side, side), 255)
    ImageDraw.Draw(image).rectangle(corners, outline=int(rng.integers(30, 91)), width=3)  # as dark as ink or lighter
    return _encode(_on_paper(ink, np.asarray(image, dtype=np.float32), 30.0), "PNG")


def ruled_line(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Ruled notebook paper: a grey or light blue line 2-3 px thick across the digit's middle half, RGB PNG."""
    side = 200
    ink = _on_canvas(_upscaled(digit), side, rng)
    top, _, bottom, _ = _ink_box(ink)
    height = bottom - top
    at = int(rng.integers(top + height // 4, bottom - height // 4))
    colour = [(150, 150, 150), (160, 200, 235)][rng.integers(2)]
    paper = np.full((side, side, 3), 255.0, dtype=np.float32)
    paper[at:at + int(rng.integers(2, 4))] = colour
    return _encode(_on_paper(ink[..., None], paper, np.array([25.0, 25.0, 45.0])), "PNG")  # blue-black pen ink


def thin_pen(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A fine pen or a 1-2 px brush: the digit's strokes thinned to their skeleton, black on white, 120x120 PNG."""
    strokes = _skeleton(_upscaled(digit) >= 0.5)
    if rng.integers(2):  # two pixels wide: the skeleton and its copy one pixel right and down
        strokes[1:, 1:] |= strokes[:-1, :-1]
    return _encode(_on_paper(_on_canvas(strokes.astype(np.float32), 120, rng), 255.0, 0.0), "PNG")


def phone_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone camera's photo, 1600x1200 JPEG 90: a ~400 px digit on paper lit from one side, sensor noise."""
    height, width, side = 1200, 1600, 400
    big = _upscaled(digit, side)
    ink = np.zeros((height, width), dtype=np.float32)
    top, left = (int((n - side) / 2 + rng.uniform(-MAX_OFFSET, MAX_OFFSET) * n) for n in (height, width))
    ink[top:top + side, left:left + side] = big
    light = np.linspace(235, 150, width, dtype=np.float32)[None, ::int(rng.choice([-1, 1]))]  # from either side
    return _encode(_noisy(_on_paper(ink, light, 0.3 * light), 4.0, rng), "JPEG", quality=90)


def _skeleton(ink: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary image (bool [h, w], border pixels off): strokes one pixel wide, connected
    as they were, where Pillow's MinFilter erosion would cut a digit's thinner strokes before its thick ones were
    thin. Each pass in whole-array numpy steps (a 112x112 digit: ~5 ms on a busy 2-core machine)."""
    ink = np.pad(ink, 1)
    while True:
        changed = False
        for step in (0, 1):
            p = ink.astype(np.uint8)
            # The 8 neighbours clockwise from the one above: P2, P3, ..., P9 in Zhang and Suen's numbering.
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(n)
            turns = sum((n[i] == 0) & (n[(i + 1) % 8] == 1) for i in range(8))
            if step == 0:
                side = (n[0] * n[2] * n[4] == 0) & (n[2] * n[4] * n[6] == 0)
            else:
                side = (n[0] * n[2] * n[6] == 0) & (n[0] * n[4] * n[6] == 0)
            remove = ink[1:-1, 1:-1] & (count >= 2) & (count <= 6) & (turns == 1) & side
            if remove.any():
                ink[1:-1, 1:-1] &= ~remove
                changed = True
        if not changed:
            return ink[1:-1, 1:-1]


#: name -> how it draws one MNIST digit (uint8 28x28, light on black) as an image file; ``plain`` first, the control
VARIANTS: dict[str, Variant] = {f.__name__: f for f in (plain, off_centre, noisy_scan, keyed_palette, gradient,
                                                        dark_border, tilted_sheet, form_box, ruled_line, thin_pen,
                                                        phone_photo)}


# --- The measurement ----------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """The command line; ``--data-root`` and ``--data-mirror`` as ``coursezoo bench`` and scripts/mnist_pngs.py
    take them, so one data layout serves every benchmark."""
    p = argparse.ArgumentParser(description="Measure how well the serving preprocessing reads MNIST test digits "
                                            "redrawn as realistic photos and scans; print a table and write JSON.")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                   help="digits models to read the images with (default: %(default)s)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                   help=f"image variants to measure, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--count", type=at_least(1, 10_000), default=1000, metavar="N",
                   help="the first N MNIST test digits (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    p.add_argument("--repo", type=Path, default=data.REPO_ROOT / "exported",
                   help="model repository with the exports (default: exported/ of this checkout)")
    data.add_place_options(p)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="results file (default: bench/results/robustness.json)")
    return p


def variant_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one variant's images: its own stream (from the seed and its name), so that measuring a
    subset of the variants, or adding one, leaves the others' images as they were."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def build(name: str, digits: np.ndarray, seed: int) -> list[bytes]:
    """Every digit drawn as ``name``'s image file, in order."""
    rng, draw = variant_rng(seed, name), VARIANTS[name]
    return [draw(digit, rng) for digit in digits]


def read(export: Export, files: list[bytes], labels: list[str], session: ort.InferenceSession,
         bar: tqdm) -> dict[str, float | int]:
    """Decode ``files`` as the server does, in chunks of ``CHUNK``, and read them with ``session``: how many the
    model read right (as ``labels`` name them), how many the decoder refused, and the decode time alone."""
    prep, card = export.card.preprocessing, export.card
    right = refused = 0
    decoding = 0.0
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        t0 = time.perf_counter()
        digits, errors = decode_digits(chunk, prep)
        decoding += time.perf_counter() - t0
        refused += len(errors)
        kept = [labels[start + i] for i in range(len(chunk)) if i not in errors]
        if kept:
            logits = session.run([card.outputs[0].name], {card.inputs[0].name: digits})[0]
            right += sum(card.labels[k] == want for k, want in zip(logits.argmax(axis=1), kept, strict=True))
        bar.update(len(chunk))
    return {"accuracy": round(right / len(files), 4), "read_right": right, "refused": refused,
            "decode_us_per_image": round(decoding / len(files) * 1e6, 1)}


def render(results: dict[str, dict[str, dict[str, Any]]], n: int) -> str:
    """The printed table: a row per variant and model."""
    lines = [f"{'variant':<14} {'model':<16} {'accuracy':>8} {'refused':>8} {'decode µs/image':>16}"]
    for model, variants in results.items():
        for name, row in variants.items():
            lines.append(f"{name:<14} {model:<16} {row['accuracy']:>8.1%} {row['refused']:>8} "
                         f"{row['decode_us_per_image']:>16.1f}")
    lines.append(f"({n} MNIST test digits per row; a refused image counts as read wrong)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Measure every variant with every model; 1 (and why, on stderr) when a model, the data or the results
    file is missing or unusable, checked before the images are drawn so no measurement is lost at the end."""
    started = datetime.now(UTC)
    # What is measured is the preprocessing: its file's hash ties the numbers to the version that was imported.
    measured = sha256_file(Path(preprocess.__file__))
    data.choose_places(args.data_root, args.data_mirror)
    selected: list[Export] = []
    for name in args.models:
        export = exports.latest(args.repo, name)
        if export is None or export.task != "digits":
            why = "not exported" if export is None else f"a {export.task} model, not a digits one"
            print(f"robustness: {name} in {args.repo}: {why}", file=sys.stderr)
            return 1
        selected.append(export)
    if why := harness.unwritable(args.json):
        print(f"robustness: {why}", file=sys.stderr)
        return 1
    try:
        digits = data.mnist_test_images()[:args.count]
        labels = [str(label) for label in data.mnist_test_labels()[:args.count]]
    except FileNotFoundError as e:
        print(f"robustness: {e}", file=sys.stderr)
        return 1
    sessions = {e.name: inprocess.ort_session(e, "CPUExecutionProvider") for e in selected}
    at_start = machine.snapshot()
    results: dict[str, dict[str, dict[str, Any]]] = {e.name: {} for e in selected}
    total = len(args.variants) * len(digits) * (1 + len(selected))  # each image drawn, then read by each model
    with tqdm(total=total, unit="image", delay=2.0, disable=None, dynamic_ncols=True) as bar:
        for name in args.variants:
            files = build(name, digits, args.seed)
            bar.update(len(files))
            for export in selected:
                results[export.name][name] = read(export, files, labels, sessions[export.name], bar)
    result = {
        **machine.run_record(started, at_start),
        "n": len(digits),
        "seed": args.seed,
        "settings": {"models": [f"{e.name}/{e.version}" for e in selected], "repo": str(args.repo),
                     "chunk": CHUNK, "ort_provider": "CPUExecutionProvider", "preprocess_sha256": measured},
        "variants": {name: (VARIANTS[name].__doc__ or "").strip() for name in args.variants},
        "results": results,
    }
    print(render(results, len(digits)))
    report.write_json(args.json, result)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
