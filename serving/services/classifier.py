"""coursezoo.v1.Classifier: the domain API (digits, diabetes records, names and hello sequences).

Each RPC is the same three steps, LitServe style: decode the request into the model's input tensors
(``serving.preprocess``), ``await model.infer`` (the model's dynamic batcher coalesces concurrent
requests into one ONNX Runtime call), encode the outputs (``serving.postprocess``) into the reply.
The preprocessing and postprocessing rules are not here: the batch CLI shares them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from google.protobuf import struct_pb2

from serving import postprocess
from serving.batching import ItemBudget
from serving.card import TASKS
from serving.decoding import ImageDecoder
from serving.metrics import Metrics
from serving.preprocess import InputError, decode_digit, model_inputs, pixels_to_digit, pixels_to_digits, quote
from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc
from serving.repository import ModelNotFound, ModelNotReady, ModelRepository, ServedModel
from serving.services.base import Answer, Handler, Settings, answer, fail, in_order, rpc

#: Items the streams to one model may hold decoded at once, in queues' worth (``--max-queue-items``): one
#: queue full and one more being decoded or waiting keeps the model busy without holding more.
STREAM_BUDGET_QUEUES = 2
#: Raw-pixel batches up to this size convert on the event loop (~0.27 ms for 512 images, about what a
#: hand-over to a worker thread costs); larger ones in a thread, where numpy releases the GIL.
INLINE_PIXEL_IMAGES = 512


class ClassifierService(Handler, classifier_pb2_grpc.ClassifierServicer):
    """Handlers of the domain API; see protos/coursezoo/v1/classifier.proto for the messages."""

    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings,
                 decoder: ImageDecoder) -> None:
        super().__init__(repository, metrics, settings)
        self.decoder = decoder
        self._stream_budget_items = STREAM_BUDGET_QUEUES * settings.max_queue_items
        self._stream_budgets: dict[str, ItemBudget] = {}  # by model name: one model's full queue holds up no other

    @rpc("ListModels", model_field="task")
    async def ListModels(self, request: pb.ListModelsRequest) -> Answer:
        if request.task and request.task not in TASKS:  # a misspelt filter would look like "no such models"
            raise InputError(f"unknown task {quote(request.task)}: expected one of {', '.join(TASKS)}, or none for all")
        by_name: dict[str, list[ServedModel]] = {}
        for served in self.repository.models():
            if not request.task or served.card.task == request.task:
                by_name.setdefault(served.name, []).append(served)
        defaults = {task: self._default_or_none(task) for task in {s[0].card.task for s in by_name.values()}}
        infos = [self._model_info(name, versions, defaults) for name, versions in sorted(by_name.items())]
        return Answer(pb.ListModelsResponse(models=infos), "", len(infos))

    def _default_or_none(self, task: str) -> str | None:
        try:
            return self.repository.default_model(task)
        except (ModelNotFound, ModelNotReady):  # no ready model of that task right now
            return None

    def _model_info(self, name: str, versions: list[ServedModel], defaults: dict[str, str | None]) -> pb.ModelInfo:
        try:
            current = self.repository.get(name)
        except (ModelNotFound, ModelNotReady):  # being swapped or unloaded: describe what we hold
            current = versions[-1]
        card = current.card
        metrics = struct_pb2.Struct()
        metrics.update(card.metrics)
        return pb.ModelInfo(
            name=name, versions=[v.version for v in versions if v.ready], version=current.version, task=card.task,
            labels=card.labels, metrics=metrics, ready=current.ready, provider=current.provider,
            lecture=card.lecture, description=card.description, is_default=defaults.get(card.task) == name,
        )

    async def StreamClassifyDigits(self, requests: AsyncIterator[pb.ClassifyDigitsRequest],
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyDigitsResponse]:
        """Pipelined (``in_order``): several requests are classified concurrently, answered in order.

        A failing request ends the stream with its status (the messages carry no error field) after
        the answers to the requests before it; so does a message that cannot be read (it fails in order,
        as a stand-in for its answer). A client that half-closes gets every answer, then OK. A stream is
        flow-controlled, so its requests wait for room in a full model queue rather than end it (a window
        of 1024-image requests alone is twice the default queue).
        """
        try:
            async for answered in in_order(requests, functools.partial(
                    answer, self, "StreamClassifyDigits", type(self)._stream_digits, context=context),
                    draining=self.draining):
                yield answered.result().message
        except Exception as exc:
            fail(context, exc)

    async def _classify_digits(self, request: pb.ClassifyDigitsRequest) -> Answer:
        model = self.model(request.model, request.version, ("digits",), "ClassifyDigits")
        self.check_count(len(request.images), "images")
        return await self._digits_answer(model, request)

    async def _digits_answer(self, model: ServedModel, request: pb.ClassifyDigitsRequest, *,
                             wait_for_room: bool = False) -> Answer:
        """Decode, classify and answer ``request`` with ``model``, found and its item count checked."""
        x = await self._digit_tensor(request.images, model.card.preprocessing)
        model, outputs = await self.infer(model, {model.card.inputs[0].name: x}, pinned=bool(request.version),
                                          wait_for_room=wait_for_room)
        predictions = [pb.DigitPrediction(digit=p.digit, confidence=p.confidence, probabilities=p.probabilities)
                       for p in postprocess.digit_predictions(outputs[model.card.outputs[0].name])]
        reply = pb.ClassifyDigitsResponse(model=model.name, model_version=model.version, predictions=predictions,
                                          id=request.id)
        return Answer(reply, model.name, len(predictions), model.version)

    ClassifyDigits = rpc("ClassifyDigits")(_classify_digits)

    async def _stream_digits(self, request: pb.ClassifyDigitsRequest) -> Answer:
        """A stream's request waits for room in a full queue instead of failing; its images are decoded only
        within the model's stream budget (``ItemBudget``), so waiting requests do not pile up decoded."""
        model = self.model(request.model, request.version, ("digits",), "StreamClassifyDigits")
        self.check_count(len(request.images), "images")  # refused at once, not after waiting for the whole budget
        budget = self._stream_budgets.setdefault(model.name, ItemBudget(self._stream_budget_items))
        async with budget.hold(len(request.images)):
            return await self._digits_answer(model, request, wait_for_room=True)

    async def _digit_tensor(self, images: Sequence[pb.Image], prep: dict) -> np.ndarray:
        """Images -> the model's float32 [n, 1, h, w]; encoded files go to the decoder, which picks where
        they decode, raw pixels (no decoding to speak of) are converted here, as one array when all are."""
        sources = {image.WhichOneof("source") for image in images}
        if sources == {"encoded"}:
            return await self.decoder.decode([image.encoded for image in images], prep)
        if sources == {"pixels"}:
            pixels = [image.pixels for image in images]
            if len(pixels) <= INLINE_PIXEL_IMAGES:
                return pixels_to_digits(pixels, prep)
            return await asyncio.to_thread(pixels_to_digits, pixels, prep)
        if len(images) == 1:
            return _decode_image(images[0], 0, prep)[None]
        return await asyncio.to_thread(_decode_images, images, prep)

    @rpc("ClassifyDiabetes")
    async def ClassifyDiabetes(self, request: pb.ClassifyDiabetesRequest) -> Answer:
        model = self.model(request.model, request.version, ("diabetes",), "ClassifyDiabetes")
        self.check_count(len(request.records), "records")
        outputs = await model.infer(model_inputs(model.card, [r.features for r in request.records]))
        predictions = [pb.DiabetesPrediction(label=p.label, probability=p.probability)
                       for p in postprocess.diabetes_predictions(outputs[model.card.outputs[0].name])]
        reply = pb.ClassifyDiabetesResponse(model=model.name, model_version=model.version, predictions=predictions)
        return Answer(reply, model.name, len(predictions), model.version)

    @rpc("ClassifySequences")
    async def ClassifySequences(self, request: pb.ClassifySequencesRequest) -> Answer:
        model = self.model(request.model, request.version, ("names", "hello"), "ClassifySequences")
        self.check_count(len(request.texts), "texts")
        card, texts = model.card, list(request.texts)
        logits = (await model.infer(model_inputs(card, texts)))[card.outputs[0].name]
        if card.task == "names":
            results = postprocess.names_predictions(logits, card.labels, request.top_k)
        else:
            results = postprocess.hello_predictions(logits, texts, card.preprocessing["vocabulary"])
        predictions = [pb.SequencePrediction(label=p.label, confidence=p.confidence,
                                             top=[pb.LabelScore(label=label, score=score) for label, score in p.top])
                       for p in results]
        reply = pb.ClassifySequencesResponse(model=model.name, model_version=model.version, predictions=predictions)
        return Answer(reply, model.name, len(predictions), model.version)


def _decode_image(image: pb.Image, index: int, prep: dict) -> np.ndarray:
    """One ``Image`` -> float32 [1, 28, 28]; errors name the image's position in the request."""
    source = image.WhichOneof("source")
    try:
        if source == "encoded":
            return decode_digit(image.encoded, prep)
        if source == "pixels":
            return pixels_to_digit(image.pixels, prep)
    except InputError as e:
        raise type(e)(f"image {index}: {e}") from e
    raise InputError(f"image {index} is empty: set `encoded` (an image file) or `pixels` (784 raw bytes)")


def _decode_images(images: Sequence[pb.Image], prep: dict) -> np.ndarray:
    return np.stack([_decode_image(image, i, prep) for i, image in enumerate(images)])
