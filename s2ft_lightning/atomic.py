"""Write a directory all-or-nothing: build it under a temporary name next to the target, then rename it in.

Used for adapters, merged model folders and the prepared demo model: an interrupted or failed write never
leaves a half-written directory, and a failed rewrite leaves the previous one in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(root: Path) -> None:
    """chmod ``root`` and what it holds to the modes a plain ``open()`` / ``mkdir()`` would have given them."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):  # chmod would follow the link
                    os.chmod(path, mode & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``path`` (replacing an old one if ``replace``).

    The directory and everything written into it get the usual permissions (0o777 / 0o666 minus the umask), not
    ``mkdtemp``'s private 0o700 or the 0o600 that safetensors gives its files, so other users and server processes
    read them like any other file of the run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; remove it or pass another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        yield tmp
        _usual_permissions(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
