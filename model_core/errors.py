"""Errors that reach the user as one sentence (CLI: exit code 2, widgets: a notification)."""

from __future__ import annotations

import os


class Ar3dInputError(ValueError):
    """Bad input from the user: a file, a shape, an argument. The message names the problem."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message  # the message without the path
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(Ar3dInputError):
    """A checkpoint that cannot be loaded (pickle, missing files, wrong shapes, unknown architecture)."""
