"""The one atomic file writer of the package: every product, record, report, figure,
manifest, download and simulated file goes through :func:`atomic_file`.

A file is written under a temporary name beside its destination and renamed into place
only when complete, so a reader never sees a partial file and a killed writer leaves the
destination as it was.  ``fsync=True`` also flushes the file to disk before the rename,
so that a crash of the whole machine cannot leave a complete-looking but empty or short
file under the final name (the workflow's ``fsync`` key).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["EXISTS_MESSAGE", "atomic_copy", "atomic_file", "atomic_write",
           "atomic_write_bytes", "atomic_write_text"]

EXISTS_MESSAGE = "output exists (replace it with --overwrite, or overwrite=True in Python)"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True,
                fsync: bool = False, encoding: str | None = None,
                newline: str | None = None) -> Iterator:
    """Open a temporary file beside ``path``; rename it to ``path`` when the block ends.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory is created if needed.
    mode : {"wb", "w"}
        Binary or text.
    overwrite : bool
        Replace an existing ``path``.  If False, an existing ``path`` (also one that
        appears while writing) raises ``FileExistsError`` and is left alone.
    fsync : bool
        Flush the file to disk before the rename.
    encoding, newline : str, optional
        For text mode (default UTF-8; ``newline=""`` writes line ends untranslated).

    Yields
    ------
    file object
        The open temporary file.  If the block raises, the temporary file is removed and
        ``path`` is left as it was.

    Notes
    -----
    The file gets the permissions an ordinary ``open`` would give it (0666 less the
    umask), not the private 0600 of the temporary file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: {EXISTS_MESSAGE}")
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        _publish(temporary, path, overwrite)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _publish(temporary: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, path)
        return
    # A hard link fails if the name was taken meanwhile: no silent clobbering.
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: {EXISTS_MESSAGE}") from None
    except OSError:  # a file system without hard links
        os.replace(temporary, path)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path, write, *, text: bool = False, fsync: bool = False):
    """Fill ``path`` with ``write(handle)`` through :func:`atomic_file`; returns ``path``.

    ``text`` opens the file in text mode (UTF-8, line ends untranslated).
    """
    with atomic_file(path, "w" if text else "wb", newline="" if text else None,
                     fsync=fsync) as handle:
        write(handle)
    return path


def atomic_write_text(path, text: str, *, fsync: bool = False):
    """Write a text file atomically (UTF-8); returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text), text=True, fsync=fsync)


def atomic_write_bytes(path, chunks: Iterable[bytes], *, overwrite: bool = True,
                       fsync: bool = False):
    """Write the concatenated ``chunks`` atomically; returns ``path``."""
    with atomic_file(path, overwrite=overwrite, fsync=fsync) as handle:
        for chunk in chunks:
            handle.write(chunk)
    return path


def atomic_copy(source, path):
    """Put the content of ``source`` at ``path`` atomically; returns ``path``.

    A hard link under a temporary name, renamed into place (no space used, nothing
    copied), where the file system allows it; otherwise a copy through
    :func:`atomic_file`.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(temporary)
        os.link(source, temporary)
        os.replace(temporary, path)
    except OSError:
        with atomic_file(path) as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
