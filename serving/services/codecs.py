"""KServe v2 tensors <-> numpy arrays, without a Python loop over elements.

Requests may carry each input either as typed ``contents`` (``fp32_contents``, ``int64_contents``,
...) or, as ``tritonclient`` does, as one little-endian buffer per input in ``raw_input_contents``;
raw buffers become zero-copy ``np.frombuffer`` views. Replies always use ``raw_output_contents``
(what Triton does, and what clients decode fastest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from serving.card import DATATYPES
from serving.preprocess import InputError

#: KServe v2 datatype -> little-endian numpy dtype and the ``InferTensorContents`` field that carries it.
DTYPES = {name: np.dtype(numpy_name).newbyteorder("<") for name, numpy_name in DATATYPES.items()}
#: More axes than any course model has; numpy itself stops at 64, with an error that is no client's business.
MAX_DIMS = 8
CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                  "INT32": "int_contents", "UINT8": "uint_contents"}
DATATYPE_OF = {np.dtype(numpy_name): name for name, numpy_name in DATATYPES.items()}


def decode_inputs(tensors: Sequence, raw: Sequence[bytes]) -> dict[str, np.ndarray]:
    """``ModelInferRequest.inputs`` (+ ``raw_input_contents``) -> arrays by tensor name.

    Checks what the transport alone can check (datatype known, shape non-negative, element count
    matches); names, dtypes and shapes against the model card are the runtime's ``validate``.
    """
    if raw and len(raw) != len(tensors):
        raise InputError(f"{len(raw)} raw_input_contents for {len(tensors)} inputs: expected one buffer per input, "
                         "or none and typed contents")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InputError(f"input {tensor.name!r} has datatype {tensor.datatype!r}: expected one of "
                             f"{', '.join(DTYPES)}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InputError(f"input {tensor.name!r} has shape {list(shape)}: dimensions must be >= 0")
        if len(shape) > MAX_DIMS:
            raise InputError(f"input {tensor.name!r} has {len(shape)} dimensions: at most {MAX_DIMS} are accepted")
        count = math.prod(shape)  # Python ints: a product of huge dimensions must not wrap around to a small one
        if raw:
            buffer = raw[i]  # once: each read of a protobuf bytes field is a copy
            if len(buffer) != count * dtype.itemsize:
                raise InputError(f"input {tensor.name!r}: raw buffer of {len(buffer)} bytes, expected "
                                 f"{count * dtype.itemsize} for {tensor.datatype} {list(shape)}")
            array = np.frombuffer(buffer, dtype=dtype)
        else:
            values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
            if len(values) != count:
                raise InputError(f"input {tensor.name!r}: {len(values)} values in contents."
                                 f"{CONTENTS_FIELD[tensor.datatype]}, expected {count} for shape {list(shape)}")
            try:
                array = np.array(values, dtype=dtype)
            except OverflowError as e:
                raise InputError(f"input {tensor.name!r}: a value does not fit {tensor.datatype}: {e}") from e
        if tensor.name in arrays:
            raise InputError(f"input {tensor.name!r} is given twice: expected each input once")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


def select_outputs(outputs: Mapping[str, np.ndarray], requested: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The outputs the client asked for (all when it named none), in its order."""
    if not requested:
        return list(outputs.items())
    unknown = [name for name in requested if name not in outputs]
    if unknown:
        raise InputError(f"unknown output {unknown[0]!r}: the model's outputs are {', '.join(outputs)}")
    return [(name, outputs[name]) for name in requested]


def encode_output(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """An output array -> (KServe datatype, shape, little-endian bytes)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return DATATYPE_OF[array.dtype], list(array.shape), array.tobytes()
