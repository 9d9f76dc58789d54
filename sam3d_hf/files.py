"""Writing files and folders safely: every writer of the package goes through here.

A reader (another process, a user, a crash) sees either the old file or folder or the complete new one, never a
half-written one: files are written under a temporary name in the same folder and renamed over the target
([`atomic_write`]); folders are built in a hidden sibling ([`make_staging_folder`]) and swapped into place once
complete ([`replace_folder`], or both at once with [`staged_folder`]). What is written gets the modes `open()` /
`mkdir()` give under the user's umask ([`set_usual_modes`]), although temporary files and folders start private.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "make_staging_folder",
    "replace_folder",
    "set_usual_modes",
    "staged_folder",
    "write_json",
]


def _usual_mode(is_dir: bool) -> int:
    """The mode `open()` / `mkdir()` would give under the user's umask (mkstemp / mkdtemp give 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def set_usual_modes(folder: str | os.PathLike) -> None:
    """Give `folder` and everything under it the modes `open()` / `mkdir()` would give under the user's umask: folders
    made with `tempfile.mkdtemp` (0700) and files some writers create private (0600, e.g. `save_pretrained`'s
    safetensors) become readable as the user's other files are, before they are renamed into place."""
    folder = Path(folder)
    for item in [folder, *folder.rglob("*")]:
        item.chmod(_usual_mode(item.is_dir()))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Create or replace the file `path` atomically: `write(temporary)` fills a temporary file in the same folder,
    which gets the usual mode (umask respected) and is then renamed over `path`. A reader sees the old file or the
    complete new one, never a half-written one; on failure `path` is untouched and the temporary file is removed.
    `suffix` ends the temporary name, for writers that choose the format by extension (`.nii.gz`). A missing folder
    is an error that names it (folders are not created here)."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(
            f"cannot write {os.fspath(path)!r}: {os.fspath(path.parent)!r} is a file, not a folder"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {os.fspath(path)!r}: folder {os.fspath(path.parent)!r} does not exist; create it first"
        )
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as file:  # on disk before the rename, so a crash never exposes an empty file
            os.fsync(file.fileno())
        os.chmod(temporary, _usual_mode(is_dir=False))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """[`atomic_write`] of a UTF-8 text."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"), suffix=Path(path).suffix)


def write_json(path: str | os.PathLike, value: Any, *, make_parents: bool = False, **dumps_kwargs) -> None:
    """[`atomic_write`] of `json.dumps(value, indent=2, **dumps_kwargs)` and a final newline; `make_parents` creates
    the missing folders first."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=2, **dumps_kwargs) + "\n")


def make_staging_folder(target: str | os.PathLike, anchor: str | os.PathLike | None = None) -> Path:
    """A new, empty, hidden folder `.<target name>.partial-XXXX` in `anchor` (default: the target's parent, created
    if missing) to build `target` in; it lies on the target's file system, so [`replace_folder`] is a rename."""
    target = Path(target)
    anchor = Path(anchor) if anchor is not None else target.parent
    anchor.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=anchor))


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete folder `staging` to `target`, with the user's usual modes. An existing `target` is renamed
    away first and deleted only once the new folder is in place, so `target` is never half-old, half-new."""
    staging, target = Path(staging), Path(target)
    set_usual_modes(staging)  # mkdtemp made it 0700, and some writers make their files 0600
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if target.exists():
        retired = staging.with_name(f"{staging.name}.old")
        os.replace(target, retired)
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, anchor: str | os.PathLike | None = None) -> Iterator[Path]:
    """Build a folder atomically: `with staged_folder(target) as work: <write into work>`. On success `work` replaces
    `target` ([`replace_folder`]); on any error or interrupt it is deleted and `target` is left as it was."""
    work = make_staging_folder(target, anchor)
    try:
        yield work
        replace_folder(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
