"""Folders written whole or not at all: built in a hidden sibling, flushed, then renamed into place.

An export, a prepared corpus: whatever a crash or a kill interrupts, the folder a user points at is
either the previous complete one or the new complete one, never a mix.
"""

from collections.abc import Collection
from contextlib import contextmanager
import os
from pathlib import Path
import shutil
import uuid

from scratchlm.errors import ScratchLMError


def check_destination(
    out: Path, *, label: str, what: str, owned: Collection[str], overwrite_flag: str | None = None,
    overwrite: bool = False,
) -> None:
    """Refuse an ``out`` that writing ``what`` there would damage, before anything is written: a
    file in its place; a folder holding any entry whose name is not in ``owned`` (the user's files,
    a run folder with its checkpoints, another tool's output), whatever the flags say, since the
    whole folder is replaced; and, where the writer asks first (``overwrite_flag``), a previous
    output of its own without that flag. Messages call the folder ``label`` ("export folder")."""
    if out.exists() and not out.is_dir():
        raise ScratchLMError(f"{label} {out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in owned)
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ScratchLMError(
            f"{label} {out} holds files that are not {what}'s ({shown}); choose another folder"
        )
    if overwrite_flag is not None and not overwrite:
        raise ScratchLMError(f"{label} {out} holds {what}; pass {overwrite_flag} to replace it, or choose another folder")


@contextmanager
def staging_folder(out: Path):
    """A fresh hidden sibling of ``out`` (same filesystem, so renames are atomic), removed on
    the way out unless it has become ``out``."""
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def flush_to_disk(folder: Path) -> None:
    """fsync every file (subfolders too), then the folders: after a power loss the renamed folder
    must not turn out to hold empty or torn files (the rename can reach the disk before the data does)."""
    for path in folder.iterdir():
        if path.is_dir():
            flush_to_disk(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``; the old ``out``, if any, is deleted only after."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
