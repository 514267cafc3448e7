"""KServe v2 tensors <-> numpy arrays, without a Python loop over elements.

Requests may carry each input either as typed ``contents`` (``fp32_contents``, ``int64_contents``,
...) or, as ``tritonclient`` does, as one little-endian buffer per input in ``raw_input_contents``;
raw buffers become zero-copy ``np.frombuffer`` views; or, through Triton's system shared memory
extension, in a registered region (``serving.shared_memory``), read with one copy. Replies use
``raw_output_contents`` (what Triton does, and what clients decode fastest), or write an output into the
region its request named.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.card import DATATYPE_OF, DATATYPES, TensorSpec
from serving.preprocess import InputError, quote
from serving.shared_memory import BYTE_SIZE, OFFSET, REGION, SharedMemoryRegistry

#: KServe v2 datatype -> little-endian numpy dtype and the ``InferTensorContents`` field that carries it.
DTYPES = {name: np.dtype(numpy_name).newbyteorder("<") for name, numpy_name in DATATYPES.items()}
#: More axes than any course model has; numpy itself stops at 64, with an error that is no client's business.
MAX_DIMS = 8
CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                  "INT32": "int_contents", "UINT8": "uint_contents"}
#: The requested output parameter of Triton's classification extension
CLASSIFICATION = "classification"


def decode_inputs(tensors: Sequence, raw: Sequence[bytes], shared_memory: SharedMemoryRegistry | None = None,
                  specs: Sequence[TensorSpec] = ()) -> dict[str, np.ndarray]:
    """``ModelInferRequest.inputs`` (+ ``raw_input_contents``) -> arrays by tensor name.

    An input whose parameters name a shared memory region is read from it (a copy); the raw buffers
    belong, in order, to the other inputs (what tritonclient sends). Checks what the transport alone can
    check (datatype known, shape non-negative, element count matches); names, dtypes and shapes against
    the model card are the runtime's ``validate``. ``specs``, the card's inputs, only make errors say what
    the model expects.
    """
    expected = {spec.name: spec.datatype for spec in specs}
    placements = [shared_placement(t) for t in tensors]
    for tensor, placement in zip(tensors, placements, strict=True):
        if tensor.HasField("contents") and (placement or raw):  # which one would count? Triton refuses it too
            where = "in shared memory" if placement else "with raw_input_contents in the request"
            raise InputError(f"input {tensor.name!r} has typed contents and is also {where}: expected its data in "
                             "one place; leave contents empty when sending raw_input_contents or shared memory")
    unplaced = placements.count(None)
    if raw and len(raw) != unplaced:
        raise InputError(f"{len(raw)} raw_input_contents for {unplaced} inputs not in shared memory: "
                         "expected one buffer per such input, or none and typed contents")
    shared = [(tensor.name, placement) for tensor, placement in zip(tensors, placements, strict=True) if placement]
    if shared:  # the regions there and the bytes bounded, before any is read
        if shared_memory is None:
            raise InputError(f"input {shared[0][0]!r} names a shared memory region, but shared memory is off on this "
                             "server (--shared-memory): send the data in raw_input_contents")
        raw = list(raw)  # each read of a protobuf bytes field is a copy: read them once, here
        typed = sum(t.contents.ByteSize() for t, p in zip(tensors, placements, strict=True) if p is None)
        shared_memory.check_reads([(region, byte_size, f"input {name}") for name, (region, byte_size, _) in shared],
                                  in_message=sum(map(len, raw)) + typed)
    buffers = iter(raw)
    arrays: dict[str, np.ndarray] = {}
    for tensor, placement in zip(tensors, placements, strict=True):
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None:
            wanted = expected.get(tensor.name) or f"one of {', '.join(DTYPES)}"
            raise InputError(f"input {tensor.name!r} has datatype {tensor.datatype!r}: expected {wanted}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InputError(f"input {tensor.name!r} has shape {list(shape)}: dimensions must be >= 0")
        if len(shape) > MAX_DIMS:
            raise InputError(f"input {tensor.name!r} has {len(shape)} dimensions: at most {MAX_DIMS} are accepted")
        count = math.prod(shape)  # Python ints: a product of huge dimensions must not wrap around to a small one
        if placement or raw:
            # the size checked before a shared memory read; a raw buffer read once (each read of a protobuf
            # bytes field is a copy)
            size = placement[1] if placement else len(buffer := next(buffers))
            if size != count * dtype.itemsize:
                source = f"shared memory byte size {size}" if placement else f"raw buffer of {size} bytes"
                raise InputError(f"input {tensor.name!r}: {source}, expected {count * dtype.itemsize} for "
                                 f"{tensor.datatype} {list(shape)}")
            if placement:
                assert shared_memory is not None  # refused above otherwise
                region, byte_size, offset = placement
                buffer = shared_memory.region(region, f"input {tensor.name}").read(offset, byte_size,
                                                                                   f"input {tensor.name}")
            array = np.frombuffer(buffer, dtype=dtype)
        else:
            field = CONTENTS_FIELD[tensor.datatype]
            values = getattr(tensor.contents, field)
            if len(values) != count:
                elsewhere = [f"{len(v)} in contents.{f.name}" for f, v in tensor.contents.ListFields()
                             if f.name != field]
                raise InputError(f"input {tensor.name!r}: {len(values)} values in contents.{field} (its datatype "
                                 f"{tensor.datatype}'s field){', but ' + ', '.join(elsewhere) if elsewhere else ''}, "
                                 f"expected {count} for shape {list(shape)}")
            try:
                array = np.array(values, dtype=dtype)
            except OverflowError as e:
                raise InputError(f"input {tensor.name!r}: a value does not fit {tensor.datatype}: {e}") from e
        if tensor.name in arrays:
            raise InputError(f"input {tensor.name!r} is given twice: expected each input once")
        try:
            arrays[tensor.name] = array.reshape(shape)
        except ValueError as e:  # numpy's own limit, reached by an empty tensor with huge other dimensions
            raise InputError(f"input {tensor.name!r} has shape {list(shape)}: too large an array; expected dimensions "
                             "whose product is below 2**63") from e
    return arrays


def shared_placement(tensor: Any) -> tuple[str, int, int] | None:
    """The (region, byte size, offset) a tensor's parameters name, or None when it is not in shared memory."""
    params = tensor.parameters
    if REGION not in params:
        return None
    if params[REGION].WhichOneof("parameter_choice") != "string_param":
        raise InputError(f"{tensor.name!r}: the {REGION} parameter names a region: expected a string_param")
    if BYTE_SIZE not in params:
        raise InputError(f"{tensor.name!r} names shared memory region {params[REGION].string_param!r} "
                         f"without {BYTE_SIZE}: expected both (and optionally {OFFSET})")
    byte_size, offset = _int_param(params[BYTE_SIZE]), _int_param(params[OFFSET]) if OFFSET in params else 0
    if byte_size < 0 or offset < 0:  # a negative size had cancelled another input's out of the request's total
        raise InputError(f"{tensor.name!r}: shared memory byte size {byte_size} at offset {offset}: expected both "
                         ">= 0")
    return params[REGION].string_param, byte_size, offset


def _int_param(param: Any) -> int:
    """An InferParameter holding a whole number (tritonclient sends int64_param; uint64_param is accepted)."""
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InputError(f"shared memory sizes and offsets are whole numbers: got a {kind or 'empty'} parameter")
    return getattr(param, kind)


def select_outputs(outputs: Mapping[str, np.ndarray], requested: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The outputs the client asked for (all when it named none), in its order, each once (as Triton answers a
    name asked for twice)."""
    if not requested:
        return list(outputs.items())
    unknown = [name for name in requested if name not in outputs]
    if unknown:
        raise InputError(f"unknown output {quote(unknown[0])}: the model's outputs are {', '.join(outputs)}")
    return [(name, outputs[name]) for name in dict.fromkeys(requested)]


#: Request parameters with a meaning in Triton's protocol: integers (accepted; every request here has one
#: priority, and it waits at most until its deadline), and a sequence's correlation (refused below).
INTEGER_PARAMETERS = ("priority", "timeout")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
#: The one reserved key a client may send (tritonclient's ``enable_empty_final_response``): a decoupled model's
#: empty last reply. Every reply here is its request's one and last, and says so, so there is nothing to add.
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"


def check_request_parameters(parameters: Mapping[str, Any]) -> None:
    """InputError for request parameters that would otherwise be ignored while the client counts on them: keys
    Triton reserves (``triton_*``), a priority or timeout that is not a whole number, and a sequence (stateful
    inference: every course model here answers each request on its own, so a correlation id would be dropped)."""
    for key, param in parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if key == EMPTY_FINAL_RESPONSE:
            if kind != "bool_param":
                raise InputError(f"request parameter {key!r} is true or false: got a {kind or 'empty'} parameter")
            continue
        if key.startswith("triton_"):
            raise InputError(f"request parameter {key!r}: keys starting with 'triton_' are reserved (but "
                             f"{EMPTY_FINAL_RESPONSE}); leave it out")
        if key in INTEGER_PARAMETERS and kind not in ("int64_param", "uint64_param"):
            raise InputError(f"request parameter {key!r} is a whole number: got a {kind or 'empty'} parameter")
        if key in SEQUENCE_PARAMETERS and getattr(param, kind or "bool_param"):
            raise InputError(f"request parameter {key!r}: no model here is a sequence (stateful) model, each request "
                             "is answered on its own; send the whole sequence in one request, without sequence_*")


def class_count(tensor: Any) -> int:
    """The ``classification`` parameter of a requested output: how many top classes to answer (0: not asked,
    the tensor). A count of 0 asked for is refused, as Triton does: tritonclient sends none for class_count=0."""
    if CLASSIFICATION not in tensor.parameters:
        return 0
    param = tensor.parameters[CLASSIFICATION]
    if param.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param") or _int_param(param) < 1:
        raise InputError(f"output {tensor.name!r}: the {CLASSIFICATION} parameter is a class count, a whole number "
                         ">= 1 (tritonclient's InferRequestedOutput(name, class_count=k))")
    return _int_param(param)


def encode_classes(array: np.ndarray, count: int, labels: Sequence[str]) -> tuple[str, list[int], bytes]:
    """Triton's classification extension: per batch row, the ``count`` largest values (fewer if the row has
    fewer), largest first, as BYTES ``"value:index"`` strings, with ``":label"`` when the card's labels name
    the row's values (as many labels as values per row)."""
    rows = array.reshape(len(array), -1)
    count = min(count, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :count]
    named = len(labels) == rows.shape[1]
    items = []
    for row, indices in zip(rows.tolist(), top.tolist(), strict=True):
        for i in indices:
            text = f"{row[i]:f}:{i}:{labels[i]}" if named else f"{row[i]:f}:{i}"
            data = text.encode()
            items.append(struct.pack("<I", len(data)) + data)  # BYTES on the wire: 4-byte length, then the bytes
    return "BYTES", [len(rows), count], b"".join(items)


def squeeze_item_scalars(inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Inputs of one value per item (card shape ``[-1]``) sent as ``[n, 1]`` become ``[n]``: the model
    configuration describes them as Triton must, ``dims [1]`` reshaped to ``[]`` (serving.services.descriptions),
    so a client that follows it sends ``[n, 1]``."""
    for spec in specs:
        array = inputs.get(spec.name)
        if len(spec.shape) == 1 and array is not None and array.ndim == 2 and array.shape[1] == 1:
            inputs[spec.name] = array.reshape(len(array))
    return inputs


def encode_output(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """An output array -> (KServe datatype, shape, little-endian bytes)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return DATATYPE_OF[array.dtype], list(array.shape), array.tobytes()
