"""Property-based fuzzing of every input path, in-process (thousands of cases in seconds).

The property is the service's error contract: each input either becomes a well-formed tensor (the right
shape and dtype, finite values) or is refused with ``InputError`` (INVALID_ARGUMENT) / ``InputTooLarge``
(RESOURCE_EXHAUSTED) whose message a client can act on. Any other exception would be an INTERNAL error
on the wire. ``test_fuzz_wire.py`` repeats the important cases against a real server.

``serving.services.codecs`` is imported without ``serving.services.inference``: this process also holds
tritonclient's copy of the ``inference`` messages, which are used here as the request tensors.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as kserve

from serving.card import ModelCard
from serving.preprocess import (
    InputError,
    InputTooLarge,
    decode_digit,
    encode_features,
    encode_hello,
    encode_names,
    pixels_to_digit,
    set_max_image_pixels,
)
from serving.runtime import OnnxModel
from serving.services.codecs import decode_inputs
from tests.reliability.fuzzing import floats, fuzz, image_files, infer_requests, png_claiming, strip, texts

PREP = {"height": 28, "width": 28, "fit_box": 20, "mean": 0.1307, "std": 0.3081}
#: Python's and Pillow's vocabulary must not reach a client: "KeyError: 'MPO'", "Truncated File Read", ...
LEAK = re.compile(r"\b(KeyError|IndexError|TypeError|AttributeError|struct\.error|Traceback|Truncated File Read)\b")
SMALL_PIXEL_LIMIT = 1_000_000
#: Pillow warns about the damaged files it still opens (corrupt EXIF, oversized TIFF tags), and about images
#: between one and two times the pixel limit (pytest resets the filter that makes that an error; the check
#: after Image.open refuses them either way): expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


@pytest.fixture(autouse=True)
def small_pixel_limit() -> Iterator[None]:
    """A 1-megapixel limit, so decompression bombs are cheap to build; Pillow's limit is process-wide."""
    previous = Image.MAX_IMAGE_PIXELS
    set_max_image_pixels(SMALL_PIXEL_LIMIT)
    yield
    set_max_image_pixels(previous)


def check_refusal(error: InputError) -> None:
    message = str(error)
    assert message and not LEAK.search(message), message
    assert "expected" in message or "at most" in message or "no digit" in message, message


def check_digit(decode: Callable[[], np.ndarray]) -> None:
    try:
        x = decode()
    except InputError as e:
        check_refusal(e)
        return
    assert x.shape == (1, 28, 28) and x.dtype == np.float32 and np.isfinite(x).all()


# --- images -------------------------------------------------------------------------------------------------


@fuzz(2500)
@given(data=image_files())
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=png_claiming(50_000, 50_000))
@example(data=png_claiming(1, 2**31 - 1))
@example(data=png_claiming(0, 0))
@example(data=strip(100_000, 1))
@example(data=strip(1, 100_000))
def test_any_image_bytes_become_a_digit_or_an_input_error(data: bytes, count_case: Callable[[], None]) -> None:
    count_case()
    check_digit(lambda: decode_digit(data, PREP))


@pytest.mark.parametrize("width,height", [(50_000, 50_000), (SMALL_PIXEL_LIMIT + 1, 1), (2_000, 2_000)])
def test_images_over_the_pixel_limit_are_refused_from_their_header(width: int, height: int) -> None:
    with pytest.raises(InputTooLarge, match="at most|too large"):
        decode_digit(png_claiming(width, height), PREP)


def test_a_real_compressed_bomb_is_refused_before_it_is_decoded() -> None:
    buf = io.BytesIO()
    Image.new("L", (2_000, 2_000)).save(buf, "PNG", optimize=True)  # 4 MP of zeros in a few KB
    assert len(buf.getvalue()) < 20_000
    with pytest.raises(InputTooLarge):
        decode_digit(buf.getvalue(), PREP)


@fuzz(500)
@given(pixels=st.binary(max_size=1600))
def test_raw_pixels_of_any_length(pixels: bytes, count_case: Callable[[], None]) -> None:
    count_case()
    check_digit(lambda: pixels_to_digit(pixels, PREP))


# --- texts and records ---------------------------------------------------------------------------------------

@fuzz(1500)
@given(names=texts)
@example(names=["x" * 1_000_000])
@example(names=["\x00"])
@example(names=["Müller", "Nguyễn", "李"])
def test_any_names_become_char_codes_or_an_input_error(names: list[str], count_case: Callable[[], None]) -> None:
    count_case()
    try:
        chars, lengths = encode_names(names, 128)
    except InputError as e:
        check_refusal(e)
        return
    assert chars.shape[0] == lengths.shape[0] == len(names) and chars.dtype == lengths.dtype == np.int64
    assert ((chars >= 0) & (chars < 128)).all() and (lengths >= 1).all() and lengths.max() == chars.shape[1]


@fuzz(1500)
@given(words=texts)
def test_any_hello_texts_become_indices_or_an_input_error(words: list[str], count_case: Callable[[], None]) -> None:
    count_case()
    vocabulary = ["e", "h", "l", "o"]
    try:
        x = encode_hello(words, vocabulary)
    except InputError as e:
        check_refusal(e)
        return
    assert x.shape[0] == len(words) and ((x >= 0) & (x < len(vocabulary))).all()


@fuzz(1000)
@given(records=st.lists(st.lists(floats, max_size=10), max_size=6))
def test_any_records_become_features_or_an_input_error(records: list[list[float]],
                                                       count_case: Callable[[], None]) -> None:
    count_case()
    try:
        x = encode_features(records, 8)
    except InputError as e:
        check_refusal(e)
        return
    assert x.shape == (len(records), 8) and x.dtype == np.float32 and np.isfinite(x).all()


# --- ModelInfer tensors: transport decoding, card validation, execution ----------------------------------------

@pytest.fixture(scope="module")
def models(scratch_repo: Path) -> dict[str, OnnxModel]:
    """Every scratch model's newest version, loaded as the server loads it."""
    loaded = {}
    for model_dir in sorted(p for p in scratch_repo.iterdir() if p.is_dir()):
        version = max(model_dir.iterdir(), key=lambda p: int(p.name))
        card = ModelCard.load(version)
        loaded[card.name] = OnnxModel(card.verify_file(version), card, device="cpu", intra_op_threads=1)
    return loaded


def test_model_infer_tensors(models: dict[str, OnnxModel], count_case: Callable[[], None]) -> None:
    """Decoding, validation and execution of random ModelInfer inputs, for every scratch model."""

    @fuzz(2500)
    @given(case=infer_requests([m.card for m in models.values()]))
    def check(case: tuple[str, kserve.ModelInferRequest]) -> None:
        count_case()
        name, request = case
        model = models[name]
        try:
            inputs = decode_inputs(request.inputs, request.raw_input_contents)
            model.validate(inputs)
            outputs = model.run(inputs)
        except InputError as e:
            check_refusal(e)
            return
        rows = len(next(iter(inputs.values())))
        assert set(outputs) == {t.name for t in model.card.outputs}
        assert all(len(v) == rows for v in outputs.values())

    check()
