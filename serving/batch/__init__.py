"""``coursezoo batch``: classify whole folders of images, CSV files and name lists into one results file.

The package is a small streaming pipeline, one concern per module:
``discover`` (INPUT arguments -> files, kind inference) -> ``items`` (files -> items: images, CSV rows,
text lines) -> ``prepare`` (items -> model inputs, in worker processes) -> ``engines`` (model inputs ->
predictions: in-process ONNX Runtime, the gRPC server, or a Ray cluster) -> ``output`` (rows -> CSV / JSON Lines,
atomically, resumable), with ``pipeline`` keeping everything ordered and bounded and ``summary``
reporting the run. ``cli`` wires them together.
"""
