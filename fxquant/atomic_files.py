"""Files written whole: to a temporary name beside the target, renamed when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: permissions of a written artifact (temporary files start owner-only)
PUBLISHED_MODE = 0o644


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike, mode: int = PUBLISHED_MODE) -> Iterator[Path]:
    """A temporary path beside `path` (its folder created) for the block to write; when the block
    completes it gets permissions `mode` and is renamed to `path`, when it raises it is removed.
    Readers never see a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
