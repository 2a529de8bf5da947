"""The one atomic file writer of the package: every product, record, report, figure,
manifest, download and simulated file goes through this module.

A file is written under a temporary name beside its destination and renamed into place
only when complete, so a reader never sees a partial file and a killed writer leaves the
destination as it was.  ``fsync=True`` also flushes the file to disk before the rename,
so that a crash of the whole machine cannot leave a complete-looking but empty or short
file under the final name (the workflow's ``fsync`` key).

Every output follows the umask: a published file gets the mode an ordinary ``open``
would give it (0666 less the umask), never the private 0600 of ``tempfile`` nor a fixed
mode.  A writer in progress holds an exclusive ``flock`` on its temporary file (the
kernel releases it when the process dies), so :func:`remove_stale_temporaries` removes
only what killed writers left behind.

:func:`atomic_file` (and :func:`atomic_write`, :func:`atomic_write_text`,
:func:`atomic_write_bytes`) write a new file; :func:`atomic_copy` puts an existing file
in place (a hard link where possible); :func:`publish` renames a temporary file that a
writer keeps itself (the archive's resumable ``.<name>.part`` download, which must
survive a killed job and so cannot have a random name) into place with the same rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["EXISTS_MESSAGE", "atomic_copy", "atomic_file", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "follow_umask", "publish",
           "remove_stale_temporaries"]

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
    fd, temporary = _locked_temporary(directory, path.name)
    try:
        # closing the file releases its lock, after the rename; everything is written
        # (a full disk raises here) before the name appears
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
            publish(temporary, path, overwrite=overwrite)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _locked_temporary(directory: Path, name: str) -> tuple[int, str]:
    """A new temporary ``.<name>.<random>.tmp`` in ``directory``, open and ``flock``-ed.

    Taken again if a stale-temporary cleanup removed the name between its creation and
    the lock.
    """
    while True:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.stat(temporary), os.fstat(fd)):
                return fd, temporary
        except FileNotFoundError:
            pass
        os.close(fd)


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode an ordinary ``open`` would have given it (0666 less the
    umask): a file made by ``tempfile`` is private (0600), a reused one may carry the
    mode of a run under another umask."""
    os.chmod(path, 0o666 & ~_umask())


def publish(temporary: str | os.PathLike, path: str | os.PathLike, *,
            overwrite: bool = True) -> Path:
    """Rename the complete file ``temporary`` to ``path``, with the umask's mode.

    Parameters
    ----------
    temporary : str or os.PathLike
        A file in the directory of ``path`` (a rename does not cross file systems).
        Flushing it (and ``fsync``) is the caller's business.
    path : str or os.PathLike
        Destination.
    overwrite : bool
        Replace an existing ``path``; if False, one that exists (also one that appeared
        meanwhile) raises ``FileExistsError`` and is left alone.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    follow_umask(temporary)
    _publish(os.fspath(temporary), path, overwrite)
    return path


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


def atomic_copy(source, path):
    """Put the content of ``source`` at ``path`` atomically; returns ``path``.

    A hard link under a temporary name, renamed into place (no space used, nothing
    copied; the file keeps its source's mode, since the two names share one inode, and
    the source is not changed), where the file system allows it; otherwise a copy
    through :func:`atomic_file`, which follows the umask.
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


def remove_stale_temporaries(path: str | os.PathLike,
                             suffixes: Iterable[str] = (".tmp",)) -> list[Path]:
    """Remove the temporary files ``.<name>.<random><suffix>`` beside ``path`` that
    writers killed mid-way (SIGKILL, a batch time limit) left behind.

    They are never complete and nothing resumes them.  A temporary file whose writer is
    still at work is locked (``flock``) and left alone, so another process's write of
    the same file goes on.  A fixed-name file such as ``.<name>.part`` does not match.

    Returns
    -------
    list of Path
        The files removed.
    """
    path = Path(path)
    removed = []
    for suffix in suffixes:
        pattern = f".{glob.escape(path.name)}.*{glob.escape(suffix)}"
        for stale in path.parent.glob(pattern):
            try:  # never follows a link, never waits on a FIFO
                fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    stale.unlink(missing_ok=True)
                    removed.append(stale)
            except BlockingIOError:  # its writer is still at work
                pass
            finally:
                os.close(fd)
    return removed


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

