"""Files ctk writes get the permissions any new file gets (``0666`` less the umask).

``tempfile.mkstemp`` (atomic writes) and safetensors create files readable by their owner only (0600), so
another account could not read a model file or tiny-model weights it was given.
"""

from __future__ import annotations

import os
from pathlib import Path


def new_file_mode() -> int:
    """``0o666`` less the process umask (as ``open()`` would create a file)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def respect_umask(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file would have."""
    os.chmod(path, new_file_mode())
