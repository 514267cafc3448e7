"""Generated gRPC code for ``protos/``: built with grpcio-tools, never committed, imported from here.

``python -m serving.protos`` (what ``make protos`` runs) writes the modules into ``serving/_generated/``.
Importing one of them through this module (``from serving.protos import classifier_pb2``) generates them
first when they are missing or older than their ``.proto`` sources, so a fresh checkout or an edited
proto never needs a manual step; grpcio-tools is a runtime dependency for that reason.

protoc writes absolute imports that mirror the proto package (``from coursezoo.v1 import ...``), which
would collide with the ``coursezoo`` Python package; they are rewritten to ``serving._generated.*``.

Caveat: the ``inference`` messages share their full names with ``tritonclient``'s bundled stubs, and
protobuf keeps one global descriptor pool, so one process cannot import both ``inference_pb2`` and
``tritonclient.grpc`` (the tests talk to the KServe service through tritonclient only).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parents[1] / "protos"
GENERATED_DIR = Path(__file__).resolve().parent / "_generated"
STAMP_FILE = "SOURCES.sha256"

#: public name -> generated module (import path relative to serving._generated)
MODULES = {
    "classifier_pb2": "coursezoo.v1.classifier_pb2",
    "classifier_pb2_grpc": "coursezoo.v1.classifier_pb2_grpc",
    "inference_pb2": "inference.grpc_service_pb2",
    "inference_pb2_grpc": "inference.grpc_service_pb2_grpc",
    "model_config_pb2": "inference.model_config_pb2",
}
__all__ = ["generate", "ensure_generated", *MODULES]

_IMPORT = re.compile(r"^from (coursezoo|inference)((?:\.\w+)*) import ", re.MULTILINE)


def _sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _fingerprint() -> str:
    """Hash of the proto sources and the protoc version: a change to either means regenerate."""
    import grpc_tools

    h = hashlib.sha256(getattr(grpc_tools, "__version__", "").encode())
    for path in _sources():
        h.update(str(path.relative_to(PROTO_ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def generate(out: Path = GENERATED_DIR) -> list[Path]:
    """Run protoc on every ``.proto`` under ``protos/`` and install the modules into ``out`` atomically.

    Files are built in a temporary directory and moved in one by one with ``os.replace`` (the stamp
    last), so a server starting while another process generates never imports a half-written module.
    """
    from grpc_tools import protoc

    sources = _sources()
    if not sources:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = str(resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".generated-") as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *(str(p.relative_to(PROTO_ROOT)) for p in sources)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
        written = []
        for path in sorted(Path(tmp).rglob("*.py*")):
            rel = path.relative_to(tmp)
            text = _IMPORT.sub(r"from serving._generated.\1\2 import ", path.read_text(encoding="utf-8"))
            path.write_text(text, encoding="utf-8")
            for parent in [Path(tmp), *(Path(tmp) / p for p in rel.parents if str(p) != ".")]:
                (parent / "__init__.py").touch()
            written.append(rel)
        for path in sorted(Path(tmp).rglob("*")):
            target = out / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
        (Path(tmp) / STAMP_FILE).write_text(_fingerprint() + "\n", encoding="utf-8")
        os.replace(Path(tmp) / STAMP_FILE, out / STAMP_FILE)
    return [out / rel for rel in written]


def ensure_generated(out: Path = GENERATED_DIR) -> None:
    """Generate the modules unless ``out`` holds ones built from the current sources."""
    stamp = out / STAMP_FILE
    if not stamp.is_file() or stamp.read_text(encoding="utf-8").strip() != _fingerprint():
        generate(out)


def __getattr__(name: str) -> ModuleType:
    """Lazy access to the generated modules (PEP 562), so importing one never imports the others."""
    if name not in MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    ensure_generated()
    module = importlib.import_module(f"serving._generated.{MODULES[name]}")
    globals()[name] = module
    return module


def main() -> int:
    if GENERATED_DIR.exists():
        shutil.rmtree(GENERATED_DIR)
    for path in generate():
        print(path.relative_to(GENERATED_DIR.parents[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
