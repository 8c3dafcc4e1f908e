"""What a checkpoint's provenance may say about files: their names and sha256, never their paths.

A folder name can hold a patient's name, so config.json records a file by its name and the sha256
of its contents (`describe_file`), and a command line with every path reduced to its file name
(`command_text`). `strip_paths` is the safety net: it reduces any absolute path left in a text to
its file name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_core.errors import Ar3dInputError

_CHUNK = 1 << 20  # bytes read at a time while hashing
# An absolute path (POSIX, home-relative, Windows drive or UNC) at the start of a text or after a
# space, "=", "(", a quote, "[" or ",": the characters that come before a path in a command or a sentence.
_ABSOLUTE_PATH = re.compile(r"""(?<![^\s=("'\[,])(?:~|[A-Za-z]:)?[/\\][^\s"',;)\]]+""")


def describe_file(path: str | os.PathLike) -> dict[str, str]:
    """{"name": the file's name, "sha256": of its bytes}; for a folder (a DICOM series), the sha256 of
    its files' sha256 digests in the sorted order of their paths inside it (hidden files left out)."""
    path = Path(path)
    if path.is_file():
        return {"name": path.name, "sha256": _sha256_file(path)}
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
            digest.update(_sha256_file(file).encode())
        return {"name": path.resolve().name, "sha256": digest.hexdigest()}
    raise Ar3dInputError("no such file or folder", path)


def describe_weights(folder: str | os.PathLike, weights_file: str) -> dict[str, str]:
    """A checkpoint folder: {"name": the folder's name, "sha256": of its weights file}."""
    folder = Path(folder).resolve()
    return {"name": folder.name, "sha256": describe_file(folder / weights_file)["sha256"]}


def describe_source(item: str | os.PathLike) -> dict[str, str] | str:
    """A data source as pretraining provenance records it: an existing file or folder by `describe_file`,
    anything else (a generated-data spec such as "phantoms") as its text, paths reduced to file names."""
    if Path(item).exists():
        return describe_file(item)
    return strip_paths(os.fspath(item))


def command_text(argv: Sequence[str], program: str = "ar3d") -> str:
    """A command line for provenance: every argument that names a path reduced to its file name
    ("--out=/data/run" too); options and values that are not paths stay as typed."""
    return " ".join([program, shlex.join(_without_path(a) for a in argv)]).strip()


def _without_path(arg: str) -> str:
    if arg.startswith("--") and "=" in arg:
        option, _, value = arg.partition("=")
        return f"{option}={file_name(value)}"
    return file_name(arg)


def file_name(text: str) -> str:
    """The last component of a path ("/a/b/c.nii.gz" -> "c.nii.gz"), either separator; `text` without one."""
    parts = [p for p in re.split(r"[/\\]", text) if p]
    return parts[-1] if parts else text


def strip_paths(value: Any) -> Any:
    """`value` (JSON: a text, or lists and objects of them) with every absolute path in a text reduced to its
    file name; a new object, `value` is untouched."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda m: file_name(m.group(0)), value)
    if isinstance(value, list):
        return [strip_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: strip_paths(v) for k, v in value.items()}
    return value


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
