"""The PyTriton peer: NVIDIA Triton, through PyTriton, serving one ONNX file with ONNX Runtime in a Python callable.

Triton's Python backend stub passes each batch to this process, where ``infer`` runs it: the peer is
tritonserver -> Python backend stub -> this process -> ONNX Runtime, not Triton's own ONNX Runtime backend.

Run by ``bench.triton_peer`` under the separate Python 3.12 interpreter that has ``nvidia-pytriton``;
it imports only numpy, onnxruntime and pytriton (never this project), as a user deploying the same
``model.onnx`` on Triton would write it. Triton's dynamic batcher is given the same limits as
CourseZoo's (most items per run, longest wait), and ONNX Runtime the same session configuration entries
(spinning off) and CUDA options, passed in by ``bench.triton_peer`` from ``serving.runtime``, so the two
servers differ in their serving stack only (each keeps its own threading: ORT's default pool here).
Writes the execution provider to ``--ready-file`` once the model is loaded (a file, not stdout: Triton's
own log shares stdout and can split a marker line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--input-shape", required=True, help="per-item shape, e.g. 1,28,28")
    p.add_argument("--output", required=True)
    p.add_argument("--output-shape", required=True, help="per-item shape, e.g. 10")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=1000)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--session-config", type=json.loads, default={}, help="ORT session config entries (JSON)")
    p.add_argument("--cuda-options", type=json.loads, default={}, help="CUDA execution provider options (JSON)")
    args = p.parse_args()

    options = ort.SessionOptions()
    for key, value in args.session_config.items():
        options.add_session_config_entry(key, value)
    providers: list[str | tuple[str, dict]] = ["CPUExecutionProvider"]
    if args.device == "cuda":
        ort.preload_dlls()
        providers.insert(0, ("CUDAExecutionProvider", args.cuda_options))
    session = ort.InferenceSession(args.onnx, options, providers=providers)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {args.output: session.run([args.output], {args.input: inputs[args.input]})[0]}

    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(d) for d in text.split(","))

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name, infer_func=infer,
            inputs=[Tensor(name=args.input, dtype=np.float32, shape=shape(args.input_shape))],
            outputs=[Tensor(name=args.output, dtype=np.float32, shape=shape(args.output_shape))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
        )
        staged = args.ready_file.with_suffix(".tmp")
        staged.write_text(session.get_providers()[0], encoding="utf-8")
        staged.rename(args.ready_file)  # whole or absent, never half-written
        triton.serve()


if __name__ == "__main__":
    main()
