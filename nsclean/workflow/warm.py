"""Warm workers: run the workflow's per-file steps in a pre-imported process.

A rule script of the workflow would spend most of its time importing numpy, astropy and
matplotlib (about 0.9 CPU-s for a mask job, 1.2 for a clean and 1.6 for a QA job, more
than the work on one exposure; 0.3 CPU-s for requests in a download).  A warm worker
imports them once:

* A **server** (``python -m nsclean.workflow.warm serve``) listens on a Unix socket in a private
  directory (``$XDG_RUNTIME_DIR`` or the temporary directory, ``nsclean-warm-<uid>``,
  mode 0700).  It imports the libraries and the steps once, then forks one child per
  request.  Its socket's name is a hash of everything the imports depend on (host,
  Python, ``sys.path``, the nsclean source files, thread and matplotlib environment
  variables), so that code or environment changes start a new server.  It exits after
  ``idle`` seconds without work (default 30).
* The **client** (:func:`run_step`; a rule script calls it through
  :func:`run_command_step`) starts the server if none is running, sends the step's name
  and arguments with its working directory, environment, umask, resource limits and
  standard streams, and waits. The forked
  child adopts all of them, runs the step (:mod:`nsclean.workflow.steps`, the same function the
  client would run) and reports its exit status, CPU time and peak memory, which the
  client writes to the rule's log. The client passes on the signals it gets (Ctrl-C,
  ``kill``), and a child whose client has died stops at once, so that Snakemake's view
  of a job stays the truth.
* A job that runs before the steps (the workflow's manifest) can start the server in
  the background (:func:`start_server`), so that its imports overlap with that job.
* Whenever a worker cannot be used (no ``fork``, no Unix sockets, a server that
  cannot start or does not answer), the step runs in the calling process, with a note
  in the log.  Results do not depend on where a step ran.

Snakemake's ``benchmark:`` files of a step run by a warm worker count only the small
client's CPU time and memory (the wall time is right); the step's own figures are in
the rule's log.  Jobs submitted to a cluster run each in its own allocation, where a
server would not outlive the job: in ``auto`` mode warm workers are used only outside
Slurm jobs.

This module imports only the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time

__all__ = ["default_socket_dir", "run_command_step", "run_step", "server_key",
           "start_server", "use_warm_workers"]

#: Seconds a server stays up without requests.
IDLE_SECONDS = 30.0
#: Seconds a client waits for a server to answer (it may be importing).
ANSWER_SECONDS = 120.0
#: Seconds a client waits for a server it started to create its socket.
START_SECONDS = 20.0
#: Seconds during which a server that failed to start is not tried again.
RETRY_FAILED_SECONDS = 300.0
# Environment variables read when the libraries are imported: a server started with
# other values would not behave like a fresh process, so they are part of its key.
_IMPORT_ENV_PREFIXES = ("OMP_", "OPENBLAS_", "MKL_", "GOTO_", "BLIS_", "VECLIB_",
                        "NUMEXPR_", "NUMPY_", "MPL", "ASTROPY", "PYTHON", "XDG_CONFIG",
                        "XDG_CACHE", "NSCLEAN_")
_HEADER = struct.Struct("!I")  # length of the JSON message that follows
_MAX_SOCKET_PATH = 100  # bytes; Linux allows 107 for a Unix socket's path
_MAX_MESSAGE = 16 << 20


class WarmUnavailable(Exception):
    """No warm worker can run this step; it runs in the calling process instead."""


# ------------------------------------------------------------------------------------
# entry point of the rule scripts
# ------------------------------------------------------------------------------------
def use_warm_workers(setting="auto", environ=None) -> bool:
    """Whether steps go to a warm worker.

    Parameters
    ----------
    setting : {"auto", True, False}
        The workflow's ``warm_workers`` config value.  ``"auto"`` uses them except
        inside a Slurm job (``SLURM_JOB_ID`` set), where each job has its own
        allocation and a server would die with it.
    environ : mapping, optional
        The environment to look at (default ``os.environ``).

    Returns
    -------
    bool
    """
    environ = os.environ if environ is None else environ
    if setting is False or not (hasattr(os, "fork") and hasattr(socket, "AF_UNIX")):
        return False
    if setting is True:
        return True
    if setting != "auto":
        raise ValueError(f"warm_workers must be 'auto', true or false; got {setting!r}")
    return "SLURM_JOB_ID" not in environ


def run_command_step(name: str, argv: list[str] | None = None, *,
                     in_process: bool = False) -> None:
    """Run a step as a rule's shell command: ``<rule script> JOB --log LOG``.

    The manifest, download, mask, clean and QA rules of the workflow call their
    scripts with ``shell:`` rather than ``script:``: a script run by Snakemake first
    unpickles its ``snakemake`` object, which imports much of Snakemake (~0.2 CPU-s per
    job, as much as a warm step's own start).  The job's files and settings come
    instead as one JSON argument, built by the workflow (``step_command`` in
    ``workflow/rules/common.smk``).

    Parameters
    ----------
    name : str
        The step (a key of :data:`nsclean.workflow.steps.STEPS`).
    argv : list of str, optional
        The command's arguments (default ``sys.argv[1:]``): ``JOB`` -- a JSON object
        with the job's named ``input`` and ``output`` files, ``params``,
        ``wildcards`` and the ``warm_workers`` setting -- and ``--log LOG``, the
        rule's log file.
    in_process : bool
        Run the step in this process even when warm workers are on, after starting a
        server in the background for the steps to come (:func:`start_server`): for the
        workflow's manifest, which runs first and alone.
    """
    parser = argparse.ArgumentParser(
        prog=f"{os.path.basename(sys.argv[0])}",
        description=f"Run the workflow step {name!r} of one job (see nsclean.workflow.steps).")
    parser.add_argument("job", help="the job's input, output, params and wildcards "
                        "as a JSON object")
    parser.add_argument("--log", required=True, help="the rule's log file")
    args = parser.parse_args(argv)
    try:
        job = json.loads(args.job)
        kwargs = {key: job[key] for key in ("input", "output", "params", "wildcards")}
    except (ValueError, KeyError, TypeError) as error:
        parser.error(f"JOB is not a JSON object with input, output, params and "
                     f"wildcards: {error!r}")
    kwargs["log"] = args.log
    warm = use_warm_workers(job.get("warm_workers", "auto"))
    if in_process:
        if warm:
            try:
                pid = start_server()
            except WarmUnavailable as why:
                _note(args.log, f"no warm-worker server started ({why})")
            else:
                if pid is not None:
                    _note(args.log, f"started warm-worker server {pid} for the steps to "
                                    "come")
        warm = False
    run_step(name, kwargs, warm=warm)


def run_step(name: str, kwargs: dict, *, warm=True, log: str | None = None,
             socket_dir: str | None = None, idle: float = IDLE_SECONDS) -> None:
    """Run one step of :data:`nsclean.workflow.steps.STEPS`, in a warm worker when possible.

    Parameters
    ----------
    name : str
        The step (``"fetch_manifest"``, ``"fetch_file"``, ``"mask"``, ``"clean"``,
        ``"qa"``).
    kwargs : dict
        Its keyword arguments; must be JSON-serialisable (plain dicts, strings).
    warm : bool
        Try a warm worker first (see :func:`use_warm_workers`).
    log : str, optional
        Where notes about the worker go (default ``kwargs["log"]``).
    socket_dir : str, optional
        Directory of the servers' sockets (default :func:`default_socket_dir`).
    idle : float
        Idle time after which a server started here exits.

    Raises
    ------
    SystemExit
        With the worker's exit status if the step failed there (its traceback is in
        the rule's log, where the step sends its standard error, as in process).  A
        step run in this process raises as usual.
    """
    # nsclean.workflow.steps is imported only where the step runs (here, or in the worker, which
    # reports an unknown name the same way): a warm job's client stays small.
    log = log or kwargs.get("log")
    if warm:
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError) as error:
            _note(log, f"step arguments are not plain data ({error}); no warm worker")
            warm = False
    if warm:
        try:
            status = _run_in_worker(name, kwargs, socket_dir or default_socket_dir(), idle,
                                    log)
        except WarmUnavailable as why:
            _note(log, f"no warm worker ({why}); running the step in this process")
        else:
            if status:
                raise SystemExit(status)
            return
    _step_function(name)(**kwargs)


def _step_function(name):
    from .steps import STEPS

    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; known: {', '.join(STEPS)}")
    return STEPS[name]


def default_socket_dir() -> str:
    """Private directory of the warm-worker sockets of this user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        import tempfile

        base = tempfile.gettempdir()
    return os.path.join(base, f"nsclean-warm-{os.getuid()}")


def server_key(path: list[str] | None = None, environ=None) -> str:
    """Hash of what a server's imports depend on (its socket is named after it).

    Parameters
    ----------
    path : list of str, optional
        The module search path (default ``sys.path``).
    environ : mapping, optional
        The environment (default ``os.environ``).

    Returns
    -------
    str
        16 hexadecimal digits.
    """
    import nsclean

    environ = os.environ if environ is None else environ
    package = os.path.dirname(os.path.abspath(nsclean.__file__))
    parts = [socket.gethostname(), sys.executable, sys.version, package,
             *(path if path is not None else sys.path)]
    for directory, subdirectories, names in os.walk(package):
        subdirectories.sort()
        for name in sorted(names):
            if name.endswith(".py"):
                stat = os.stat(os.path.join(directory, name))
                relative = os.path.relpath(os.path.join(directory, name), package)
                parts.append(f"{relative}:{stat.st_mtime_ns}:{stat.st_size}")
    parts += [f"{key}={value}" for key, value in sorted(environ.items())
              if key.startswith(_IMPORT_ENV_PREFIXES)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------
def _server_socket(directory) -> tuple[str, str]:
    """This process's server key and its socket path in ``directory`` (made private)."""
    key = server_key()
    path = os.path.join(directory, f"{key}.sock")
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise WarmUnavailable(f"the socket path under {directory} would be too long")
    _private_directory(directory)
    _refuse_if_failed_recently(directory, key)
    return key, path


def _run_in_worker(name, kwargs, directory, idle, log) -> int:
    """Run a step in a warm worker; returns its exit status (0 = success)."""
    try:
        key, path = _server_socket(directory)
        connection = _connect(directory, key, path, idle)
    except OSError as error:  # e.g. a directory that cannot be created
        raise WarmUnavailable(str(error)) from None
    with connection:
        connection.settimeout(ANSWER_SECONDS)
        try:
            hello = _receive(connection)
        except (OSError, ValueError) as error:
            raise WarmUnavailable(f"the server did not answer: {error}") from None
        if hello.get("key") != key:
            raise WarmUnavailable(f"the server answered for {hello.get('key')!r}")
        request = {"step": name, "kwargs": kwargs, "cwd": os.getcwd(),
                   "env": dict(os.environ), "umask": _umask(), "limits": _limits()}
        try:
            _send(connection, request, fds=[0, 1, 2])
            connection.settimeout(ANSWER_SECONDS)
            started = _receive(connection)
        except (OSError, ValueError) as error:
            raise WarmUnavailable(f"the server did not take the step: {error}") from None
        # From here on the step is running in the worker: it must not run again here.
        child = int(started["pid"])
        connection.settimeout(None)
        forwarded = []

        def forward(signum, _frame):
            forwarded.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

        previous = {sig: signal.signal(sig, forward)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    result = _receive(connection)
                    break
                except InterruptedError:
                    continue
                except (OSError, ValueError):
                    result = None
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if result is None:
        if forwarded:
            return 128 + forwarded[-1]
        print(f"nsclean.workflow.warm: worker {child} ended without reporting (killed? out of "
              "memory?)", file=sys.stderr)
        return 1
    _note(log, f"step {name} ran in warm worker {child}: {result['cpu']:.2f} CPU-s, "
               f"peak {result['maxrss_mb']:.0f} MB (server {hello['pid']})")
    return int(result["status"])


def _connect(directory, key, path, idle) -> socket.socket:
    """Connected socket of the server with this key; starts one if there is none."""
    with contextlib.suppress(OSError):
        return _try_connect(path)
    import fcntl

    # One client at a time starts a server; the others wait here, then connect to it.
    with open(os.path.join(directory, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            return _try_connect(path)
        _process, connection = _start_locked(directory, key, idle, lambda: _try_connect(path))
        return connection


def start_server(socket_dir: str | None = None, idle: float = IDLE_SECONDS) -> int | None:
    """Start this process's server in the background, unless its socket exists.

    For a job that runs before the steps (the workflow's manifest): the server imports
    its libraries while the job works, on a core that would otherwise be idle, so that
    the first steps find it ready.  Returns once the server's socket is bound, without
    waiting for its imports.  The server is the one the steps' clients will use only if
    it has their key (:func:`server_key`): the same Python, module path and environment.

    Parameters
    ----------
    socket_dir : str, optional
        Directory of the servers' sockets (default :func:`default_socket_dir`).
    idle : float
        Idle time after which the server exits.

    Returns
    -------
    int or None
        The server's process ID, or None if a socket was already there (a server is
        running, or a killed server's socket that the first client replaces).

    Raises
    ------
    WarmUnavailable
        If no server can be started here (see :func:`run_step` for the reasons).
    """
    directory = socket_dir or default_socket_dir()
    try:
        key, path = _server_socket(directory)
        if os.path.exists(path):
            return None
        import fcntl

        with open(os.path.join(directory, f"{key}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(path):
                return None
            # Hold the lock until the socket exists (the server binds it before its
            # imports), so that a client arriving now connects instead of starting
            # a second server.
            process, _ = _start_locked(directory, key, idle, lambda: os.path.exists(path))
            return process.pid
    except OSError as error:
        raise WarmUnavailable(str(error)) from None


def _refuse_if_failed_recently(directory, key):
    failed = os.path.join(directory, f"{key}.failed")
    with contextlib.suppress(OSError):
        # A server that failed to start is not tried again for a while (a fix of the
        # environment that does not change the key is picked up after that).
        if time.time() - os.stat(failed).st_mtime < RETRY_FAILED_SECONDS:
            raise WarmUnavailable(f"a server failed to start recently, see {failed}")


def _start_locked(directory, key, idle, ready):
    """Start a detached server for ``key`` (the caller holds the key's lock) and wait
    until ``ready()`` gives a true value (an OSError counts as not yet).

    Returns
    -------
    (subprocess.Popen, object)
        The server process and what ``ready()`` gave.
    """
    import subprocess

    path = os.path.join(directory, f"{key}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a server that was killed
    server_log = os.path.join(directory, f"{key}.log")
    with open(server_log, "ab") as output:
        # The client's module path is set before nsclean is imported, so that the
        # server imports the same nsclean (e.g. a workflow checkout's, ahead of an
        # installed one).
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), "serve",
             "--socket", path, "--idle", str(idle)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=directory)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            value = ready()
            if value:
                return process, value
        if process.poll() is not None:
            raise WarmUnavailable(f"the server exited at once, see {server_log}")
        time.sleep(0.01)
    raise WarmUnavailable(f"the server made no socket in {START_SECONDS:.0f} s")


_BOOTSTRAP = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
              "from nsclean.workflow.warm import main; sys.exit(main(sys.argv[2:]))")


def _try_connect(path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        raise
    return connection


def _private_directory(directory):
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WarmUnavailable(f"{directory} is not private to this user")


#: Resource limits (``ulimit``) a worker takes over from its client.
_LIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_RSS", "RLIMIT_CPU", "RLIMIT_FSIZE",
           "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_STACK")


def _limits() -> dict:
    import resource

    return {name: resource.getrlimit(getattr(resource, name)) for name in _LIMITS
            if hasattr(resource, name)}


def _adopt_limits(limits: dict) -> None:
    """Take over the client's limits where allowed (a hard limit can only be lowered)."""
    import resource

    def smaller(a, b):
        if a == resource.RLIM_INFINITY:
            return b
        return a if b == resource.RLIM_INFINITY else min(a, b)

    for name, (soft, hard) in limits.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        hard = smaller(hard, resource.getrlimit(which)[1])
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (smaller(soft, hard), hard))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _note(log, text):
    """Append a line to the rule's log (the step's own logging goes there too)."""
    if not log:
        return
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        with open(log, "a", encoding="utf-8") as handle:
            stamp = time.strftime('%Y-%m-%d %H:%M:%S')
            handle.write(f"{stamp} INFO nsclean.workflow.warm: {text}\n")


# ------------------------------------------------------------------------------------
# messages: a 4-byte length, then JSON; file descriptors ride on the first byte
# ------------------------------------------------------------------------------------
def _send(connection, message, fds=()):
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(connection, [payload], list(fds))
        payload = payload[sent:]
    connection.sendall(payload)


def _receive(connection, want_fds=0):
    """One message (and, if ``want_fds``, the descriptors sent with it)."""
    fds = []
    if want_fds:
        head, fds, _flags, _addr = socket.recv_fds(connection, _HEADER.size, want_fds)
    else:
        head = connection.recv(_HEADER.size)
    head += _read_exactly(connection, _HEADER.size - len(head), allow_empty=not head)
    if not head:
        raise ValueError("connection closed")
    (size,) = _HEADER.unpack(head)
    if size > _MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes")
    message = json.loads(_read_exactly(connection, size))
    return (message, fds) if want_fds else message


def _read_exactly(connection, size, allow_empty=False):
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(remaining)
        if not chunk:
            if allow_empty and remaining == size:
                return b""
            raise ValueError("connection closed mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------
# server
# ------------------------------------------------------------------------------------
def _preload():
    """Import what the steps use and exercise the lazy parts once (fonts, FITS I/O)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from astropy.io import fits
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import nsclean.algorithm.core
    import nsclean.algorithm.masks
    import nsclean.algorithm.qa
    import nsclean.archive.archive  # requests, for the downloads
    import nsclean.io.exposure
    import nsclean.report.figures
    import nsclean.workflow.steps  # noqa: F401

    for module in ("matplotlib.ticker", "matplotlib.image", "PIL.Image", "threadpoolctl"):
        with contextlib.suppress(ImportError):
            __import__(module)
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((2, 2), np.float32),
                                                   name="SCI")]).writeto(buffer)
    buffer.seek(0)
    with fits.open(buffer) as hdus:
        hdus["SCI"].data.sum()
    figure = Figure(figsize=(2, 2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(np.zeros((4, 4)))
    axes.set_title("warm-up")
    figure.savefig(io.BytesIO(), format="png")


def serve(path: str, idle: float = IDLE_SECONDS):
    """Run a warm-worker server on the Unix socket ``path`` until idle for ``idle`` s.

    The socket's name must be :func:`server_key` as this process computes it (clients
    start the server with their module path and environment), else the server stops.
    """
    import traceback  # here, not at the top: a client does not need it

    directory, name = os.path.split(path)
    key = name.removesuffix(".sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # first, so that clients can queue while the imports run
    listener.listen(64)
    identity = os.stat(path).st_ino
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} server {os.getpid()} on {path}",
          flush=True)
    try:
        if server_key() != key:
            raise RuntimeError("started for another code or environment")
        _preload()
    except BaseException:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            with open(os.path.join(directory, f"{key}.failed"), "w") as handle:
                traceback.print_exc(file=handle)
        _remove_socket(path, identity)
        raise
    import gc

    # The preloaded objects live as long as the server: kept out of the collections of
    # the forked workers, which would otherwise walk (and so copy) all of their pages.
    gc.freeze()
    children: set[int] = set()
    last_activity = time.monotonic()
    listener.settimeout(1.0)
    while True:
        while children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if not pid:
                break
            children.discard(pid)
            last_activity = time.monotonic()
        if not children and time.monotonic() - last_activity > idle:
            break
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        last_activity = time.monotonic()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                _child(connection, key)  # ends with os._exit
            finally:
                os._exit(1)
        connection.close()
        children.add(pid)
    _remove_socket(path, identity)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} server {os.getpid()} idle, exiting",
          flush=True)


def _remove_socket(path, identity):
    """Remove the socket file if it is still this server's."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == identity:
            os.unlink(path)


class _Stopped(BaseException):
    """Raised in a worker by SIGTERM/SIGHUP, so that temporary files are cleaned up."""


def _child(connection, key):
    """Forked per request: take over the client's context, run the step, report."""
    import tempfile
    import threading
    import traceback

    status = 1
    state = {"done": False}

    def stop(signum, _frame):
        if not state["done"]:
            raise _Stopped(signum)

    try:
        os.setsid()  # out of the server's session: a signal to one is not for the other
        connection.settimeout(30.0)
        _send(connection, {"key": key, "pid": os.getppid()})
        request, fds = _receive(connection, want_fds=3)
        connection.settimeout(None)
        if len(fds) != 3:
            raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        _adopt_limits(request.get("limits", {}))
        # What the standard library derived from the server's environment: the
        # temporary directory (Snakemake sets TMPDIR per job) and the time zone.
        tempfile.tempdir = None
        time.tzset()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, stop)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _send(connection, {"pid": os.getpid()})
        # The client holds the other end until the step ends: if it goes away (killed,
        # Snakemake gave up on the job), stop too.
        threading.Thread(target=_stop_when_closed, args=(connection, state),
                         daemon=True).start()
        try:
            _step_function(request["step"])(**request["kwargs"])
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except KeyboardInterrupt:
            status = 128 + signal.SIGINT
        except _Stopped as stopped:
            status = 128 + stopped.args[0]
        except BaseException:
            traceback.print_exc()
        finally:
            state["done"] = True
            import logging

            logging.shutdown()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        _send(connection, {"status": status,
                           "cpu": usage.ru_utime + usage.ru_stime + children.ru_utime
                           + children.ru_stime,
                           "maxrss_mb": max(usage.ru_maxrss, children.ru_maxrss) / 1024})
    except BaseException:
        state["done"] = True
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


#: Seconds a worker whose client is gone has to stop cleanly before it is ended.
STOP_GRACE_SECONDS = 10.0


def _stop_when_closed(connection, state):
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    if state["done"]:
        return
    # Stop the step as SIGTERM would (temporary files removed), then for sure.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    os._exit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """``python -m nsclean.workflow.warm serve --socket PATH``: run a server (clients start it)."""
    parser = argparse.ArgumentParser(prog="python -m nsclean.workflow.warm", description=__doc__
                                     .split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="run a server on a Unix socket")
    server.add_argument("--socket", required=True)
    server.add_argument("--idle", type=float, default=IDLE_SECONDS)
    args = parser.parse_args(argv)
    serve(args.socket, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
