"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) with Triton's repository extension.

Every model in the repository, the two regression models included, is served here under its
catalogue name with its card's tensor names, datatypes and shapes, so ``tritonclient[grpc]`` and any
other v2 client work unmodified. Tensors travel as typed ``contents``, raw buffers, or in system shared
memory regions the client registered (see codecs and ``serving.shared_memory``). Triton's extensions
that clients lean on are here too: the stream (``ModelStreamInfer``), the model configuration and the
statistics (see ``descriptions``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence

import grpc

from coursezoo import logs, version
from serving.metrics import Metrics
from serving.preprocess import InputError, quote
from serving.protos import inference_pb2 as pb
from serving.protos import inference_pb2_grpc
from serving.repository import ModelNotFound, ModelNotReady, ModelRepository, ServedModel, version_number
from serving.security import ModelControlOff, SharedMemoryOff
from serving.services.base import Answer, Handler, Settings, Unsupported, answer, fail, in_order, message_of, rpc
from serving.services.codecs import (
    check_request_parameters,
    class_count,
    decode_inputs,
    encode_classes,
    encode_output,
    select_outputs,
    shared_placement,
    squeeze_item_scalars,
)
from serving.services.descriptions import PLATFORM, model_config, model_statistics
from serving.services.health import HealthService
from serving.shared_memory import BYTE_SIZE, OFFSET, REGION, Region, SharedMemoryRegistry

#: Why model control (and with it changing log settings) is off, in its refusals
CONTROL_OFF = ("(--model-control: auto turns it on with a token or on a loopback host; --workers turns it off, as a "
               "change would reach one worker only)")
#: The stream reply parameter that marks a request's last reply
FINAL_RESPONSE = "triton_final_response"
#: Triton's names for the extensions served here (ServerMetadata): ``binary_tensor_data`` is raw buffers,
#: ``parameters`` request and tensor parameters
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics", "system_shared_memory",
              "binary_tensor_data", "parameters", "logging")


class InferenceService(Handler, inference_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 handlers; repository changes are pushed to the health service as they happen.

    ``model_control=False`` refuses RepositoryModelLoad/Unload (see ``serving.security``); the index
    stays readable. ``shared_memory=False`` refuses the system shared memory RPCs the same way.
    """

    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings,
                 health: HealthService, *, model_control: bool = True, shared_memory: bool = True) -> None:
        super().__init__(repository, metrics, settings)
        self.health = health
        self.model_control = model_control
        self.shared_memory = SharedMemoryRegistry(settings.max_message_bytes) if shared_memory else None
        extensions = EXTENSIONS if shared_memory else tuple(e for e in EXTENSIONS if e != "system_shared_memory")
        self.metadata = pb.ServerMetadataResponse(name="coursezoo", version=version(), extensions=extensions)

    @rpc("ServerLive")
    async def ServerLive(self, request: pb.ServerLiveRequest) -> Answer:
        return Answer(pb.ServerLiveResponse(live=True), "", 0)

    @rpc("ServerReady")
    async def ServerReady(self, request: pb.ServerReadyRequest) -> Answer:
        ready = any(m.ready for m in self.repository.models())
        return Answer(pb.ServerReadyResponse(ready=ready), "", 0)

    @rpc("ModelReady", model_field="name")
    async def ModelReady(self, request: pb.ModelReadyRequest) -> Answer:
        try:
            served: ServedModel | None = self.repository.get(request.name, request.version or None)
        except (ModelNotFound, ModelNotReady):
            served = None
        if served is None or not served.ready:
            return Answer(pb.ModelReadyResponse(ready=False), "", 0)
        return Answer(pb.ModelReadyResponse(ready=True), request.name, 0, served.version)

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> Answer:
        return Answer(self.metadata, "", 0)

    @rpc("ModelMetadata", model_field="name")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> Answer:
        model = self.repository.get(request.name, request.version or None)
        card = model.card
        tensor = pb.ModelMetadataResponse.TensorMetadata
        reply = pb.ModelMetadataResponse(
            name=model.name, platform=PLATFORM,
            versions=[m.version for m in self.repository.models() if m.name == model.name and m.ready],
            # one value per item is [-1, 1], as its configuration's dims [1] say (Triton's metadata of such an input)
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape if len(t.shape) > 1 else [*t.shape, 1])
                    for t in card.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in card.outputs],
        )
        return Answer(reply, model.name, 0, model.version)

    async def _infer(self, request: pb.ModelInferRequest, *, wait_for_room: bool = False) -> Answer:
        model = self.chose(self.repository.get(request.model_name, request.model_version or None))
        check_request_parameters(request.parameters)
        inputs = squeeze_item_scalars(decode_inputs(request.inputs, request.raw_input_contents, self.shared_memory,
                                                    model.card.inputs), model.card.inputs)
        model.validate(inputs)
        rows = len(next(iter(inputs.values())))
        self.check_count(rows, "rows (batch items)")
        requested = _requested_outputs(request.outputs)
        placements = {name: shared_placement(o) for name, o in requested.items()}
        if any(placements.values()) and self.shared_memory is None:
            raise InputError("an output names a shared memory region, but shared memory is off on this server "
                             "(--shared-memory): leave the output's parameters out")
        classes = {name: class_count(o) for name, o in requested.items()}
        if any(classes[name] and placement for name, placement in placements.items()):
            raise InputError("an output asks for classification and shared memory at once: classes are answered in "
                             "the reply; leave out one of the two parameters (as Triton requires)")
        held = _HeldOutputs()
        try:
            for name, placement in placements.items():  # the whole place the client named must be there, before a run
                if placement is not None and self.shared_memory is not None:
                    held.add(name, self.shared_memory, placement)
            model, outputs = await self.infer(model, inputs, pinned=bool(request.model_version),
                                              wait_for_room=wait_for_room)
            reply = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            for name, array in select_outputs(outputs, list(requested)):
                if classes.get(name):
                    datatype, shape, data = encode_classes(array, classes[name], model.card.labels)
                else:
                    datatype, shape, data = encode_output(array)
                tensor = reply.outputs.add(name=name, datatype=datatype, shape=shape)
                if name in held:
                    held.write(tensor, data)
                    data = b""  # an empty buffer keeps raw_output_contents in step with outputs, as clients index it
                reply.raw_output_contents.append(data)
        finally:
            held.let_go()
        return Answer(reply, model.name, rows, model.version)

    ModelInfer = rpc("ModelInfer", model_field="model_name")(_infer)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's stream: each request is answered on the stream, in order, pipelined (``in_order``).

        A request that fails is answered with its ``error_message`` and the stream goes on, as Triton's
        does (tritonclient hands it to the stream's callback as that request's error); the reply's
        ``infer_response`` carries the request's id, so a client can tell which failed. Only a message that
        cannot be read ends the stream, with INVALID_ARGUMENT, and a graceful stop, with UNAVAILABLE once the
        requests read are answered (``in_order``). Like every stream here, its requests wait
        for room in a full model queue rather than fail. Every reply is its request's last (one reply per
        request) and says so with Triton's ``triton_final_response`` parameter, which stream clients such as
        PyTriton's wait for.
        """
        try:
            async for answered in in_order(requests, functools.partial(self._stream_reply, context=context),
                                           draining=self.draining):
                yield answered.result()
        except Exception as exc:
            fail(context, exc)

    async def _stream_reply(self, request: pb.ModelInferRequest, *, context: grpc.aio.ServicerContext) \
            -> pb.ModelStreamInferResponse:
        try:
            result = await answer(self, "ModelStreamInfer", functools.partial(type(self)._infer, wait_for_room=True),
                                  request, "model_name", context=context)
        except Exception as exc:  # noqa: BLE001 - answered in the stream; answer() counted and logged it
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                           id=request.id)
            failed.parameters[FINAL_RESPONSE].bool_param = True
            return pb.ModelStreamInferResponse(error_message=message_of(exc), infer_response=failed)
        result.message.parameters[FINAL_RESPONSE].bool_param = True
        return pb.ModelStreamInferResponse(infer_response=result.message)

    @rpc("ModelConfig", model_field="name")
    async def ModelConfig(self, request: pb.ModelConfigRequest) -> Answer:
        model = self.repository.get(request.name, request.version or None)
        return Answer(pb.ModelConfigResponse(config=model_config(model)), model.name, 0, model.version)

    @rpc("ModelStatistics", model_field="name")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> Answer:
        """Every ready version of every model (``name`` ""; a version is then ignored, as by Triton), of one
        model (``version`` ""), or one version."""
        if not request.name:
            if request.version:
                version_number(request.version)  # still a well-formed request
            models = self.repository.models()
        elif request.version:
            models = [self.repository.get(request.name, request.version)]
        else:
            self.repository.get(request.name)  # NOT_FOUND or UNAVAILABLE, saying why
            models = [m for m in self.repository.models() if m.name == request.name]
        reply = pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])
        return Answer(reply, request.name, len(models))

    @rpc("SystemSharedMemoryStatus")
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest) -> Answer:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self._registry().status(request.name):
            status = reply.regions[region.name]
            status.name, status.key, status.offset, status.byte_size = (region.name, region.key, region.offset,
                                                                        region.byte_size)
        return Answer(reply, "", 0)

    @rpc("SystemSharedMemoryRegister")
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest) -> Answer:
        self._registry().register(request.name, request.key, request.offset, request.byte_size)
        return Answer(pb.SystemSharedMemoryRegisterResponse(), "", 0)

    @rpc("SystemSharedMemoryUnregister")
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest) -> Answer:
        self._registry().unregister(request.name)
        return Answer(pb.SystemSharedMemoryUnregisterResponse(), "", 0)

    @rpc("LogSettings")
    async def LogSettings(self, request: pb.LogSettingsRequest) -> Answer:
        """Triton's logging extension: the log settings, after applying the request's changes. Changing them is
        a control action, allowed where model control is (a token, or a loopback host; not under --workers,
        where it would reach one worker); reading them always is."""
        changes = {}
        for key, value in request.settings.items():
            if (kind := value.WhichOneof("parameter_choice")) is None:
                raise InputError(f"log setting {quote(key)} has no value: expected its bool_param, uint32_param or "
                                 "string_param")
            changes[key] = getattr(value, kind)
        if changes:
            if not self.model_control:
                raise ModelControlOff(f"changing log settings is off on this server, as model control is "
                                      f"{CONTROL_OFF}; reading them is allowed")
            try:
                logs.update_log_settings(changes)
            except logs.LogSettingError as e:
                raise InputError(str(e)) from None
        reply = pb.LogSettingsResponse()
        for key, value in logs.log_settings().items():
            field = {bool: "bool_param", int: "uint32_param", str: "string_param"}[type(value)]
            setattr(reply.settings[key], field, value)
        return Answer(reply, "", 0)

    def _registry(self) -> SharedMemoryRegistry:
        if self.shared_memory is None:
            raise SharedMemoryOff("system shared memory is off on this server (--shared-memory: auto turns it on "
                                  "for a loopback host only; --workers turns it off, as a region registered in one "
                                  "process would be unknown to the others): send tensors in the request")
        return self.shared_memory

    def close(self) -> None:
        """Close every shared memory region (the server is stopping)."""
        if self.shared_memory is not None:
            self.shared_memory.close()

    @rpc("RepositoryIndex", model_field="repository_name")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> Answer:
        _one_repository(request.repository_name)
        entries = [pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state,
                                                         reason=e.reason)
                   for e in await self.repository.listing() if not request.ready or e.state == "READY"]
        return Answer(pb.RepositoryIndexResponse(models=entries), "", len(entries))

    @rpc("RepositoryModelLoad", model_field="model_name")
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> Answer:
        self._check_model_control()
        _one_repository(request.repository_name)
        if request.parameters:
            raise Unsupported(f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: a model "
                              "loads as its card and ONNX file in the repository say; send the load without them")
        try:
            await self.repository.load(request.model_name)
        finally:
            await self.health.sync()
        return Answer(pb.RepositoryModelLoadResponse(), request.model_name, 0)

    @rpc("RepositoryModelUnload", model_field="model_name")
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest) -> Answer:
        self._check_model_control()
        _one_repository(request.repository_name)
        try:
            await self.repository.unload(request.model_name)
        finally:
            await self.health.sync()
        return Answer(pb.RepositoryModelUnloadResponse(), request.model_name, 0)

    def _check_model_control(self) -> None:
        if not self.model_control:
            raise ModelControlOff(f"model control is off on this server {CONTROL_OFF}: models change only through the "
                                  "repository")


def _one_repository(name: str) -> None:
    """The server has one repository; a request that names one would be answered from another (Triton refuses
    it too)."""
    if name:
        raise Unsupported(f"repository_name {quote(name)}: this server has one model repository (--repo); leave "
                          "repository_name empty")


def _requested_outputs(outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor]) \
        -> dict[str, pb.ModelInferRequest.InferRequestedOutputTensor]:
    """The requested outputs by name, in the client's order. A name asked for twice is answered once (as Triton
    answers it), but not with two sets of parameters: one of two places in shared memory went unwritten."""
    requested: dict[str, pb.ModelInferRequest.InferRequestedOutputTensor] = {}
    for output in outputs:
        first = requested.setdefault(output.name, output)
        if dict(first.parameters) != dict(output.parameters):
            raise InputError(f"output {quote(output.name)} is requested twice with different parameters: expected "
                             "each output once")
    return requested


class _HeldOutputs:
    """The regions a request's outputs go to, held from before the run until the reply is built: a region
    unregistered meanwhile still gets its output (Triton defers such an unregister too)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Region, int, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._held

    def add(self, name: str, registry: SharedMemoryRegistry, placement: tuple[str, int, int]) -> None:
        region_name, byte_size, offset = placement
        region = registry.region(region_name, f"output {name}")
        region.span(offset, byte_size, f"output {name}")
        self._held[name] = (region.hold(), byte_size, offset)

    def write(self, tensor: pb.ModelInferResponse.InferOutputTensor, data: bytes) -> None:
        """Put an output's bytes into its region, and say where in the reply (as Triton does)."""
        region, byte_size, offset = self._held[tensor.name]
        if byte_size < len(data):
            raise InputError(f"output {tensor.name!r} needs {len(data)} bytes, but its shared memory byte size is "
                             f"{byte_size}: expected at least {len(data)}")
        region.write(offset, data, f"output {tensor.name}")
        tensor.parameters[REGION].string_param = region.name
        tensor.parameters[BYTE_SIZE].int64_param = len(data)
        if offset:
            tensor.parameters[OFFSET].int64_param = offset

    def let_go(self) -> None:
        for region, _, _ in self._held.values():
            region.let_go()
        self._held.clear()
