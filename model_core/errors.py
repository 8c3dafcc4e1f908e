"""The errors napari-ar3d raises on purpose, by whose move it is to fix them.

- `Ar3dInputError` (a `ValueError`): bad input from the user: a file, a shape, an argument. The message
  names the file and the problem. CLI: `ar3d: error: <message>`, exit code 2; widgets: a notification.
  `CheckpointError` is its kind for a model folder that cannot be used.
- `Ar3dEnvironmentError`: the machine cannot do it now (the disk is full, memory runs out). The
  message says what to do. CLI: one line, exit code 1.
- `TrainingError`: a training run failed on its own (the loss diverged). The message says what to
  change. CLI: one line, exit code 1.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class Ar3dError(Exception):
    """An error whose message is a sentence for the user (`path: problem`)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message  # the message without the path
        super().__init__(f"{self.path}: {message}" if self.path else message)


class Ar3dInputError(Ar3dError, ValueError):
    """Bad input from the user: a file, a shape, an argument. The message names the problem."""


class CheckpointError(Ar3dInputError):
    """A checkpoint that cannot be loaded (pickle, missing files, wrong shapes, unknown architecture)."""


class Ar3dEnvironmentError(Ar3dError):
    """The machine cannot do it now: no space left on the device, out of memory. The message says what to do."""


class TrainingError(Ar3dError):
    """A training run failed on its own, e.g. the loss became NaN. The message says what to change."""
