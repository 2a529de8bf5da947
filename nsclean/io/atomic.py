"""Atomic file writes shared by the report, figure and workflow-record writers."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path, write, *, text=False):
    """Write ``path`` through a temporary file beside it, then rename it into place.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory is created if needed.
    write : callable
        ``write(handle)`` fills the open temporary file.
    text : bool
        Open the temporary file in text mode (UTF-8, newlines untranslated).

    Returns
    -------
    str
        ``path``.  A reader never sees a partial file; on any error the temporary file
        is removed and the destination is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        if text:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
        else:
            handle = os.fdopen(fd, "wb")
        with handle:
            write(handle)
        # mkstemp makes the file private (0600); reports, figures and records get the
        # mode the umask allows, like any file a program creates.
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text):
    """Write a text file atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text), text=True)
