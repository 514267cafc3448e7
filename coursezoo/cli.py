"""The ``coursezoo`` console script: one entry point, subcommands imported lazily.

Each subcommand lives in its own module with ``get_args_parser`` and ``main(args)``; only the chosen
one is imported, so ``coursezoo serve`` and ``coursezoo batch`` never import torch.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from types import ModuleType

from coursezoo import logs, version

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train", "train course models on their real data sets"),
    "export": ("training.export", "export trained models to TorchScript + ONNX with a model card"),
    "eval": ("training.evaluate", "re-evaluate exported ONNX models on the held-out data"),
    "serve": ("serving.server", "run the gRPC inference server"),
    "batch": ("serving.batch.cli", "classify folders of images, CSV files and name lists"),
    "bench": ("bench.harness", "measure every inference path side by side"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: coursezoo COMMAND [options] | coursezoo --version   (coursezoo COMMAND --help: its options)\n\n"
            "commands:\n"
            + "\n".join(lines))


def _import_uninterrupted(name: str) -> ModuleType | None:
    """Import a command's module (serve's imports take ~0.3 s), or None if SIGINT came meanwhile. The signal waits
    for the import to end: raised inside it, it was a traceback and exit 1, or "ImportError: initialization
    failed" when it hit an extension module's set-up. From a thread other than the main one (which can set no
    signal handler, and never gets SIGINT) a plain import."""
    if threading.current_thread() is not threading.main_thread():
        return importlib.import_module(name)
    interrupted = False

    def note(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        module = importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, previous)
    return None if interrupted else module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(f"coursezoo {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"coursezoo: unknown command {argv[0]!r}", file=sys.stderr)
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = _import_uninterrupted(COMMANDS[argv[0]][0])
    if module is None:  # Ctrl-C, or a stop signal to the process group, while the command loaded: nothing was done
        return 0 if argv[0] == "serve" else 130  # a stopped server exits 0, as it does once serving
    parser = module.get_args_parser()
    parser.prog = f"coursezoo {argv[0]}"
    try:
        logs.setup()
    except logs.LogLevelError as e:  # the command's own usage error: its exit status (batch's 2 means "some inputs")
        parser.error(str(e))
    return int(module.main(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
