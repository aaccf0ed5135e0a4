"""Files ctk writes: the permissions any new file gets (``0666`` less the umask), and atomic writes whose
errors name the user's path and the real cause.

``tempfile.mkstemp`` (atomic writes) and safetensors create files readable by their owner only (0600), so
another account could not read a model file or tiny-model weights it was given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ctk.errors import CtkError


def new_file_mode() -> int:
    """``0o666`` less the process umask (as ``open()`` would create a file)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def respect_umask(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file would have."""
    os.chmod(path, new_file_mode())


class OutputError(CtkError):
    """An output path cannot be written; the message names the path the user gave and the real cause."""


def _nearest_existing(path: Path) -> Path:
    for folder in path.parents:
        if folder.exists():
            return folder
    return Path(path.anchor or ".")


def check_output(path: str | Path) -> None:
    """Raise :class:`OutputError` unless a file can be created at ``path`` now (checked before long work,
    such as training, and before writing): a folder in the way, a file where a folder should be, a folder
    that refuses new files (read-only, no permission, ``/proc``)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")
    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ctk-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create files in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary path)`` and rename it into place, so a failed write never
    leaves a half-written file under the final name. Errors name ``path`` and the real cause, never the
    temporary file."""
    path = Path(path)
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the final name last, so pandas infers the same compression (x.csv.gz) from the temporary one
        fd, name = tempfile.mkstemp(prefix=".partial-", suffix=f"-{path.name}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    tmp = Path(name)
    try:
        write(tmp)
        respect_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
