"""A served model as Triton describes one: its model configuration (``ModelConfig``) and statistics.

Clients written for Triton read these: ``tritonclient``'s ``get_model_config`` for the batch limit and the
tensors without the batch axis, perf_analyzer and dashboards ``get_inference_statistics``. The
configuration is derived from the card and the settings the model runs with (one place per fact), as
Triton's own auto-completed configuration of an ONNX model would say it:
- ``max_batch_size`` is the most rows one request may carry (``--max-items-per-request``), which is what
  Triton refuses beyond; the cards' tensors all have the batch axis first, which ``dims`` leave out. An
  input of one value per item (``names_gru``'s ``lengths``, card shape ``[-1]``) is ``dims [1]`` reshaped
  to ``[]``, as Triton requires (empty dims are invalid there, and clients such as PyTriton's refuse
  them); ModelInfer takes it as ``[n, 1]`` or ``[n]``;
- ``dynamic_batching`` is present while batching is on: its delay is ``--max-queue-delay-ms`` and its
  preferred batch size the most items a merged batch holds (``--max-batch-size``);
- ``version_policy`` is ``all`` (every version directory is served, the newest by default), or ``latest``
  with ``--latest-versions`` N;
- ``instance_group`` says where ONNX Runtime runs the model (one instance: runs are serialised per model).
"""

from __future__ import annotations

from serving.card import ONNX_FILE, TensorSpec
from serving.protos import inference_pb2 as pb
from serving.protos import model_config_pb2 as mc
from serving.repository import ServedModel
from serving.runtime import CPU
from serving.statistics import Duration

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for the ONNX Runtime backend
BACKEND = "onnxruntime"


def model_config(model: ServedModel) -> mc.ModelConfig:
    """Triton's model configuration of ``model`` (see the module docstring)."""
    settings = model.settings
    config = mc.ModelConfig(
        name=model.name, platform=PLATFORM, backend=BACKEND, max_batch_size=settings.max_items_per_request,
        version_policy=_version_policy(settings.latest_versions),
        input=[_model_input(t) for t in model.card.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=_data_type(t.datatype), dims=t.shape[1:])
                for t in model.card.outputs],
        instance_group=[_instance_group(model)], default_model_filename=ONNX_FILE,
    )
    if settings.max_batch_size > 1:
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=[settings.max_batch_size],
            max_queue_delay_microseconds=round(settings.max_queue_delay_ms * 1000)))
    return config


def _version_policy(latest: int) -> mc.ModelVersionPolicy:
    if latest:
        return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=latest))
    return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())


def _model_input(spec: TensorSpec) -> mc.ModelInput:
    if len(spec.shape) == 1:  # one value per item: see the module docstring
        return mc.ModelInput(name=spec.name, data_type=_data_type(spec.datatype), dims=[1],
                             reshape=mc.ModelTensorReshape(shape=[]))
    return mc.ModelInput(name=spec.name, data_type=_data_type(spec.datatype), dims=spec.shape[1:])


def _data_type(datatype: str) -> int:
    """KServe datatype ("FP32") -> Triton's configuration enum (TYPE_FP32); strings are BYTES on the wire."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _instance_group(model: ServedModel) -> mc.ModelInstanceGroup:
    on_cpu = model.provider == CPU
    kind = mc.ModelInstanceGroup.KIND_CPU if on_cpu else mc.ModelInstanceGroup.KIND_GPU
    return mc.ModelInstanceGroup(name=f"{model.name}_0", kind=kind, count=1, gpus=[] if on_cpu else [0])


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    """``model``'s counts and durations since it loaded (serving.statistics)."""
    stats = model.statistics
    return pb.ModelStatistics(
        name=model.name, version=model.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_input=_duration(batch.compute_input),
                                             compute_infer=_duration(batch.compute_infer),
                                             compute_output=_duration(batch.compute_output))
                     for size, batch in sorted(stats.batches.items())],
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)
