"""The results directory of a workflow run: checked before the run, and locked during it.

Snakemake locks the outputs of runs started in the *same* working directory
(``.snakemake/locks``).  Two runs started in different directories with the same
``results`` are not locked against each other, and one run's cleanup of stale temporary
files could remove the other's download in progress.  So the workflow takes a lock file
of its own, ``<results>/.nsclean-run.lock``, holding the PID, host and working directory
of the run that owns it:

- a second run stops before any job, with one message saying who holds the directory;
- a lock left by a run that was killed (SIGKILL, a crash) is taken over when its PID is
  gone on this host; on another host nothing can be checked, and the message says which
  file to remove once that run is known to be gone.

The lock is an ``O_EXCL`` create, which is atomic on local file systems and on NFS v3+.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "ResultsLocked", "acquire_results_lock", "check_results_dir",
           "release_results_lock"]

LOCK_NAME = ".nsclean-run.lock"


class ResultsLocked(RuntimeError):
    """Another run holds the results directory; the message says which."""


def check_results_dir(results: str | os.PathLike) -> str | None:
    """Why ``results`` cannot be the output directory of a run, or None if it can.

    Parameters
    ----------
    results : path
        The ``results`` key of the configuration.

    Returns
    -------
    str or None
        One line naming the path and the problem (a file, not a directory; a parent
        that is a file; not writable).
    """
    path = Path(results)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == path else f"would be inside {probe}, which is"
        return f"results: {path} {where} a file, not a directory"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"results: cannot create or write {path} ({probe} is not writable)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def acquire_results_lock(results: str | os.PathLike) -> Path:
    """Take the results directory for this process (see the module documentation).

    Parameters
    ----------
    results : path
        The results directory (created if needed).

    Returns
    -------
    Path
        The lock file.

    Raises
    ------
    ResultsLocked
        If another live run holds it.
    """
    directory = Path(results)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "workdir": os.getcwd(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                return path  # ours already
            pid = holder.get("pid")
            if holder.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid):
                path.unlink(missing_ok=True)  # left by a run that was killed
                continue
            raise ResultsLocked(
                f"results directory {directory} is in use by another nsclean run (PID "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, started in "
                f"{holder.get('workdir', '?')} at {holder.get('started', '?')}); wait for "
                f"it to end, use another 'results', or remove {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return path
    raise ResultsLocked(f"could not take {path}: it keeps reappearing")


def release_results_lock(results: str | os.PathLike) -> None:
    """Remove the lock file if this process holds it (never another run's)."""
    path = Path(results) / LOCK_NAME
    holder = _holder(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
