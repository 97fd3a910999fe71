"""Checkpoint files that never tear: written beside their final name, then renamed into place.

Lightning's own ``TorchCheckpointIO`` serialises into memory and hands the bytes to fsspec, whose
local "transaction" writes a temporary file in the system temp folder and moves it into place on
commit. When that folder is on another filesystem than the run (a tmpfs ``/tmp``, the usual case
on clusters), the move is a copy into the final path, and a kill during the copy leaves a torn
``last.ckpt`` where the good one was. Here the temporary file lives in the checkpoint's own folder,
so the final step is one ``os.replace``: atomic on POSIX and Windows alike.
"""

import os
from pathlib import Path
from typing import Any
import uuid
import zipfile

from lightning.pytorch.plugins.io import TorchCheckpointIO
import torch

from scratchlm.errors import ScratchLMError

PARTIAL_MARK = ".partial-"
"""Part of the name of a file still being written (``.<name>.partial-<hex>``); see ``stale_partials``."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic: a checkpoint path holds either the previous
    complete file or the new complete file, whenever the process dies."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        """Lightning's load, with one clear error for a checkpoint (``--ckpt_path``) that is
        missing, a folder, torn or not a checkpoint at all, naming the others beside it."""
        path = Path(path)
        check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as error:  # torn inside a valid archive, or not ours at all
            reason = str(error).strip().split("\n")[0].split(". ")[0]
            raise unreadable(path, f"{type(error).__name__}: {reason}") from None


def check_checkpoint_file(path: Path) -> None:
    """Refuse, before anything loads or writes, a ``--ckpt_path`` that is a folder, is missing, or
    is no ``torch.save`` archive (a copy cut short loses the archive's closing directory)."""
    if path.is_dir():
        raise ScratchLMError(f"--ckpt_path {path} is a folder; {checkpoints_beside(path)}")
    if not path.is_file():
        raise ScratchLMError(
            f"--ckpt_path {path} does not exist; check the path (--ckpt_path last resumes the run "
            "directory's own last checkpoint)"
        )
    if not zipfile.is_zipfile(path):
        raise unreadable(path, "not a complete torch.save archive")


def unreadable(path: Path, reason: str) -> ScratchLMError:
    return ScratchLMError(f"--ckpt_path {path} cannot be read ({reason}); it is torn or not a checkpoint: "
                          f"{checkpoints_beside(path)}")


def checkpoints_beside(path: Path) -> str:
    """What to do instead of resuming from ``path``: the other checkpoints in its folder (for a
    folder, those inside it), newest first."""
    folder = path if path.is_dir() else path.parent
    others = sorted((p for p in folder.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return "give the path of a checkpoint written by scratchlm fit (<run dir>/checkpoints/*.ckpt)"
    return "resume from another checkpoint there: " + ", ".join(str(p) for p in others[:3])


def write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a hidden sibling of ``path``, flush it to disk, rename it to ``path``.

    The data reach the disk before the rename does (fsync of the file, then of the folder), so a
    power loss cannot leave the new name pointing at empty blocks.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # folders cannot be opened for fsync on Windows; NTFS journals renames
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def stale_partials(folder: Path) -> list[Path]:
    """Files a killed writer left behind in ``folder`` (never a complete checkpoint)."""
    return sorted(folder.glob(f".*{PARTIAL_MARK}*")) if folder.is_dir() else []
