"""Inputs -> model tensors, the one place each preprocessing rule lives.

Shared by the server, the batch CLI, training (the text encoders) and the tests, so a request is
prepared exactly as the training data was. Every function raises ``InputError`` with a message that
says what was wrong and what is expected; callers map it to ``INVALID_ARGUMENT`` or an error row.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyspng
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from serving.card import ModelCard

log = logging.getLogger("coursezoo.preprocess")


class InputError(ValueError):
    """The input cannot be turned into a tensor; the message is safe to show to the client."""


class InputTooLarge(InputError):
    """The input exceeds a configured size limit (maps to RESOURCE_EXHAUSTED)."""


# --- Text: names (lecture 13) and hello (lecture 12) -----------------------------------------------

MAX_TEXT_LENGTH = 256
#: Error messages quote at most this much of a client's text: a status message travels in a header.
QUOTE_LENGTH = 40


def quote(text: str) -> str:
    """``text`` for an error message: a status message travels in a header, so a long one is cut."""
    return repr(text) if len(text) <= QUOTE_LENGTH else f"{text[:QUOTE_LENGTH]!r}... ({len(text)} characters)"


def _ascii_name(text: str, vocab_size: int) -> str:
    """A name as the course data spells it: NFKD, accents (combining marks) dropped, then printable ASCII.

    Anything else is refused, not dropped: "Ivanov Иванов" would otherwise be read as "Ivanov " and "Straße"
    as "Strae", and a control character ("Rossi\\r\\n") was never in the training data; each changed the answer.
    """
    if len(text) > MAX_TEXT_LENGTH * 4:  # NFKD at most quadruples; a megabyte of text is refused before it
        raise InputError(f"name of {len(text)} characters: at most {MAX_TEXT_LENGTH} are accepted")
    allowed = _printable_ascii(vocab_size)
    if text.isascii() and allowed.issuperset(text):  # most names: spelled as the data spells them already
        name, bad = text, ""
    else:
        name = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")
        bad = "".join(dict.fromkeys(c for c in name if c not in allowed))  # as they appear: "\r\n", not "\n\r"
    if not name.strip():
        raise InputError(f"empty name {quote(text)}: expected a non-empty name in Latin letters")
    if len(name) > MAX_TEXT_LENGTH:
        raise InputError(f"name of {len(name)} characters: at most {MAX_TEXT_LENGTH} are accepted")
    if bad:
        raise InputError(f"name {quote(text)} has {quote(bad)}, which the model cannot read: expected printable "
                         "ASCII once accents are dropped (\"Müller\" is read as \"Muller\")")
    return name


@functools.cache
def _printable_ascii(vocab_size: int) -> frozenset[str]:
    """The characters a name may hold: printable ASCII within the model's character codes."""
    return frozenset(map(chr, range(32, min(vocab_size, 127))))


def _each(kind: str, texts: Sequence[str], encode: Callable[[str], Any]) -> list[Any]:
    """``encode`` each text; an error names the text's index when there are several, so that a client can find
    the one in a thousand that failed."""
    if len(texts) == 1:
        return [encode(texts[0])]
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(encode(text))
        except InputError as e:
            raise InputError(f"{kind} {i}: {e}") from None
    return out


def encode_names(texts: Sequence[str], vocab_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Names -> (chars int64 [N, T] of code points, 0-padded; lengths int64 [N]).

    Names are NFKD-normalized and accents dropped ("Müller" -> "Muller"), as the course data is ASCII.
    """
    if not texts:
        raise InputError("no names given: expected at least one")
    names = _each("name", texts, lambda t: _ascii_name(t, vocab_size))
    lengths = np.array([len(n) for n in names], dtype=np.int64)
    chars = np.zeros((len(names), int(lengths.max())), dtype=np.int64)
    for i, n in enumerate(names):
        chars[i, : len(n)] = np.frombuffer(n.encode("ascii"), dtype=np.uint8)
    return chars, lengths


def encode_hello(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Texts over the vocabulary -> int64 [N, T] indices, right-padded with index 0.

    The hello models are causal (output t depends on inputs <= t), so padding at the end leaves each
    text's own outputs unchanged; ``decode_hello`` cuts them back to each text's length.
    """
    if not texts:
        raise InputError("no texts given: expected at least one")
    index = {c: i for i, c in enumerate(vocabulary)}
    allowed = "".join(vocabulary)

    def indices(t: str) -> list[int]:
        if not t:
            raise InputError(f"empty text: expected a word over the letters {allowed!r}")
        if len(t) > MAX_TEXT_LENGTH:
            raise InputError(f"text of {len(t)} characters: at most {MAX_TEXT_LENGTH} are accepted")
        bad = sorted({c for c in t if c not in index})
        if bad:
            raise InputError(f"text {quote(t)} has letters {quote(''.join(bad))}: expected only {allowed!r}")
        return [index[c] for c in t]

    rows = _each("text", texts, indices)
    out = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def decode_hello(logits: np.ndarray, texts: Sequence[str], vocabulary: Sequence[str]) -> list[str]:
    """Per-step argmax back to characters, each cut to its input's length."""
    idx = logits.argmax(axis=-1)
    return ["".join(vocabulary[j] for j in idx[i, : len(t)]) for i, t in enumerate(texts)]


# --- Records: diabetes (lectures 7-8) --------------------------------------------------------------

def encode_features(records: Sequence[Sequence[float]], num_features: int,
                    feature_range: Sequence[float] | None = None) -> np.ndarray:
    """Feature rows -> float32 [N, num_features]; wrong counts, NaN, infinities and (given the card's
    ``feature_range``) values far outside the scaled range are refused."""
    if not records:
        raise InputError("no records given: expected at least one")
    for i, r in enumerate(records):
        if len(r) != num_features:
            raise InputError(f"record {i} has {len(r)} features: expected {num_features}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
        x = np.asarray(records, dtype=np.float32).reshape(len(records), num_features)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"record {int(bad[0])} has NaN or infinite values (or beyond float32's range): expected "
                         "finite numbers, |x| < 3.4e38")
    if feature_range is not None:
        check_feature_range(x, feature_range, "record")
    return x


#: How far beyond the card's ``feature_range`` a feature may lie, in widths of that range. The course's diabetes
#: CSV is min-max scaled over its own rows, so a new patient may lie a little outside it; an unscaled record (a
#: glucose of 148 where the CSV has 0.49) lies far outside and would be answered with a confident nonsense.
RANGE_SLACK = 0.5


def check_feature_range(x: np.ndarray, feature_range: Sequence[float], row: str) -> None:
    lo, hi = feature_range
    slack = (hi - lo) * RANGE_SLACK
    outside = (x < lo - slack) | (x > hi + slack)
    if outside.any():
        i, j = (int(k) for k in np.argwhere(outside)[0])
        raise InputError(f"{row} {i} feature {j} is {float(x[i, j]):g}: expected features scaled as in the course "
                         f"CSV, {lo:g}..{hi:g} (accepted: {lo - slack:g}..{hi + slack:g})")


# --- Images: digits (lectures 9-11) ----------------------------------------------------------------

#: The formats the service promises; restricting Image.open to them keeps Pillow's rarer decoders (and
#: their attack surface) away from client bytes. (Phone MPO files open through the JPEG plugin.)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
_FORMATS_TEXT = "a PNG, JPEG, BMP, GIF, TIFF or WebP file"

#: Default pixel limit: a 24-megapixel phone photo fits, a decompression bomb does not (an RGB decode of
#: the limit needs ~72 MB; a server decodes many images at once).
DEFAULT_MAX_IMAGE_PIXELS = 24_000_000

#: From this many images of the model's size in one batch, their polarity (and whether they are placed already) is
#: decided in whole-batch numpy calls.
STACK_MIN_IMAGES = 16
#: An image of the model's size is taken as already placed, as MNIST's own are, only while its centre of mass lies
#: within this many pixels of the canvas's centre (MNIST's test set: all within 0.5) ...
PLACED_CENTRE_SLACK = 1.5
#: ... and its ink box is at most this many pixels larger than ``fit_box`` (MNIST's test set: at most ``fit_box``).
#: Any other such image is placed as other sizes are: a digit drawn off-centre on a 28x28 canvas was read as it
#: lay (a shift of up to 4 pixels: 66.7% of 1,000 MNIST test digits read right by mnist_cnn, 98.8% placed).
PLACED_BOX_SLACK = 2
#: Below this spread of grey levels (of 255) an image has no digit to find.
MIN_CONTRAST = 32
#: Pixels brighter than background + this fraction of the ink's range count for the ink's bounding box.
#: Higher than 0 so that JPEG ringing and paper noise do not stretch the box (measured on MNIST saved as
#: JPEG quality 75: the box then lands within a pixel of the lossless one for 99% of the digits).
INK_THRESHOLD = 0.125
#: A pixel counts for the ink box only where a copy box-blurred over this fraction of the image's larger side
#: is above the threshold too: noisy paper otherwise reaches it here and there and stretches the box to the
#: image's edges (grey scanner paper, noise sigma 10, JPEG: 93.5% of 1,000 MNIST test digits read right by
#: mnist_cnn, 98.7% with the blurred copy).
SMOOTH_RADIUS = 0.01
#: An image longer than this on a side is reduced by an integer factor to at most this before anything else (a JPEG
#: decoded at a reduced size by libjpeg itself): a phone photo's 12 MP took ~200 ms to place, most of it on pixels
#: that the fit into ``fit_box`` averages away (a digit ~600 px tall in the photo is still ~150 px when reduced).
PHOTO_SIDE = 1024
#: A digit whose strongest pixel is under this fraction of 255 once fitted into ``fit_box`` has its grey levels
#: stretched back to 255: a pen's 1-2 px strokes in a 100 px digit fade to a fifth of their level when a fifth of
#: a pixel wide (a thin pen: 92.5% of 1,000 MNIST test digits read right by mnist_cnn, 96.0% stretched).
FAINT = 0.75
#: An image whose paper (its border, fitted by a quadratic surface) varies by at least this many grey levels is
#: evened out before anything else looks at it: a phone photo lit from one side has paper at 90 on one side and
#: 235 on the other, so its dark side passed for ink (a gradient from 235 to 90, ink at 30% of the paper: 11.6%
#: of 1,000 MNIST test digits read right by mnist_cnn, 99.3% evened; ``python -m bench.robustness`` measures these
#: figures). Scans and drawings vary by a few levels: they decode exactly as before.
UNEVEN_LIGHT = 24
#: A sheet of paper photographed on a darker desk is cropped to: rows and columns more than half light are the
#: sheet when they make one run this long (a fraction of the image's side) and leave a dark strip at an edge;
#: then this much more (of the larger side) is cut off where the desk was, for the sheet's own edge and shadow.
#: The desk was taken for the background and the sheet for ink (a sheet over 75-85% of the photo: 8.6% of 1,000
#: MNIST test digits read right by mnist_cnn, 99.0% cropped).
MIN_SHEET = 0.5
SHEET_EDGE = 0.02
#: A row (or column) of ink across this much of the image is a ruled line, and one across half of it a form's
#: box when four such lines close a rectangle around the rest (with ink in it): a line is painted over with the
#: darker of the rows beside it, so strokes that cross it stay; a box is cropped to what is inside it. Either
#: stretched the ink box (a notebook's line through the digit: 45.2% of 1,000 MNIST test digits read right by
#: mnist_cnn, a form's box around it: 88.0%; 99.1% and 99.0% now). ``_ruled_lines`` and ``_box_inside`` say what
#: keeps a digit's own straight strokes from being taken for them.
RULED_LINE = 0.9
LINE_CLEARANCE = 0.05
BOX_LINE = 0.5
BOX_SIDE = 0.95
#: A ruled line or a box's side is at most this wide, as a fraction of the image's (or the box's) side: a digit
#: cropped tight has strokes across all of it (a 1, a 4's stem, a 7's bar), but much wider ones.
LINE_WIDTH = 0.05


def set_max_image_pixels(limit: int) -> None:
    """Set the largest image (width * height) that ``decode_digit`` decodes; larger ones raise InputTooLarge.

    The limit is Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``), so it holds for the
    whole process and is checked from the file header, before any pixel is decoded.
    """
    if limit < 1:
        raise ValueError(f"pixel limit {limit}: expected a positive number of pixels")
    Image.MAX_IMAGE_PIXELS = limit


set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
# Pillow only warns between the limit and twice the limit; ``_check_pixels`` refuses those images right
# after the header is read, with the image's size in the message, so the warning is only noise. Ignoring
# it (rather than turning it into an error) keeps the message the same in every process, whatever its
# warning filters (pytest's, Ray workers').
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_digit(data: bytes, prep: Mapping[str, Any]) -> np.ndarray:
    """An image file -> float32 [1, height, width], placed and normalized as MNIST was.

    Any size, colour mode and polarity: the image is made grayscale and light-on-dark; an image of the
    model's own size whose ink is centred and no bigger than MNIST's is taken as already placed (so a plain
    MNIST image comes out exactly as training normalized it); any other image gets MNIST's placement (ink
    bounding box, fit into ``fit_box`` keeping the aspect ratio, centre of mass at the centre).
    """
    digits, errors = decode_digits([data], prep)
    if errors:
        raise errors[0]
    return digits[0]


def decode_digits(images: Sequence[bytes], prep: Mapping[str, Any]) -> tuple[np.ndarray, dict[int, InputError]]:
    """Image files -> float32 [k, 1, height, width] for the k that decode (in input order), and the error
    of each one that does not, by its position in ``images``.

    ``decode_digit`` for many images at once, with bit-identical results; the normalization runs once over
    the whole batch, and so does the polarity step when ``STACK_MIN_IMAGES`` or more images are of the
    model's size (per image, numpy's call overhead is most of the cost of those steps on a 28x28 image).
    """
    height, width, fit_box = int(prep["height"]), int(prep["width"]), int(prep["fit_box"])
    digits = np.empty((len(images), 1, height, width), dtype=np.float32)
    errors: dict[int, InputError] = {}
    own_size: dict[int, np.ndarray] = {}  # of the model's own size: taken as placed when they look it, as MNIST's do
    for i, data in enumerate(images):
        try:
            gray = _decode_gray(data)
            if gray.shape == (height, width):
                own_size[i] = gray
            else:
                digits[i, 0] = _place_photo(gray, height, width, fit_box)
        except InputError as e:
            errors[i] = e
    if len(own_size) >= STACK_MIN_IMAGES:
        light, background, peak, refused = _light_on_dark_stack(_stack(list(own_size.values())))
        index = list(own_size)
        if len(index) == len(images):  # all of the model's size (as on the hot path): a view, no copy
            digits[:, 0] = light
            grey = digits[:, 0]
        else:
            grey = light.astype(np.float32)
            digits[index, 0] = grey
        errors |= {index[j]: e for j, e in refused.items()}
        for j in np.flatnonzero(_unplaced(grey, background, peak, fit_box)):
            if j not in refused:
                digits[index[j], 0] = _place(light[j], float(background[j]), height, width, fit_box)
    else:
        for i, gray in own_size.items():
            try:
                light, background = _light_on_dark(gray)
                if _unplaced_one(light, background, fit_box):
                    digits[i, 0] = _place(light, background, height, width, fit_box)
                else:
                    digits[i, 0] = light
            except InputError as e:
                errors[i] = e
    if errors:
        digits = digits[[i for i in range(len(images)) if i not in errors]]
    return _normalize(digits, prep), errors


def _stack(grays: list[np.ndarray]) -> np.ndarray:
    """np.stack of same-size uint8 images (read-only), by joining their bytes: ~8 µs for 256 MNIST digits
    where np.stack's per-array checks take ~75 (which pays for the placement check, ``_unplaced``)."""
    try:
        joined = b"".join(grays)
    except (BufferError, TypeError):  # an array that is not one contiguous block
        return np.stack(grays)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(grays), *grays[0].shape)


def pixels_to_digit(pixels: bytes, prep: Mapping[str, Any]) -> np.ndarray:
    """Raw uint8 pixels, white digit on black and already MNIST-placed -> float32 [1, height, width]."""
    height, width = int(prep["height"]), int(prep["width"])
    if len(pixels) != height * width:
        raise InputError(_wrong_pixel_count(len(pixels), height, width))
    return _normalize(np.frombuffer(pixels, dtype=np.uint8).reshape(1, height, width).astype(np.float32), prep)


def pixels_to_digits(images: Sequence[bytes], prep: Mapping[str, Any]) -> np.ndarray:
    """``pixels_to_digit`` for many images at once -> float32 [n, 1, height, width], bit-identical; one
    conversion and normalization for the whole batch instead of numpy's per-call overhead per image.
    A wrong size raises InputError naming the image's position."""
    height, width = int(prep["height"]), int(prep["width"])
    for i, pixels in enumerate(images):
        if len(pixels) != height * width:
            raise InputError(f"image {i}: {_wrong_pixel_count(len(pixels), height, width)}")
    x = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(len(images), 1, height, width).astype(np.float32)
    return _normalize(x, prep)


def _wrong_pixel_count(n: int, height: int, width: int) -> str:
    return f"{n} bytes of pixels: expected {height * width} ({height}x{width} uint8, white digit on black)"


def _normalize(x: np.ndarray, prep: Mapping[str, Any]) -> np.ndarray:
    """In place, float32 grey levels 0..255 -> (x / 255 - mean) / std: the arithmetic of training's
    ToTensor + Normalize, step by step in float32, so equal pixels give bit-identical tensors."""
    x /= np.float32(255)
    x -= np.float32(prep["mean"])
    x /= np.float32(prep["std"])
    return x


def _decode_gray(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 [h, w] grey levels, with errors a client can act on."""
    if not data:
        raise InputError(f"empty image: expected the bytes of {_FORMATS_TEXT}")
    gray = _plain_gray_png(data)
    if gray is not None:
        return _shrunk(gray)
    what = f"{len(data)} bytes"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            what = f"a {img.format} of {img.width}x{img.height}, {len(data)} bytes"
            _check_pixels(img)
            if img.format == "JPEG" and (k := _shrink_factor(img.size)) > 1:
                img.draft("L", (img.width // k, img.height // k))  # libjpeg decodes at 1/2, 1/4 or 1/8 the size
            if "exif" in img.info or img.format == "TIFF":  # phone photos: upright as the user saw them
                ImageOps.exif_transpose(img, in_place=True)
            return _shrunk(_to_gray(img))
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        # Over twice the limit Pillow refuses at open, with talk of a "decompression bomb DOS attack" to a
        # client that may just have a big photo.
        limit = Image.MAX_IMAGE_PIXELS
        raise InputTooLarge(f"image of over {2 * limit} pixels: at most {limit} are accepted") from e
    except UnidentifiedImageError as e:
        raise InputError(
            f"not a recognised image ({len(data)} bytes starting {data[:8]!r}): expected {_FORMATS_TEXT}"
        ) from e
    except Exception as e:  # noqa: BLE001 - a decoder failing on client bytes is the client's input error
        # Pillow's own words ("KeyError: 'MPO'", "Truncated File Read") mean nothing to a client; the log keeps them.
        log.debug("image decoder failed", extra={"image": what, "error": f"{type(e).__name__}: {e}"})
        raise InputError(f"cannot decode the image ({what}): its data is truncated or damaged; "
                         f"expected the complete bytes of {_FORMATS_TEXT}") from e


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A PNG file's first 16 bytes: the signature, then the length and type of its IHDR chunk.
_PNG_IHDR = _PNG_SIGNATURE + b"\x00\x00\x00\rIHDR"
#: Chunks that, before the pixels, change them for Pillow (transparency, EXIF orientation) or hold compressed
#: data of their own (text, ICC profile: libspng inflates up to ~32 MB of it before giving up, Pillow stops at 1 MB).
_LEFT_TO_PILLOW = (b"tRNS", b"eXIf", b"zTXt", b"iTXt", b"iCCP")
#: Chunk headers read before the pixels (an encoder writes a handful: an MNIST PNG has IHDR, then IDAT).
MAX_CHUNKS_WALKED = 64


def _shrink_factor(size: tuple[int, ...]) -> int:
    """The integer factor that brings an image's longer side to at most ``PHOTO_SIDE`` (1 for most images)."""
    return -(-max(size) // PHOTO_SIDE)


def _shrunk(gray: np.ndarray) -> np.ndarray:
    """``gray`` reduced by ``_shrink_factor`` (each pixel the mean of a k x k block: Pillow's reduce, in C)."""
    k = _shrink_factor(gray.shape)
    return gray if k == 1 else np.asarray(Image.fromarray(gray).reduce(k))


def _plain_gray_png(data: bytes) -> np.ndarray | None:
    """An 8-bit greyscale PNG, not interlaced, without transparency or EXIF (MNIST's own format) decoded by
    libspng (pyspng), ~6 µs for a 28x28 digit where Pillow takes ~27; None for any other file, which
    Pillow decodes. In such a file the pixels are the samples themselves, so both decoders give the same
    array (tests/serving/test_preprocess.py); a file libspng refuses goes to Pillow too, whose refusal
    then says what is wrong, as for every other format."""
    if not isinstance(data, bytes) or not data.startswith(_PNG_IHDR) or len(data) < 29:
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if (depth, colour, interlace) != (8, 0, 0) or _over_pixel_limit(width, height):
        return None
    if _left_to_pillow(data):
        return None
    try:
        gray = pyspng.load(data)
    except Exception:  # noqa: BLE001 - any refusal goes to Pillow, whose error the client then gets
        return None
    return gray if gray.shape == (height, width) and gray.dtype == np.uint8 else None


def _left_to_pillow(data: bytes) -> bool:
    """Whether a chunk before the first IDAT is one of ``_LEFT_TO_PILLOW``, or no IDAT follows: read from the
    chunks' headers, hopping over their data. Looking for those names in the whole file instead took 139 ms of
    the 167 ms a 28x28 PNG carrying a 60 MB ancillary chunk cost, for 1 µs now. Chunks after the pixels are
    not read: libspng leaves them unread (a 32 MB zTXt there cost it 0.4 ms) and Pillow reads them only once
    it has the pixels, which a tRNS or eXIf there leaves as they are; it refuses the file when a text chunk
    there inflates beyond 1 MB, which libspng now decodes. A file with more than ``MAX_CHUNKS_WALKED`` chunks
    before its pixels is searched as bytes instead, as before (a Python step per chunk: 500,000 empty chunks
    took 115 ms walked, 23 ms searched)."""
    pos = len(_PNG_SIGNATURE)
    for _ in range(MAX_CHUNKS_WALKED):
        if pos + 8 > len(data):
            return True
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            return False
        if kind in _LEFT_TO_PILLOW:
            return True
        pos += 12 + length  # length, type, data, CRC
    return b"IDAT" not in data or any(kind in data for kind in _LEFT_TO_PILLOW)


def header_pixels(data: bytes) -> int:
    """Width x height as the file's header states it, without decoding any pixel: read directly from a
    PNG's IHDR chunk (~1 µs), else by Pillow, which parses only the header until the pixels are asked for
    (~10-40 µs). 0 for bytes that are no image of the accepted formats: decoding them then says why."""
    pixels = png_pixels(data)
    if pixels is not None:
        return pixels
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - what is wrong with the file is for decode_digits to say
        return 0


def png_pixels(data: bytes) -> int | None:
    """Width x height from a PNG's IHDR chunk (~0.2 µs); None for any other file."""
    if data.startswith(_PNG_IHDR) and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return width * height
    return None


def _check_pixels(img: Image.Image) -> None:
    if _over_pixel_limit(img.width, img.height):
        raise InputTooLarge(f"image of {img.width}x{img.height} = {img.width * img.height} pixels: at most "
                            f"{Image.MAX_IMAGE_PIXELS} are accepted")


def _over_pixel_limit(width: int, height: int) -> bool:
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > limit


def _to_gray(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 grey levels (first frame of animations)."""
    if img.mode == "L":
        return np.asarray(img)
    if img.mode.startswith("I;16"):
        return (np.asarray(img) >> 8).astype(np.uint8)  # 16-bit: keep the top 8 bits
    if img.mode in ("I", "F"):
        return _to_uint8_range(np.asarray(img, dtype=np.float64))
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        keyed = _keyed_paper(img)
        return keyed if keyed is not None else _flatten_alpha(np.asarray(img.convert("RGBA").convert("LA")))
    return np.asarray(img.convert("L"))


def _keyed_paper(img: Image.Image) -> np.ndarray | None:
    """The grey levels of a P, L or RGB image whose transparency is one keyed colour, as if it were opaque:
    paint apps mark the paper's colour transparent, so that colour is the paper. Composited by its alpha
    instead, light anti-aliased edges on dark paper came out as hollow outlines of the digit (a 16-colour
    PNG with its white marked transparent: 97.6% of 1,000 MNIST test digits read right by mnist_cnn, 98.9%
    now). None for a palette with partial alphas, and when the opaque image has no digit (the key is the
    strokes' own colour, as in a GIF of black strokes whose hidden colour is black): alpha decides those."""
    if img.mode not in ("P", "L", "RGB") or isinstance(img.info.get("transparency"), bytes):
        return None
    gray = np.asarray(img.convert("L"))
    return gray if _contrasted(gray) else None


def _contrasted(gray: np.ndarray) -> bool:
    """Whether ``gray``'s grey levels spread over ``MIN_CONTRAST`` at least: room for a digit."""
    return int(gray.max()) - int(gray.min()) >= MIN_CONTRAST


def _to_uint8_range(x: np.ndarray) -> np.ndarray:
    """32-bit integer or float pixels have no fixed range: keep grey levels that are already 0..255,
    otherwise stretch the image's own range onto 0..255."""
    if not np.isfinite(x).all():
        raise InputError("the image has NaN or infinite pixel values: expected finite grey levels")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:  # one grey level, beyond 0..255 or not: nothing to stretch, and no digit
        raise InputError(_no_digit(lo, hi))
    if lo < 0 or hi > 255:
        x = (x - lo) * (255 / (hi - lo))
    return np.rint(x).astype(np.uint8)


def _flatten_alpha(la: np.ndarray) -> np.ndarray:
    """Composite a grey+alpha image onto a background that contrasts with its visible pixels.

    Drawings often come as strokes on a transparent canvas; dropping alpha would leave whatever colour
    the invisible pixels happen to have. Dark strokes go onto white, light strokes onto black; the
    polarity step then makes the result light-on-dark.
    """
    luma, alpha = la[..., 0].astype(np.float32), la[..., 1].astype(np.float32) / 255
    weight = float(alpha.sum())
    if weight == 0:
        raise InputError("the image is fully transparent: expected a visible digit")
    background = 255.0 if float((luma * alpha).sum()) / weight < 128 else 0.0
    return np.rint(luma * alpha + background * (1 - alpha)).astype(np.uint8)


def _background(gray: np.ndarray) -> float:
    """The (upper) median grey level of the border: np.partition, as np.median costs more than the decode."""
    return _median(np.concatenate((gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1])))


def _place_photo(gray: np.ndarray, height: int, width: int, fit_box: int) -> np.ndarray:
    """An image of another size than the model's (a photo, a scan, a drawing) placed as MNIST's digits are: the
    lighting evened out, the sheet cropped from a desk around it (and its own lighting evened, now that its paper
    is the border: the first time, the desk was), made light-on-dark, its lines taken away. The lighting comes
    first as the dark side of a sheet lit from one side would pass for a desk."""
    evened = _evenly_lit(gray)
    sheet = _sheet(evened)
    light, background = _light_on_dark(evened if sheet is evened else _evenly_lit(sheet))
    return _place(_without_lines(light, background), background, height, width, fit_box)


def _sheet(gray: np.ndarray) -> np.ndarray:
    """The sheet of paper in a photo of one lying on something darker (``MIN_SHEET``), the desk that a tilted
    sheet's crop keeps at its corners painted over (``_without_desk``); or ``gray`` itself.

    Looked for in every ``step``-th row and column (every 5th of a 12 MP photo: ~5 ms, not ~27): the sheet is
    large, and its edges found within ``step`` pixels are cut ``SHEET_EDGE`` further in anyway."""
    h, w = gray.shape
    step = 1 + max(h, w) // 1000
    coarse = gray[::step, ::step]
    lo, hi = int(coarse.min()), int(coarse.max())
    if hi - lo < MIN_CONTRAST:
        return gray  # refused by _light_on_dark, with its grey levels
    mid = (lo + hi) / 2
    if _background(gray) > mid:
        return gray  # the border is light: paper (a digit cropped tight has strokes across it, but paper around them)
    rows, cols = _cover(coarse > mid)
    rows, cols = _runs(rows > 0.5, MIN_SHEET * len(rows)), _runs(cols > 0.5, MIN_SHEET * len(cols))
    if len(rows) != 1 or len(cols) != 1 or (rows[0] == (0, coarse.shape[0]) and cols[0] == (0, coarse.shape[1])):
        return gray  # no sheet, or one that fills the photo
    (top, bottom), (left, right) = rows[0], cols[0]
    top, bottom, left, right = top * step, min(bottom * step, h), left * step, min(right * step, w)
    edge = max(1, round(SHEET_EDGE * max(h, w)))
    top, left = top + edge * (top > 0), left + edge * (left > 0)
    bottom, right = bottom - edge * (bottom < h), right - edge * (right < w)
    sheet = gray[top:bottom, left:right]
    if min(sheet.shape) < 3 or not _contrasted(sheet):
        return gray  # a light blob, not a sheet with a digit on it (a bold digit on a dark ground)
    return _without_desk(sheet, lo, mid, step)


def _without_desk(sheet: np.ndarray, desk: int, mid: float, step: int) -> np.ndarray:
    """``sheet`` with the desk that the crop of a tilted sheet keeps at its corners painted the paper's grey: from
    each edge, along each row and each column, the pixels before the first one that is paper (nearer the paper's
    grey than ``INK_THRESHOLD`` of the way to the desk's ``desk``, so the blur between them goes too). Those wedges
    were ink to the ink box (a sheet tilted 3-10 degrees: 44.8% of 1,000 MNIST test digits read right by
    mnist_cnn, 98.4% painted). The paper's grey is the median of the pixels over ``mid``, in every ``step``-th
    row and column."""
    coarse = sheet[::step, ::step]
    light = coarse[coarse > mid]
    if not len(light):
        return sheet
    paper = _median(light)
    dark = sheet < paper - INK_THRESHOLD * (paper - desk)
    h, w = sheet.shape
    across, down = np.arange(w), np.arange(h)[:, None]
    wedges = ((across < np.argmin(dark, axis=1)[:, None]) | (across >= w - np.argmin(dark[:, ::-1], axis=1)[:, None])
              | (down < np.argmin(dark, axis=0)) | (down >= h - np.argmin(dark[::-1], axis=0)))
    return np.where(wedges, np.uint8(round(paper)), sheet)


def _without_lines(light: np.ndarray, background: float) -> np.ndarray:
    """A light-on-dark image cropped to the inside of a form's box and without its ruled lines (``RULED_LINE``,
    ``BOX_LINE``); ``light`` itself when it has neither, or when nothing would be left (lines and nothing else)."""
    ink = _ink(light, background, float(light.max()))
    rows, cols = _cover(ink)
    if max(rows.max(), cols.max()) <= BOX_LINE:
        return light  # nothing across half the image (most digits): no line and no box (~40 µs for 300x300)
    out = light
    box = _box_inside(ink, rows, cols)
    if box is not None:
        out, ink = light[box], ink[box]
        rows, cols = _cover(ink)
    painted = False  # out is still (a view of) the caller's image
    for axis, cover in ((0, rows), (1, cols)):
        lines = _ruled_lines(np.moveaxis(ink, axis, 0), cover)
        if lines and not painted:
            out, painted = out.copy(), True
        across = np.moveaxis(out, axis, 0)  # a view: rows, or the columns as rows
        for start, stop in lines:  # the darker of the rows beside it: a stroke that crosses the line stays
            beside = [across[j] for j in (start - 1, stop) if 0 <= j < len(across)]
            across[start:stop] = np.minimum(*beside) if len(beside) == 2 else beside[0] if beside else background
    return out if float(out.max()) - background >= MIN_CONTRAST else light


def _cover(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The share of each row, and of each column, that is ink (or light): sums of the mask's bytes, half
    np.count_nonzero's time along an axis, with no copy of the image (a float copy for matrix products took 4
    bytes a pixel of a 24 MP photo)."""
    h, w = ink.shape
    ones = ink.view(np.uint8)
    return ones.sum(axis=1, dtype=np.int32) / w, ones.sum(axis=0, dtype=np.int32) / h


def _ruled_lines(ink: np.ndarray, cover: np.ndarray) -> list[tuple[int, int]]:
    """The runs of rows of ``ink`` (``cover``: the share of each that is ink) that are ruled lines: ink across
    ``RULED_LINE`` of the image, at most ``LINE_WIDTH`` wide, and the rest of the ink clear of both their ends
    (``LINE_CLEARANCE``): a digit cropped tight has strokes across the image too (a 7's bar, a 4's), but wider,
    and its other strokes come near an end."""
    thin = max(2, round(LINE_WIDTH * ink.shape[0]))
    lines = [(start, stop) for start, stop in _runs(cover > RULED_LINE) if stop - start <= thin]
    if not lines:
        return []
    rest = ink.copy()
    for start, stop in lines:
        rest[start:stop] = False
    inked = rest.any(axis=0)
    clear = max(1, round(LINE_CLEARANCE * len(inked)))
    return [] if inked[:clear].any() or inked[-clear:].any() else lines


def _box_inside(ink: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[slice, slice] | None:
    """The inside of the rectangle that the first and last runs of rows and of columns of ink across ``BOX_LINE``
    of the image close (``rows``, ``cols``: the share of each that is ink), when each of those four sides is thin
    (``LINE_WIDTH``) and every row (or column) of it is inked along ``BOX_SIDE`` of the rectangle: straighter and
    thinner than a hand draws. A digit's own widest rows and columns (a thick 6) are inked across its width too,
    but not evenly and not thin; None for those, and for an empty rectangle."""
    across, down = _runs(rows > BOX_LINE), _runs(cols > BOX_LINE)
    if len(across) < 2 or len(down) < 2:
        return None
    (top, inside_top), (inside_bottom, bottom) = across[0], across[-1]
    (left, inside_left), (inside_right, right) = down[0], down[-1]
    thin = max(2, round(LINE_WIDTH * max(bottom - top, right - left)))
    if max(inside_top - top, bottom - inside_bottom, inside_left - left, right - inside_right) > thin:
        return None
    inside = (slice(inside_top, inside_bottom), slice(inside_left, inside_right))
    sides = (ink[top:inside_top, left:right].mean(axis=1), ink[inside_bottom:bottom, left:right].mean(axis=1),
             ink[top:bottom, left:inside_left].mean(axis=0), ink[top:bottom, inside_right:right].mean(axis=0))
    if all(side.min() >= BOX_SIDE for side in sides) and ink[inside].any():
        return inside
    return None


def _runs(mask: np.ndarray, min_length: float = 1) -> list[tuple[int, int]]:
    """The (start, stop) of each run of True in ``mask`` at least ``min_length`` long."""
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a >= min_length]


def _evenly_lit(gray: np.ndarray) -> np.ndarray:
    """``gray`` with its paper's lighting made even, when it varies by ``UNEVEN_LIGHT`` or more; else ``gray`` itself.

    The lighting is a quadratic surface (a side light's gradient, a lamp's fall-off) fitted to the border, where
    the paper shows (``_background``'s assumption too), leaving out the pixels far off the border's median level
    and then those far off the first fit: strokes that reach the edge (a digit cropped tight) would bend it. Light
    paper is divided by it (ink reflects a share of the light, as the paper does, so a stroke keeps its contrast
    to the paper around it); a dark background has it subtracted instead (dividing by a dark surface would blow
    its noise up)."""
    h, w = gray.shape
    # Under 8 pixels a side there is no lighting to tell from strokes. From 5 up, the half of each side that a fit
    # keeps pins it down: a quadratic that is 0 at 3 points of the top row and 3 of the bottom one is 0 on both
    # rows only, so a kept point of the sides between leaves the equations one solution (they were singular on
    # a 4x5 image).
    if min(h, w) < 8:
        return gray
    paper = np.concatenate((gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1])).astype(np.float64)
    level = _median(paper)
    off = np.abs(paper - level)
    if _sigma(off) < UNEVEN_LIGHT / 4:
        return gray  # most of the border within a few levels of one: even (~30 µs for 300x300, the usual case)
    terms, sides, half_sides = _border_terms(h, w)
    for _ in range(2):
        kept = off <= 3 * _sigma(off) + 1
        if (np.add.reduceat(kept, sides) < half_sides).any():
            return gray  # half a side off: no paper there to fit, and a surface fitted to three sides is a guess
        c = _least_squares(terms, paper, kept)
        off = np.abs(paper - terms @ c)
    if _sigma(off) > UNEVEN_LIGHT / 2:
        return gray  # the border is no paper a surface fits: strokes cross much of it, or a desk's things lie there
    if np.ptp(_grid_terms() @ c) < UNEVEN_LIGHT:  # a quadratic's range: its extremes lie on a corner, an edge or
        return gray  # its one stationary point, all near some point of the grid
    light = _surface(c, _unit_range(h), _unit_range(w))
    if level > 127:
        np.divide(np.float32(level), np.maximum(light, 1, out=light), out=light)
        light *= gray
    else:
        np.subtract(gray, light, out=light)
        light += np.float32(level)
    light += np.float32(0.5)  # rounds as the cast below truncates
    return np.clip(light, 0, 255, out=light).astype(np.uint8)


def _median(values: np.ndarray) -> float:
    """The (upper) median, by np.partition: np.median sorts a copy first, ~4x the cost here."""
    return float(np.partition(values, len(values) // 2)[len(values) // 2])


def _sigma(off: np.ndarray) -> float:
    """The standard deviation that deviations ``off`` (absolute) show, robustly: from their median, which a
    minority of strokes or noise does not move (x 1.4826 for a normal distribution's)."""
    return 1.4826 * _median(off)


def _least_squares(terms: np.ndarray, values: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The coefficients that fit ``terms`` [n, k] to ``values`` [n] best where ``kept``: the normal equations, as
    the terms are few and on one scale (-1..1), ~30 µs where np.linalg.lstsq's SVD takes ~150; the rows left out
    are zeroed, not indexed out (a copy of the rest)."""
    chosen = terms * kept[:, None]
    return np.linalg.solve(chosen.T @ terms, chosen.T @ values)


def _quadratic_terms(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[n, 6]: 1, y, y^2, x, xy, x^2 of n points, the terms of ``_surface``'s quadratic."""
    return np.stack((np.ones_like(x), y, y * y, x, x * y, x * x), axis=1)


@functools.lru_cache(maxsize=16)
def _border_terms(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quadratic's terms at the border pixels of an h x w image, in the order ``_evenly_lit`` reads them (top
    row, bottom row, then the left and right columns between), where each side starts, and half of each side's
    length. Cached: images come in few sizes (a camera's, a scanner's), and building them is most of the fit."""
    ys, xs = _unit_range(h), _unit_range(w)
    y = np.concatenate((np.full(w, -1.0), np.full(w, 1.0), ys[1:-1], ys[1:-1]))
    x = np.concatenate((xs, xs, np.full(h - 2, -1.0), np.full(h - 2, 1.0)))
    sides = np.array([0, w, 2 * w, 2 * w + h - 2])
    return _frozen(_quadratic_terms(y, x)), _frozen(sides), _frozen(np.diff(sides, append=len(y)) / 2)


@functools.cache
def _grid_terms() -> np.ndarray:
    """The quadratic's terms on a 17 x 17 grid over the image, where its range is checked."""
    y, x = np.meshgrid(_unit_range(17), _unit_range(17), indexing="ij")
    return _frozen(_quadratic_terms(y.ravel(), x.ravel()))


def _frozen(array: np.ndarray) -> np.ndarray:
    """``array``, read-only: a cached array is shared by every later call."""
    array.flags.writeable = False
    return array


def _unit_range(n: int) -> np.ndarray:
    """``n`` points evenly from -1 to 1 (np.linspace, at a fifth of its cost)."""
    return np.arange(n) * (2 / (n - 1)) - 1


def _surface(c: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The quadratic c0 + c1 y + c2 y^2 + (c3 + c4 y) x + c5 x^2 at every (y, x) of the grid, float32 [len(ys),
    len(xs)]: the rows' parts, then the columns', so one array of the grid's size is made, not six."""
    xs32 = xs.astype(np.float32)
    out = np.outer((c[3] + c[4] * ys).astype(np.float32), xs32)
    out += (c[0] + c[1] * ys + c[2] * ys * ys).astype(np.float32)[:, None]
    out += np.float32(c[5]) * xs32 * xs32
    return out


def _light_on_dark(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the image as a light digit on a dark background, and that background's grey level.

    The background is the median of the border (a digit rarely fills the edges); the image is inverted
    when that background is nearer the brightest pixel than the darkest, i.e. dark ink on light paper.
    """
    lo, hi = int(gray.min()), int(gray.max())
    if hi - lo < MIN_CONTRAST:
        raise InputError(_no_digit(lo, hi))
    background = _background(gray)
    if background - lo > hi - background:
        return 255 - gray, 255 - background
    return gray, background


def _light_on_dark_stack(
    grays: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, InputError]]:
    """``_light_on_dark`` of a stack of same-size images [n, h, w] in whole-stack numpy calls: the images
    (an image without a digit is left as it was), their backgrounds' and brightest pixels' grey levels
    (float64 [n]) and each image's error by its position. A few calls for the stack cost ~45 µs, the
    per-image step ~6 µs an image: see ``STACK_MIN_IMAGES``."""
    lo, hi = grays.min(axis=(1, 2)), grays.max(axis=(1, 2))
    border = np.concatenate((grays[:, 0], grays[:, -1], grays[:, 1:-1, 0], grays[:, 1:-1, -1]), axis=1)
    middle = border.shape[1] // 2
    background = np.partition(border, middle, axis=1)[:, middle].astype(np.float64)
    invert = background - lo > hi - background
    light = np.where(invert[:, None, None], 255 - grays, grays)
    blank = np.flatnonzero(hi.astype(np.int16) - lo < MIN_CONTRAST)
    errors = {int(j): InputError(_no_digit(int(lo[j]), int(hi[j]))) for j in blank}
    peak = np.where(invert, 255 - lo, hi).astype(np.float64)
    return light, np.where(invert, 255 - background, background), peak, errors


def _unplaced(grey: np.ndarray, background: np.ndarray, peak: np.ndarray, fit_box: int) -> np.ndarray:
    """Which of a stack of light-on-dark images of the model's size (float32 [n, h, w]) are not placed as
    MNIST's are (bool [n]): centre of mass further than ``PLACED_CENTRE_SLACK`` from the centre, or ink box
    over ``fit_box + PLACED_BOX_SLACK``; ``background`` and ``peak`` are each image's grey levels (float [n]).

    On the server's hot path (batches of plain MNIST PNGs), so in whole-stack calls on the images' row and
    column sums, which matrix products give in ~35 µs for 256 images (numpy's sums along an axis of 28 pixels:
    ~200 µs). A row or column that holds an ink pixel sums to more than the ink threshold, so the box of such
    sums holds the ink box; only an image whose box of sums is too big (none of MNIST's test set) has its ink
    box measured exactly.
    """
    n, h, w = grey.shape
    if background.any():  # MNIST's is 0: the ink is the grey level itself
        grey = np.maximum(grey - background[:, None, None].astype(np.float32), 0)
    size = max(h, w)
    sums = np.zeros((n, 2, size), dtype=np.float32)  # each image's row sums, then its column sums
    np.matmul(grey, np.ones(w, dtype=np.float32), out=sums[:, 0, :h])  # exact, as all these: integers < 2**24
    np.matmul(np.ones((1, h), dtype=np.float32), grey, out=sums[:, 1:, :w])
    mass, *moments = (sums.reshape(n, 2 * size) @ _moments(size)).T  # of rows: y, of columns: x
    off = np.abs(np.stack(moments, axis=1) / np.maximum(mass, 1)[:, None] - _half(h, w)).max(axis=1)
    off = off > PLACED_CENTRE_SLACK  # mass 0: an image without a digit, refused already
    inked = (sums > (INK_THRESHOLD * (peak - background))[:, None, None]).reshape(2 * n, size)
    spans = size - inked[:, ::-1].argmax(axis=1) - inked.argmax(axis=1)  # first to last, inclusive
    largest = fit_box + PLACED_BOX_SLACK
    big = spans.reshape(n, 2).max(axis=1) > largest
    for j in np.flatnonzero(big & ~off):
        box = _ink_box(grey[j], 0.0, float(peak[j] - background[j]))
        big[j] = max(box[0].stop - box[0].start, box[1].stop - box[1].start) > largest
    return off | big


def _unplaced_one(light: np.ndarray, background: float, fit_box: int) -> bool:
    """``_unplaced`` of one light-on-dark image (uint8 [h, w]) in a third of its numpy calls: a lone image, a unary
    call's, took 35 µs to decode through the stack's version, 13 before the check. The same sums and the same
    float32 arithmetic, so both give the same answer (tests/serving/test_preprocess.py checks it on MNIST)."""
    h, w = light.shape
    grey = light.astype(np.float32)
    if background:
        grey = np.maximum(grey - np.float32(background), np.float32(0))
    rows, cols = grey.sum(axis=1), grey.sum(axis=0)  # exact: integers < 2**24
    weights = _moments(max(h, w))
    mass = np.float32(rows.sum())
    centre = np.array([rows @ weights[:h, 1], cols @ weights[:w, 1]], dtype=np.float32) / max(mass, np.float32(1))
    if np.abs(centre - _half(h, w)).max() > PLACED_CENTRE_SLACK:
        return True
    contrast = float(light.max()) - background
    threshold = INK_THRESHOLD * contrast
    largest = fit_box + PLACED_BOX_SLACK
    if max(_span(rows > threshold), _span(cols > threshold)) <= largest:
        return False
    box = _ink_box(grey, 0.0, contrast)
    return max(box[0].stop - box[0].start, box[1].stop - box[1].start) > largest


def _span(inked: np.ndarray) -> int:
    """From the first True to the last, inclusive (0 for none)."""
    at = np.flatnonzero(inked)
    return int(at[-1] - at[0] + 1) if len(at) else 0


@functools.cache
def _moments(size: int) -> np.ndarray:
    """float32 [2 * size, 3]: an image's row sums, then its column sums (each ``size`` long) times this are
    its mass and its first moments along y and along x."""
    weights = np.zeros((2 * size, 3), dtype=np.float32)
    weights[:size, 0] = 1
    weights[:size, 1] = weights[size:, 2] = np.arange(size)
    return weights


@functools.cache
def _half(h: int, w: int) -> np.ndarray:
    """The centre of an h x w canvas as ``_centre`` puts a centre of mass there, float32 [2]."""
    return np.array([h / 2, w / 2], dtype=np.float32)


def _ink(gray: np.ndarray, background: float, peak: float) -> np.ndarray:
    """Which pixels are ink: brighter than ``INK_THRESHOLD`` of the way from background to peak."""
    return gray > background + INK_THRESHOLD * (peak - background)


def _ink_box(gray: np.ndarray, background: float, peak: float) -> tuple[slice, slice]:
    """The rows and columns of the ink (``_ink``)."""
    ink = _ink(gray, background, peak)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _no_digit(lo: float, hi: float) -> str:
    return f"no digit found: grey levels only span {lo:g}..{hi:g}; expected a digit that stands out from its background"


def _place(gray: np.ndarray, background: float, height: int, width: int, fit_box: int) -> np.ndarray:
    """MNIST's placement: crop to the ink, fit into fit_box x fit_box keeping the aspect ratio, then put
    the centre of mass at the centre of a height x width canvas. Returns float32 grey levels 0..255.

    Ink is a pixel above the threshold in the image and in a smoothed copy of it (``_smoothed``): paper noise
    reaches the threshold only here and there, and stretched the box to the image's edges; the smoothed copy
    alone would stretch it by the blur's radius."""
    peak = float(gray.max())
    box = _ink_box(np.minimum(gray, _smoothed(gray, background)), background, peak)
    digit = gray[box].astype(np.float32)
    # Background to 0 and the strongest ink to 255, as in MNIST, whatever the paper and pen were.
    digit -= background
    np.clip(digit, 0, None, out=digit)
    digit *= 255 / (peak - background)
    h, w = digit.shape
    scale = fit_box / max(h, w)
    if scale != 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        digit = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS))
        digit = np.clip(digit, 0, 255)  # Lanczos overshoots a little at sharp edges
        if 0 < (strongest := float(digit.max())) < FAINT * 255:
            digit *= 255 / strongest  # strokes thinner than a pixel of the fit faded; MNIST's reach 255
    return _centre(digit, height, width)


def _smoothed(gray: np.ndarray, background: float) -> np.ndarray:
    """``gray`` box-blurred over a radius of ``SMOOTH_RADIUS`` of its larger side (Pillow's, in C), or ``gray``
    itself when that radius rounds to 0 (under 50 pixels: MNIST-sized images are placed as before) or when
    the blur leaves less than half of the ink's contrast (strokes thinner than the blur: it would hide them)."""
    radius = round(max(gray.shape) * SMOOTH_RADIUS)
    if radius < 1:
        return gray
    smooth = np.asarray(Image.fromarray(gray).filter(ImageFilter.BoxBlur(radius)))
    if float(smooth.max()) - background < (float(gray.max()) - background) / 2:
        return gray
    return smooth


def _centre(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Paste digit into a zero canvas with its centre of mass at (height / 2, width / 2), as MNIST did (its
    test set's centres of mass all lie within half a pixel of (14, 14)); integer shifts keep strokes sharp."""
    h, w = digit.shape
    mass = float(digit.sum())
    cy = float(digit.sum(axis=1) @ np.arange(h)) / mass
    cx = float(digit.sum(axis=0) @ np.arange(w)) / mass
    top = int(np.clip(np.rint(height / 2 - cy), 0, height - h))
    left = int(np.clip(np.rint(width / 2 - cx), 0, width - w))
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top : top + h, left : left + w] = digit
    return canvas


# --- Records and texts -> a model's named inputs ----------------------------------------------------

#: per task whose items are records or texts: its encoder, given the card's ``preprocessing``, returning the
#: tensors in the order of the card's inputs
_ITEM_ENCODERS: dict[str, Callable[[Mapping[str, Any], Sequence[Any]], tuple[np.ndarray, ...]]] = {
    "diabetes": lambda prep, items: (encode_features(items, prep["num_features"], prep.get("feature_range")),),
    "names": lambda prep, items: encode_names(items, prep["vocab_size"]),
    "hello": lambda prep, items: (encode_hello(items, prep["vocabulary"]),),
}


def encode_items(task: str, prep: Mapping[str, Any], items: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """Records (diabetes) or texts (names, hello) -> a model's input tensors in the card's order, by the
    task's encoder with the card's ``preprocessing``.

    The server and the batch CLI's local engine (through ``model_inputs``), the batch CLI's per-item checks
    and training's held-out texts all encode through this, so which encoder a task uses, and with which of
    the card's settings, is decided once.
    """
    if task not in _ITEM_ENCODERS:
        raise InputError(f"a {task} model takes no records or texts")
    return _ITEM_ENCODERS[task](prep, items)


def model_inputs(card: ModelCard, items: Sequence[Any]) -> dict[str, np.ndarray]:
    """Records (diabetes) or texts (names, hello) -> the input tensors the card names, by its task."""
    if card.task not in _ITEM_ENCODERS:  # said with the model's name, for the client that picked it
        raise InputError(f"{card.name} is a {card.task} model: it takes no records or texts")
    return dict(zip((t.name for t in card.inputs), encode_items(card.task, card.preprocessing, items), strict=False))


def check_task_inputs(card: ModelCard, inputs: Mapping[str, np.ndarray]) -> None:
    """InputError for tensor values the task's encoder above never produces and the card's shapes cannot
    rule out; ``ModelInfer`` clients build these tensors themselves (datatypes and shapes are checked already).

    Without it a names length of 0 is answered as if for an empty name, a character 0 inside a name is read
    as padding, and an index beyond the vocabulary fails inside ONNX Runtime in its own words, after failing
    the merged batch it came in (which then runs again request by request).
    """
    prep, names = card.preprocessing, [t.name for t in card.inputs]
    if card.task == "diabetes" and "feature_range" in prep:
        check_feature_range(inputs[names[0]], prep["feature_range"], f"input {names[0]!r} row")
    elif card.task == "names":
        chars, lengths = inputs[names[0]], inputs[names[1]]
        _check_indices(names[0], chars, prep["vocab_size"], "character codes (ASCII)")
        longest = chars.shape[1]
        bad = np.flatnonzero((lengths < 1) | (lengths > longest))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"input {names[1]!r} item {i} is {int(lengths[i])}: expected a name's length, "
                             f"1..{longest} (the width of {names[0]!r})")
        padding = (chars == 0) & (np.arange(longest) < lengths[:, None])
        if padding.any():
            i, t = (int(x) for x in np.argwhere(padding)[0])
            raise InputError(f"input {names[0]!r} row {i} has code 0 at position {t}, inside its length "
                             f"{int(lengths[i])}: 0 is padding, expected codes 1..{prep['vocab_size'] - 1} there")
    elif card.task == "hello":
        vocabulary = prep["vocabulary"]
        _check_indices(names[0], inputs[names[0]], len(vocabulary), f"indices into {''.join(vocabulary)!r}")


def _check_indices(name: str, array: np.ndarray, size: int, what: str) -> None:
    """Negative values are refused with the tensor's shape check; this refuses those past the end."""
    if array.max() >= size:
        raise InputError(f"input {name!r} has value {int(array.max())}: expected {what}, 0..{size - 1}")
