"""The `ar3d` command line: `ar3d demo | pretrain | info | explain | finetune | segment | scribble | findings | evaluate`.

Each subcommand is a module here with a `COMMAND`: a name, a one-line help, a function that adds its
arguments and a function that runs it (a thin layer over a core function) and returns the exit
code. Add one by writing such a module and listing it in `COMMANDS`. Heavy imports (torch, the
model) happen inside the run functions so that `ar3d --help` is instant.

Errors (`model_core.errors`): bad input (`Ar3dInputError`: files, arguments, checkpoints) prints
`ar3d: error: <message>` on stderr and exits with code 2, without a traceback, as argparse errors
do; the machine's limits (`Ar3dEnvironmentError`: disk full, out of memory) and a failed training run
(`TrainingError`) print one line that says what to do and exit with code 1; anything else is a bug
and keeps its traceback. Warnings from the core (e.g. "CUDA out of memory ...; falling back to CPU")
print as `ar3d: warning: <message>`.

Model size on the command line: `--config` takes a size (tiny, small, base) or a JSON file (a
ViT3DConfig dict, or a checkpoint's config.json whose "encoder" is used), and `--set KEY=VALUE`
(repeatable) overrides single fields, e.g. `--config tiny --set width=32 --set depth=2`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from model_core.cli import demo, evaluate, explain, findings, finetune, info, pretrain, scribble, segment
from model_core.errors import Ar3dError, Ar3dInputError

COMMANDS = [module.COMMAND
            for module in (demo, pretrain, info, explain, finetune, segment, scribble, evaluate, findings)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ar3d", description="napari-ar3d: pretrain, fine-tune and inspect 3D CT/MRI encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _one_line(err: Exception) -> str:
    """The message of an error, also when a DataLoader worker wrapped it with its traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    last = lines[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings from the core (a modality mismatch, an out-of-memory fallback) as one line on stderr."""
    print(f"ar3d: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ar3d` with `argv` (default: sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except Ar3dInputError as err:
        print(f"ar3d: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Ar3dError as err:  # the machine's limits, a failed training run
        print(f"ar3d: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
