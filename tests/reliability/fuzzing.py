"""The hypothesis CI profile, the tally of fuzz cases and the input strategies shared by the fuzz suites.

``test_fuzz_inputs.py`` feeds the strategies to the preprocessing and validators in-process;
``test_fuzz_wire.py`` sends the same kinds of input to a real server.

CI is repeatable: the same examples every run (derandomize), no example database, no per-example deadline
(2 shared cores make timings meaningless). ``COURSEZOO_FUZZ_SCALE=10`` runs ten times the cases locally.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as kserve

from serving.card import ModelCard
from serving.services.codecs import DTYPES

settings.register_profile("coursezoo-ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
FUZZ_SCALE = float(os.environ.get("COURSEZOO_FUZZ_SCALE", "1"))

#: test name -> examples run; printed by the conftest at the end of the session.
FUZZ_CASES: Counter[str] = Counter()


def fuzz(max_examples: int) -> settings:
    """The CI profile with ``max_examples`` (times COURSEZOO_FUZZ_SCALE)."""
    return settings(settings.get_profile("coursezoo-ci"), max_examples=max(1, int(max_examples * FUZZ_SCALE)))


FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
MODES = ("L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK")


def encode(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
    """Save grey levels in ``mode`` as ``fmt``, as RGB where the format cannot hold the mode."""
    img = Image.fromarray(pixels, "L").convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, fmt)
    return buf.getvalue()


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    """A valid image file of random size, content, mode and format, then maybe damaged."""
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(("noise", "stroke", "flat", "lit", "shapes")))
    pixels = {"noise": lambda: rng.integers(0, 256, (h, w), dtype=np.uint8),
              "flat": lambda: np.full((h, w), rng.integers(0, 256), dtype=np.uint8),
              "stroke": lambda: np.where(rng.random((h, w)) < 0.2, 255, 0).astype(np.uint8),
              "lit": lambda: lit(h, w, rng), "shapes": lambda: shapes(h, w, rng)}[style]()
    data = encode(pixels, draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS)))
    mutation = draw(st.sampled_from(("none", "truncate", "flip", "magic", "append", "splice")))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif mutation == "magic":
        data = draw(st.binary(min_size=1, max_size=8)) + data[8:]
    elif mutation == "append":
        data += draw(st.binary(max_size=64))
    elif mutation == "splice":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(max_size=32)) + data[i:]
    return data


def lit(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Strokes on a ground lit unevenly (a ramp and a bulge, any direction and strength): the lighting fit's input."""
    ys, xs = np.linspace(-1, 1, h)[:, None], np.linspace(-1, 1, w)[None, :]
    a, b, c, d = rng.uniform(-255, 255, 4)
    ground = rng.uniform(0, 255) + a * ys + b * xs + c * ys * ys + d * xs * ys
    return np.clip(np.where(rng.random((h, w)) < 0.1, 255 - ground, ground), 0, 255).astype(np.uint8)


def shapes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Filled and outlined rectangles and whole rows and columns in random greys: sheets, boxes and ruled lines
    for the steps that look for them, and the shapes that almost pass for them."""
    pixels = np.full((h, w), rng.integers(0, 256), dtype=np.uint8)
    for _ in range(rng.integers(1, 6)):
        top, left = rng.integers(0, h), rng.integers(0, w)
        bottom, right = rng.integers(top + 1, h + 1), rng.integers(left + 1, w + 1)
        grey, kind = rng.integers(0, 256), rng.integers(0, 4)
        if kind == 0:
            pixels[top:bottom, left:right] = grey
        elif kind == 1:
            pixels[top:bottom, [left, right - 1]] = grey
            pixels[[top, bottom - 1], left:right] = grey
        elif kind == 2:  # whole rows, 1-3 thick
            pixels[top:top + rng.integers(1, 4)] = grey
        else:  # whole columns
            pixels[:, left:left + rng.integers(1, 4)] = grey
    return pixels


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: the shape of a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 data bytes, what the CRC covers
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def strip(width: int, height: int) -> bytes:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[height // 2:, width // 2:] = 255
    return encode(pixels, "L", "PNG")


texts = st.lists(st.one_of(st.text(max_size=40), st.text(alphabet="helo", max_size=12),
                           st.builds(str.__mul__, st.characters(codec="ascii"), st.integers(250, 300))), max_size=6)


floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(min_value=-1e300, max_value=1e300)
SPECIAL = (float("nan"), float("inf"), -float("inf"), 1e300)


@st.composite
def infer_requests(draw: st.DrawFn, cards: list[ModelCard]) -> tuple[str, kserve.ModelInferRequest]:
    """Requests near the card (its names, datatypes, shapes) and far from it, typed or raw, NaN and huge dims."""
    card = draw(st.sampled_from(cards))
    request = kserve.ModelInferRequest(model_name=card.name)
    raw = draw(st.booleans())
    rows = draw(st.sampled_from((1, 2, 3, 0)))
    for spec in card.inputs + tuple(draw(st.lists(st.sampled_from(card.inputs), max_size=1))):
        name = draw(st.sampled_from((spec.name, spec.name, "x", "")))
        datatype = draw(st.sampled_from((spec.datatype, spec.datatype, "FP32", "INT64", "UINT8", "FP64", "BYTES",
                                         "BOOL", "")))
        # free axes: a usual length, none, or one over the sequence limit
        shape = [rows, *(draw(st.integers(1, 8) | st.sampled_from((0, 257))) if d < 0 else d for d in spec.shape[1:])]
        shape = draw(st.sampled_from((shape, shape, shape[1:], [*shape, 1], [2**31, 2**31, 2**31, 2**31],
                                      [0, 2**40], [0, 2**62, 2**62], [1] * 70)))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        count = int(np.prod(shape)) if len(shape) < 10 and max(shape, default=0) < 2**20 else 3
        count += draw(st.sampled_from((0, 0, 0, 1, -1))) if count else 0
        # Values come from numpy, seeded by hypothesis: drawing thousands of floats one by one is slow.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dtype = DTYPES.get(datatype, np.dtype("<f4"))
        if dtype.kind == "f":
            array = rng.normal(0, draw(st.sampled_from((1.0, 1e30))), count)
            array[rng.random(count) < draw(st.sampled_from((0.0, 0.01)))] = draw(st.sampled_from(SPECIAL))
        else:
            array = rng.integers(draw(st.sampled_from((0, -3, -2**31))), draw(st.sampled_from((4, 128, 2**31))),
                                 count)
        if raw:
            with np.errstate(over="ignore", invalid="ignore"):  # 1e30 -> inf in FP32: a value worth sending
                request.raw_input_contents.append(array.astype(dtype).tobytes())
        elif datatype in ("FP32", "FP64"):
            getattr(tensor.contents, f"{datatype.lower()}_contents").extend(array.tolist())
        elif datatype in ("INT64", "INT32"):
            getattr(tensor.contents, "int64_contents" if datatype == "INT64" else "int_contents").extend(
                np.clip(array, -2**31, 2**31 - 1).tolist())
        elif datatype == "UINT8":
            tensor.contents.uint_contents.extend(np.abs(array).tolist())
    return card.name, request
