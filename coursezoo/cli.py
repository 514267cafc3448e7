"""The ``coursezoo`` console script: one entry point, subcommands imported lazily.

Each subcommand lives in its own module with ``get_args_parser`` and ``main(args)``; only the chosen
one is imported, so ``coursezoo serve`` and ``coursezoo batch`` never import torch.
"""

from __future__ import annotations

import importlib
import sys

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
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = module.get_args_parser()
    parser.prog = f"coursezoo {argv[0]}"
    try:
        logs.setup()
    except logs.LogLevelError as e:  # the command's own usage error: its exit status (batch's 2 means "some inputs")
        parser.error(str(e))
    return int(module.main(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
