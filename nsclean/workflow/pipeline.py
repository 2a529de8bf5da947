"""Per-exposure step bookkeeping for the workflow: status records, provenance, failures.

Every per-exposure rule of the workflow (mask, clean, QA) always produces all of its
declared outputs, so that the job graph stays the same whatever happens to one
exposure and the reports are always made.  A step that meets an input problem it can
name (``nsclean.io.errors.NSCleanInputError``: a corrupt rate, a cal that does not match
the rate, a file the archive refused) records ``status: failed`` with the reason in
its status record and leaves *empty* placeholder files for its data products; the
next steps see the failed status and pass it on without opening the placeholders.
Anything else (a bug) is not caught and stops the job.

Status records are small JSON files written atomically, with sorted keys and no time
stamps, so that results are bit-identical from one run to the next.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import __version__
from ..io.atomic import atomic_write_text
from ..io.errors import NSCleanInputError
from ..io.jsonable import json_default

__all__ = [
    "CLEANED",
    "FAILED",
    "SKIPPED",
    "StepFailed",
    "OK",
    "atomic_write_text",
    "file_checksum",
    "require_ok",
    "require_product",
    "script_logging",
    "to_console",
    "input_checksums",
    "program_records",
    "read_benchmark_seconds",
    "read_status",
    "step",
    "step_timings",
    "storage_full_reason",
    "write_placeholders",
    "write_status",
]

CLEANED = "cleaned"
FAILED = "failed"
SKIPPED = "skipped"
#: Status of a step that succeeded but is not the last one (mask, clean).
OK = "ok"


def script_logging(log_path: str | os.PathLike, name: str = "nsclean") -> logging.Logger:
    """Send a rule script's logging, warnings and stray output to the rule's log file.

    Parameters
    ----------
    log_path : str or os.PathLike
        The rule's ``log:`` file (``snakemake.log[0]``).
    name : str
        Logger name.

    Returns
    -------
    logging.Logger
        Logger writing to the log file.
    """
    global _CONSOLE
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    _CONSOLE = sys.stderr
    stream = _LogStream(log_path)
    # Library warnings (astropy, numpy) and prints belong in the log, not the console.
    sys.stdout = sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    logger = logging.getLogger(name)

    def report_crash(kind, error, traceback):
        # The traceback goes to the log; one line to the console, which the default
        # profile's quiet output (no job error blocks) would otherwise not show.
        logger.error("job failed", exc_info=(kind, error, traceback))
        to_console(f"{kind.__name__}: {error} (log: {log_path})")

    sys.excepthook = report_crash
    return logger


#: Where the job's standard error went before :func:`script_logging` took it over.
_CONSOLE = None


def to_console(text: str) -> None:
    """Print one line to the console Snakemake shows (not the rule's log): for what a
    user must see even with the default profile's quiet output, such as the run's
    verdict or a crashed job."""
    print(f"nsclean: {text}", file=_CONSOLE or sys.__stderr__, flush=True)


class _LogStream:
    """The rule's log file, falling back to the job's own stderr when it cannot be
    written (a full disk): the reason for a failure must reach someone."""

    def __init__(self, path):
        self._fallback = _CONSOLE or sys.__stderr__
        try:
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            self._file = None
            self._fallback.write(f"nsclean: cannot write the log {path}: {error}\n")

    def write(self, text: str) -> int:
        if self._file is not None:
            try:
                return self._file.write(text)
            except OSError:
                pass
        return self._fallback.write(text)

    def flush(self) -> None:
        for stream in (self._file, self._fallback):
            try:
                if stream is not None:
                    stream.flush()
            except OSError:
                pass

    def isatty(self) -> bool:
        return False


#: errno values of a file system that cannot take more data (disk full, quota): the
#: exposure fails with that reason; it is not a bug.  (A file-size limit, EFBIG, is a
#: limit someone set on the job: that fails the job.)
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT}


def storage_full_reason(error: OSError) -> str | None:
    """The failure reason for a write that a full file system refused, or None.

    The reason is also written to the process's original stderr (Snakemake keeps a
    job's stderr), because the log file is on the same full disk.
    """
    if error.errno not in _STORAGE_FULL:
        return None
    reason = (f"the disk is full ({error.strerror}) writing {error.filename or 'an output'};"
              " free space, delete this exposure's folder and run again")
    sys.__stderr__.write(f"nsclean: exposure failed: {reason}\n")
    return reason


class StepFailed(Exception):
    """Raised inside :func:`step` to stop a step with a reason (an upstream failure)."""


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content (read in 1 MiB blocks)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def input_checksums(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Map each input file's name to its checksum (empty placeholders included)."""
    return {Path(p).name: file_checksum(p) for p in paths}


#: Primary-header keywords of the input checksums in a cleaned file.
CHECKSUM_KEYWORDS = (("_rate.fits", "NSCSUMR", "rate"),
                     (("_cal.fits", "_calints.fits"), "NSCSUMC", "cal"),
                     ("mask", "NSCSUMM", "mask"))


def checksum_cards(inputs: dict) -> list[tuple[str, str, str]]:
    """FITS cards (keyword, hex digest, comment) for the input checksums of a record.

    ``inputs`` maps file names (or ``"mask"``) to ``"sha256:<hex>"`` as written by
    :func:`input_checksums`.
    """
    cards = []
    for suffix, keyword, what in CHECKSUM_KEYWORDS:
        for name, value in sorted(inputs.items()):
            if name.endswith(suffix):
                algorithm, _, digest = str(value).partition(":")
                cards.append((keyword, digest, f"{algorithm} of the input {what} file"))
                break
    return cards


def write_status(path: str | os.PathLike, status: str, reason: str = "", **fields) -> dict:
    """Write a step's status record (JSON, sorted keys, atomic) and return it.

    Parameters
    ----------
    path : str or os.PathLike
        The record's path.
    status : str
        ``"ok"``, ``"cleaned"``, ``"failed"`` or ``"skipped"``.
    reason : str
        Why the step failed or was skipped (empty otherwise).
    **fields
        Further JSON-serialisable entries (metrics, provenance, ...).

    Returns
    -------
    dict
        The record as written.
    """
    record = {"status": status, "reason": reason, "nsclean_version": __version__, **fields}
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=json_default)
                      + "\n")
    return record


def read_status(path: str | os.PathLike) -> dict:
    """Read a status record written by :func:`write_status`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_placeholders(paths: Iterable[str | os.PathLike]) -> None:
    """Leave an empty file at each path (the data products of a failed step)."""
    for path in paths:
        atomic_write_text(path, "")


@contextlib.contextmanager
def step(status_path: str | os.PathLike, products: Iterable[str | os.PathLike] = (),
         logger=None) -> Iterator[dict]:
    """Run one per-exposure step, turning input problems into a ``failed`` record.

    Parameters
    ----------
    status_path : str or os.PathLike
        Where the status record goes.  On success the body is expected to have
        written it (through :func:`write_status`); if it did not, a bare ``ok``
        record is written.
    products : iterable of path
        Data products of the step: on failure each is replaced by an empty
        placeholder so that every declared output exists.
    logger : logging.Logger, optional
        Where the failure is reported.

    Yields
    ------
    dict
        A scratch dictionary the body may fill with fields for the failure record
        (for instance the provenance it had gathered before the failure).

    Notes
    -----
    Caught: :class:`~nsclean.io.errors.NSCleanInputError` (the library's "this input
    cannot be used"), :class:`StepFailed` (an upstream step failed) and a full disk
    (``ENOSPC``, ``EDQUOT``: the reason is recorded, and also written to the
    job's stderr in case the log cannot be).  Everything else propagates and fails the
    job, because it is a bug rather than bad data.
    """
    products = list(products)
    extra: dict = {}
    try:
        yield extra
    except (NSCleanInputError, StepFailed) as error:
        reason = str(error)
        if logger is not None:
            logger.warning("exposure failed: %s", reason)
        write_placeholders(products)
        write_status(status_path, FAILED, reason, **extra)
        return
    except OSError as error:
        reason = storage_full_reason(error)
        if reason is None:
            raise
        if logger is not None:
            logger.warning("exposure failed: %s", reason)
        try:  # the failed write's temporary file is gone: a small record may fit
            write_placeholders(products)
            write_status(status_path, FAILED, reason, **extra)
        except OSError:
            raise error from None  # nothing fits: the job fails, the reason is on stderr
        return
    if not Path(status_path).exists():
        write_status(status_path, OK, **extra)


def require_ok(status_paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Read upstream status records; raise :class:`StepFailed` if one of them failed.

    Parameters
    ----------
    status_paths : iterable of path
        Status records of the steps this one depends on.

    Returns
    -------
    list of dict
        The records, in order.
    """
    records = [read_status(p) for p in status_paths]
    for record in records:
        if record.get("status") == FAILED:
            raise StepFailed(record.get("reason") or "an earlier step failed")
    return records


def require_product(status_path: str | os.PathLike, path: str | os.PathLike,
                    producer: str) -> dict:
    """Read the status record of the step that made a file this step reads.

    Raises :class:`StepFailed` if that step failed, or if the file is not the size the
    record gives (``bytes``).  Files are renamed into place complete, but without
    ``fsync`` a crash of the machine soon after a step can leave a file empty or short
    on disk under its final name, and Snakemake would take it as done.

    Parameters
    ----------
    status_path : path
        The producing step's status record.
    path : path
        The file it made.
    producer : str
        The producing step, for the message (``"its download"``).

    Returns
    -------
    dict
        The record.
    """
    (record,) = require_ok([status_path])
    expected = record.get("bytes")  # absent in records of older versions
    if expected is not None:
        actual = os.path.getsize(path)
        if actual != int(expected):
            raise StepFailed(f"{path}: {actual} bytes on disk, but {producer} recorded "
                             f"{int(expected)}; it was cut short or changed after it was "
                             "written (a crash of the machine?): delete it and run again")
    return record


def read_benchmark_seconds(path: str | os.PathLike) -> float | None:
    """Wall time of a job from its Snakemake ``benchmark:`` file (column ``s``).

    Returns the mean over the file's rows (one per repetition), or None if the file has
    no usable value.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            values = [float(row["s"]) for row in csv.DictReader(handle, delimiter="\t")
                      if (row.get("s") or "").strip() not in ("", "NA")]
    except (OSError, KeyError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def step_timings(benchmark_paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, float]]:
    """Seconds per step of each exposure, from the per-exposure benchmark files.

    Parameters
    ----------
    benchmark_paths : iterable of path
        ``<results>/benchmarks/<rule>/<program>/<stem>.tsv`` files.

    Returns
    -------
    dict
        ``{stem: {rule: seconds}}``.  Wall times are measured by Snakemake around each
        job.
    """
    timings: dict[str, dict[str, float]] = {}
    for path in benchmark_paths:
        path = Path(path)
        seconds = read_benchmark_seconds(path)
        if seconds is not None:
            timings.setdefault(path.stem, {})[path.parts[-3]] = round(seconds, 4)
    return timings


def program_records(program: str, manifest_path: str | os.PathLike,
                    qa_paths: Iterable[str | os.PathLike],
                    benchmark_paths: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Report records of one program, one per exposure of its manifest.

    Parameters
    ----------
    program : str
        Program ID as used in the results tree (five digits).
    manifest_path : str or os.PathLike
        The program's manifest (``nsclean.archive.archive.write_manifest``).
    qa_paths : iterable of path
        The QA records (``nsclean.report.report.write_record`` layout) of the exposures the
        manifest lists for processing.
    benchmark_paths : iterable of path, optional
        Benchmark files of their steps (see :func:`step_timings`): their wall times
        become the records' ``timing``.  They are kept out of the QA records
        themselves, which are bit-identical from one run to the next.

    Returns
    -------
    list of dict
        In manifest order: the QA record of each processed exposure, and a
        ``skipped`` or ``failed`` record (with the manifest's reason) for each exposure
        the manifest left out.

    Raises
    ------
    ValueError
        If a processed exposure has no QA record.
    """
    from ..archive.archive import read_manifest
    from ..report.report import load_records

    by_stem = {record["stem"]: record for record in load_records(list(qa_paths))}
    for stem, timing in step_timings(benchmark_paths).items():
        if stem in by_stem:
            by_stem[stem]["timing"] = {**timing, **by_stem[stem]["timing"]}
    records = []
    for row in read_manifest(manifest_path):
        if row.status == "ok":
            if row.stem not in by_stem:
                raise ValueError(f"{manifest_path}: no QA record for {row.stem}")
            record = by_stem[row.stem]
        else:  # failed (an unusable file) or skipped by the archive step
            record = {"program": program, "stem": row.stem,
                      "status": FAILED if row.status == FAILED else SKIPPED,
                      "reason": row.reason or "skipped by the archive step"}
        # The set-up the report shows: from the rate header (QA record), else the manifest.
        known = {"exp_type": row.exp_type, "detector": row.detector, "grating": row.grating,
                 "filter": row.filter, "subarray": row.subarray}
        record["setup"] = {**{k: v for k, v in known.items() if v},
                           **(record.get("setup") or {})}
        records.append(record)
    return records
