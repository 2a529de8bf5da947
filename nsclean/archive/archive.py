"""Find and fetch the rate and cal files of JWST NIRSpec programs.

Two sources give the same manifest (one row per exposure, see ``MANIFEST_COLUMNS``):

- ``"mast"``: the MAST archive, queried with the real ``astroquery.mast.Observations``
  client (:func:`query_mast`); files are downloaded by :func:`download_file`.
- ``"local"``: a directory of ``*_rate.fits`` / ``*_cal.fits`` (and time-series
  ``*_rateints.fits`` / ``*_calints.fits``) files someone already downloaded
  (:func:`scan_local`); the manifest points at them with ``file://`` URIs.

Design decisions
----------------
Redirecting astroquery
    astroquery builds its MAST URLs as class attributes when ``astroquery.mast`` is
    imported, from the astropy config file ``astroquery.cfg``.  Setting
    ``astroquery.mast.conf.server`` afterwards changes nothing.  So
    :func:`configure_mast_server` writes ``<dir>/astropy/astroquery.cfg`` and points
    ``XDG_CONFIG_HOME`` at it; it must run before ``astroquery.mast`` is imported (at
    process start, e.g. first thing in a rule script, or in a child process).  If
    astroquery.mast is already imported with a different server it raises
    :class:`ArchiveConfigError` instead of silently querying the wrong archive.
    Nothing in ``nsclean`` imports ``astroquery.mast`` at module level.
Timeouts on astroquery's requests
    astroquery sends its queries and ``whoami`` without a timeout, so a stalled
    server would hang the workflow.  :func:`query_mast` mounts a requests adapter with
    a default timeout on the client's session (``Observations._session``; astroquery
    has no public hook for this) and retries the whole query with exponential backoff
    on server errors, timeouts and truncated answers.
Downloads
    astroquery's ``download_file``/``download_products`` have no timeout, write
    straight to the final name, do not compare the byte count with the catalogue, and
    record failures in a table instead of raising.  :func:`download_file` is a
    requests-based downloader with the same protocol (``GET
    /api/v0.1/Download/file?uri=...``, the ``mast_token`` cookie): it writes to a hidden
    partial file in the destination directory (resumed with an HTTP Range request after
    a broken transfer or a killed job, as astroquery 0.4.11 does), logs its progress,
    checks the byte count against both the announced and the catalogue size, and
    renames it into place with :func:`nsclean.io.atomic.publish` (the one atomic
    writer's rename, with the umask's mode); it retries server errors, timeouts, connection
    drops and size mismatches with exponential backoff and then raises :class:`DownloadError` naming
    the file.  A 401/403 is not retried: without a token it raises
    :class:`AuthenticationRequired` saying that ``MAST_API_TOKEN`` is needed.
    Each attempt also has a total deadline (a server that trickles bytes never trips a
    read timeout), and never more than the announced ``Content-Length`` reaches the disk.
    The partial file is ``flock``-ed while a transfer runs, so a second process never
    writes into it or removes it; a partial file nobody holds is resumed, and removed
    only when the download gives up.
The token
    Read from the environment variable ``MAST_API_TOKEN`` only when a request needs
    it.  It is sent as the ``mast_token`` cookie and never logged, printed, put in an
    exception message or written to the manifest.  It goes to the archive's origin
    only (scheme, host, port), over https unless that is loopback: redirects are
    followed by hand, without the cookie once they leave the origin, and the adapter
    mounted on astroquery's session strips it from requests to other origins.
What the archive lists is not trusted
    A product name must be a plain file name (``../x`` and ``/x`` fail their exposure,
    and :func:`download_exposure` refuses them itself), its data URI a ``mast:`` URI,
    and one exposure may not have two different rate (or cal) files.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from ..io.atomic import atomic_copy, atomic_file, publish, remove_stale_temporaries

# numpy and astropy are imported where they are used (the manifest query and the
# local scan): a download job needs requests only, and astropy.io.fits alone costs
# ~0.7 s of start-up in each of the workflow's many download jobs.

__all__ = [
    "DEFAULT_ARCHIVE_URL",
    "MANIFEST_COLUMNS",
    "MODES",
    "ArchiveConfigError",
    "ArchiveError",
    "AuthenticationRequired",
    "DownloadError",
    "DownloadResult",
    "Manifest",
    "ManifestRow",
    "build_manifest",
    "configure_mast_server",
    "download_exposure",
    "download_file",
    "fetch_manifest",
    "query_mast",
    "read_manifest",
    "scan_local",
    "stem_of",
    "write_manifest",
]

log = logging.getLogger(__name__)

DEFAULT_ARCHIVE_URL = "https://mast.stsci.edu"
TOKEN_ENV = "MAST_API_TOKEN"

#: instrument mode -> JWST EXP_TYPE
MODES = {
    "IFU": "NRS_IFU",
    "MOS": "NRS_MSASPEC",
    "FS": "NRS_FIXEDSLIT",
    "BOTS": "NRS_BRIGHTOBJ",
}
# EXP_TYPE -> (CAOM instrument_name, CAOM dataproduct_type).  FS and BOTS share
# NIRSPEC/SLIT in CAOM; the time-series product type tells BOTS apart.
_CAOM_MODE = {
    "NRS_IFU": ("NIRSPEC/IFU", "cube"),
    "NRS_MSASPEC": ("NIRSPEC/MSA", "spectrum"),
    "NRS_FIXEDSLIT": ("NIRSPEC/SLIT", "spectrum"),
    "NRS_BRIGHTOBJ": ("NIRSPEC/SLIT", "timeseries"),
}
# Some MAST listings show BOTS as its own instrument name; accept it too.
_CAOM_ALIASES = {"NIRSPEC/BOTS": "NRS_BRIGHTOBJ"}

MANIFEST_COLUMNS = (
    "stem", "program", "observation", "visit", "exposure", "detector", "exp_type",
    "subarray", "grating", "filter", "rate_file", "rate_size", "cal_file", "cal_size",
    "mask_source", "data_rights", "status", "reason", "rate_uri", "cal_uri",
)
_INT_COLUMNS = {"rate_size", "cal_size"}

_STEM_RE = re.compile(r"^jw(\d{5})(\d{3})(\d{3})_(\d{5})_(\d{5})_(nrs[12])$", re.IGNORECASE)
# Level-2 products, by file-name suffix -> kind.  Time series (BOTS) have per-integration
# _rateints/_calints and no _cal; large ones come in segments (``_00001-seg002_nrs1``).
_SUFFIXES = ("_rate.fits", "_cal.fits", "_rateints.fits", "_calints.fits")
_KIND_BY_SUFFIX = {"_rate.fits": "rate", "_cal.fits": "cal", "_rateints.fits": "rateints",
                   "_calints.fits": "calints"}
_SEGMENT_RE = re.compile(r"^(.*_\d{5})-seg(\d{3})(_nrs[12])$", re.IGNORECASE)
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# What the workflow's file-name wildcard accepts, and what cannot leave a directory:
# a product name from the archive or a local directory must be a plain base name.
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_REDIRECTS = 10
#: Default slowest transfer accepted (bytes/s): an attempt may take
#: ``DEADLINE_BASE + size / MIN_RATE`` seconds in all.
MIN_RATE = 50_000.0
DEADLINE_BASE = 60.0
#: Randomly named temporaries ``.<name>.<random><suffix>`` a killed writer can leave
#: beside a download: the one atomic writer's ``.tmp``, and the ``.part`` of downloads and
#: local copies by earlier versions.  The resumable ``.<name>.part`` does not match.
STALE_SUFFIXES = (".tmp", ".part")


class ArchiveError(RuntimeError):
    """Fetching from the archive failed in a way retries cannot fix."""


class ArchiveConfigError(ArchiveError):
    """The MAST client cannot be pointed at the requested archive URL."""


class DownloadError(ArchiveError):
    """A file could not be downloaded; the message names the file."""


class AuthenticationRequired(DownloadError):
    """An exclusive-access file answered 401/403."""


class _Retryable(Exception):
    """A transient failure (server error, short body, size mismatch, odd answer).

    ``retry_after`` is the server's ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class ManifestRow:
    """One exposure: its identity, set-up and the rate/cal files.

    A segmented time series is one row: ``rate_file``, ``rate_uri`` and ``rate_size``
    (and the ``cal_*`` columns) then hold one space-separated entry per segment, in
    segment order (:meth:`files` lists them).

    ``status`` is ``"ok"`` (to be processed), ``"skipped"``, with ``reason`` saying
    why (no cal file under the ``skip`` policy, no rate file, a missing time-series
    segment), or ``"failed"`` (a file that cannot be read or used, a name that is not a
    plain file name, two different files listed for one product).  ``cal_file`` is
    empty when the archive has no cal file for the exposure; with the ``user_mask``
    policy such a row is ``ok`` with ``mask_source="user"`` (it needs a user mask),
    otherwise ``mask_source`` is ``"cal"`` (a skipped one can still be cleaned by hand
    with a mask of your own, ``nsclean clean --mask``).
    ``data_rights`` is ``EXCLUSIVE_ACCESS`` if either file is, ``PUBLIC`` otherwise,
    ``LOCAL`` for the local source.  ``subarray`` is empty for MAST rows (CAOM does not
    carry it; the rate header is authoritative).
    """

    stem: str
    program: str
    observation: str
    visit: str
    exposure: str
    detector: str
    exp_type: str
    subarray: str
    grating: str
    filter: str
    rate_file: str
    rate_size: int | str | None
    cal_file: str
    cal_size: int | str | None
    mask_source: str
    data_rights: str
    status: str
    reason: str
    rate_uri: str
    cal_uri: str

    @property
    def rate_files(self) -> list[str]:
        """The rate file names (several for a segmented time series)."""
        return self.rate_file.split()

    @property
    def cal_files(self) -> list[str]:
        """The cal (or calints) file names."""
        return self.cal_file.split()

    @property
    def time_series(self) -> bool:
        """True when the exposure is processed as a time series (``_rateints``)."""
        return any(name.endswith("_rateints.fits") for name in self.rate_files)

    def files(self) -> list[tuple[str, str, int | None]]:
        """``(file name, URI, size)`` of every rate and cal file of the exposure.

        Raises
        ------
        ValueError
            If the names, URIs and sizes of a column do not pair up (a hand-edited
            manifest, or a name with a space in a row that is not ``ok``).
        """
        listed = []
        for kind, names, uris, sizes in (
                ("rate", self.rate_file, self.rate_uri, self.rate_size),
                ("cal", self.cal_file, self.cal_uri, self.cal_size)):
            names, uris = names.split(), uris.split()
            sizes = ([None] * len(names) if sizes in (None, "")
                     else [int(v) for v in str(sizes).split()])
            if not len(names) == len(uris) == len(sizes):
                raise ValueError(f"{self.stem}: the manifest lists {len(names)} {kind} "
                                 f"file names, {len(uris)} URIs and {len(sizes)} sizes")
            listed.extend(zip(names, uris, sizes, strict=True))
        return listed


@dataclass
class Manifest:
    """Result of :func:`fetch_manifest`.

    Attributes
    ----------
    rows : list of ManifestRow
        Every exposure found, sorted by stem, skipped ones included
        (``status == "skipped"``).
    without_cal : list of str
        Stems that have a rate file but no cal file (reported whatever the policy).
    without_rate : list of str
        Stems that have a cal file but no rate file (always skipped).
    """

    rows: list[ManifestRow] = field(default_factory=list)
    without_cal: list[str] = field(default_factory=list)
    without_rate: list[str] = field(default_factory=list)

    @property
    def to_process(self) -> list[ManifestRow]:
        """The rows with ``status == "ok"``."""
        return [row for row in self.rows if row.status == "ok"]


@dataclass
class DownloadResult:
    """Outcome of :func:`download_file`.

    Attributes
    ----------
    path : Path
        The complete file.
    fetched : bool
        False for a cache hit (no bytes transferred).
    attempts : int
        Number of GET attempts (0 for a cache hit).
    nbytes : int
        Size of the file.
    seconds : float
        Wall time spent, including retries and backoff.
    """

    path: Path
    fetched: bool
    attempts: int
    nbytes: int
    seconds: float


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def stem_of(filename: str) -> str:
    """Exposure stem of a rate, cal, rateints or calints file name.

    A time-series segment belongs to the exposure without its ``-segNNN``.

    Parameters
    ----------
    filename : str
        e.g. ``jw01345062001_03101_00001_nrs2_rate.fits`` or
        ``jw01366004001_04101_00001-seg002_nrs1_rateints.fits`` (a path is accepted).

    Returns
    -------
    str
        e.g. ``jw01345062001_03101_00001_nrs2``, ``jw01366004001_04101_00001_nrs1``.

    Raises
    ------
    ValueError
        If the name does not end in ``_rate.fits``, ``_cal.fits``, ``_rateints.fits`` or
        ``_calints.fits``.
    """
    return _split_name(filename)[0]


def _split_name(filename: str) -> tuple[str, int | None, str]:
    """(exposure stem, segment number or None, kind) of a product file name."""
    name = Path(filename).name
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            stem, segment = name[: -len(suffix)], None
            found = _SEGMENT_RE.match(stem)
            if found:
                stem, segment = found.group(1) + found.group(3), int(found.group(2))
            return stem, segment, _KIND_BY_SUFFIX[suffix]
    raise ValueError(f"{name!r} is not a *_rate.fits, *_cal.fits, *_rateints.fits or "
                     "*_calints.fits file name")


def _stem_parts(stem: str) -> dict[str, str]:
    match = _STEM_RE.match(stem)
    if not match:
        return {}
    program, observation, visit, _, exposure, detector = match.groups()
    return {"program": program, "observation": observation, "visit": visit,
            "exposure": exposure, "detector": detector.upper()}


def _as_list(value) -> list[str] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    return [str(v) for v in value]


def _normalise_modes(modes) -> set[str] | None:
    modes = _as_list(modes)
    if modes is None:
        return None
    exp_types = set()
    for mode in modes:
        key = mode.strip().upper()
        if key in MODES:
            exp_types.add(MODES[key])
        elif key in MODES.values():
            exp_types.add(key)
        else:
            raise ValueError(f"unknown NIRSpec mode {mode!r}: expected one of "
                             f"{sorted(MODES)} or an EXP_TYPE in {sorted(MODES.values())}")
    return exp_types


def _normalise_programs(programs) -> list[str]:
    programs = _as_list(programs)
    if not programs:
        raise ValueError("at least one program ID is needed, e.g. programs=['1345']")
    out = []
    for program in programs:
        digits = str(program).strip().lower().removeprefix("jw")
        if not digits.isdigit() or len(digits) > 5:
            raise ValueError(f"program ID {program!r} is not a JWST program number")
        out.append(digits.zfill(5))
    return out


def _token_from_env(token: str | None) -> str:
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return token.strip()


def _split_filters(caom_filters: str) -> tuple[str, str]:
    # CAOM "filters" for NIRSpec is "<FILTER>;<GRATING>", e.g. "F290LP;G395H", "CLEAR;PRISM"
    grating, filt = "", ""
    for part in str(caom_filters or "").split(";"):
        part = part.strip().upper()
        if part.startswith("G") or part in ("PRISM", "MIRROR"):
            grating = part
        elif part:
            filt = part
    return grating, filt


def _wanted(value: str, allowed: set[str] | None) -> bool:
    return allowed is None or str(value).upper() in allowed


def _upper_set(values) -> set[str] | None:
    values = _as_list(values)
    return None if values is None else {v.strip().upper() for v in values}


def _observation_set(observations) -> set[str] | None:
    values = _as_list(observations)
    return None if values is None else {str(int(v)).zfill(3) for v in values}


def _plain(value):
    """A table cell as a plain Python value; masked (missing) cells become None."""
    import numpy as np

    if value is None or value is np.ma.masked:
        return None
    return value.item() if hasattr(value, "item") else value


def _backoff_delay(attempt: int, backoff: float, max_backoff: float) -> float:
    return min(max_backoff, backoff * 2 ** (attempt - 1))


def _name_problem(name: str) -> str | None:
    """Why a product file name from the archive (or a directory) cannot be used, or None.

    The name becomes a path inside the results directory: it must be a plain base name
    (no ``/``, no ``..``, not absolute, no spaces or shell characters such as the
    ``(1)`` of a browser's second copy).
    """
    name = str(name)
    if not name:
        return "empty file name"
    if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        return f"file name {name!r} is a path, not a plain file name"
    if not _SAFE_NAME_RE.match(name):
        return (f"file name {name!r} has characters other than letters, digits, '_', '-' "
                "and '.' (a renamed copy such as '... (1)_rate.fits'?)")
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _same_origin(url: str, archive_url: str) -> bool:
    return _origin(url) == _origin(archive_url)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token_transport(archive_url: str, token: str) -> None:
    """Refuse to send a token in clear text: https, or plain http to loopback only."""
    scheme, host, _ = _origin(archive_url)
    if token and scheme != "https" and not _is_loopback_host(host):
        raise ArchiveConfigError(
            f"refusing to send the {TOKEN_ENV} token to {archive_url} over plain {scheme}: "
            "use an https:// archive URL (plain http is allowed for loopback test servers "
            "only)")


# --------------------------------------------------------------------------------------
# astroquery set-up
# --------------------------------------------------------------------------------------
def _mast_base_url() -> str | None:
    module = sys.modules.get("astroquery.mast")
    if module is None:
        return None
    url = module.Observations._portal_api_connection.MAST_REQUEST_URL
    return url.removesuffix("/api/v0/invoke")


def configure_mast_server(url: str = DEFAULT_ARCHIVE_URL, *,
                          config_dir: str | Path | None = None) -> Path | None:
    """Point astroquery's MAST client at ``url``; call before importing astroquery.mast.

    Parameters
    ----------
    url : str
        Archive base URL, e.g. ``https://mast.stsci.edu`` or ``http://127.0.0.1:8765``.
    config_dir : str or Path, optional
        Directory to hold ``astropy/astroquery.cfg``; a new temporary directory by
        default.

    Returns
    -------
    Path or None
        The ``XDG_CONFIG_HOME`` directory written, or None if astroquery.mast was
        already imported with this URL (nothing to do).

    Raises
    ------
    ArchiveConfigError
        If ``astroquery.mast`` is already imported with a different server: its URLs
        are fixed at import, so call this first thing in the process, or run the query
        in a child process.

    Notes
    -----
    This sets ``XDG_CONFIG_HOME`` (and removes ``ASTROPY_CONFIG_DIR``) in
    ``os.environ`` for the rest of the process, so other astropy config files in the
    user's config directory are not read afterwards.  The ``[mast]`` section also sets
    ``ssoserver`` and ``catalogs_server`` to ``url``, so nothing else is contacted.
    """
    url = url.rstrip("/")
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ArchiveConfigError(f"archive URL {url!r} must look like https://host[:port]")
    current = _mast_base_url()
    if current is not None:
        if current.rstrip("/") == url:
            return None
        raise ArchiveConfigError(
            f"astroquery.mast was imported before configure_mast_server({url!r}) and "
            f"talks to {current}; its URLs are fixed at import time. Call "
            "configure_mast_server first thing in the process, or run the query in a "
            "child process.")
    if config_dir:
        base = Path(config_dir)
    else:
        base = Path(tempfile.mkdtemp(prefix="nsclean-mast-"))
        # The configuration only lives as long as this process; leave no litter in /tmp.
        atexit.register(shutil.rmtree, base, ignore_errors=True)
    (base / "astropy").mkdir(parents=True, exist_ok=True)
    (base / "astropy" / "astroquery.cfg").write_text(
        f"[mast]\nserver = {url}\nssoserver = {url}\ncatalogs_server = {url}\n")
    os.environ["XDG_CONFIG_HOME"] = str(base)
    os.environ.pop("ASTROPY_CONFIG_DIR", None)
    try:  # astropy caches parsed config files; forget astroquery's if it was read
        from astropy.config import configuration

        configuration._cfgobjs.pop("astroquery", None)
    except (ImportError, AttributeError):
        pass
    return base


class _TimeoutAdapter(HTTPAdapter):
    """requests adapter that supplies a timeout when the caller gave none.

    With ``archive_url`` it also removes the ``Cookie`` and ``Authorization`` headers
    from every request to another origin: astroquery's login puts the token in a
    domain-less session cookie, which requests would otherwise send along any redirect.
    """

    def __init__(self, timeout, archive_url: str | None = None, **kwargs):
        self._default_timeout = timeout
        self._archive_url = archive_url
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._default_timeout
        if self._archive_url is not None and not _same_origin(request.url, self._archive_url):
            request.headers.pop("Cookie", None)
            request.headers.pop("Authorization", None)
        return super().send(request, **kwargs)


def _observations_client(archive_url: str, timeout: float):
    if _mast_base_url() is None:
        configure_mast_server(archive_url)
    elif _mast_base_url().rstrip("/") != archive_url.rstrip("/"):
        configure_mast_server(archive_url)  # raises the explanatory error
    from astroquery.mast import Observations

    if _mast_base_url().rstrip("/") != archive_url.rstrip("/"):
        raise ArchiveConfigError(
            f"astroquery.mast talks to {_mast_base_url()} although {archive_url} was "
            "configured (another astroquery.cfg took precedence?)")
    adapter = _TimeoutAdapter(timeout, archive_url)
    Observations._session.mount("http://", adapter)
    Observations._session.mount("https://", adapter)
    Observations._portal_api_connection.TIMEOUT = timeout
    return Observations


def _retrying(call: Callable, what: str, *, retries: int, backoff: float,
              max_backoff: float = 30.0):
    from astroquery.exceptions import RemoteServiceError

    last = None
    for attempt in range(1, retries + 2):
        try:
            return call()
        except RemoteServiceError as exc:
            raise ArchiveError(f"MAST refused {what}: {exc}") from exc
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status not in _RETRY_STATUS:
                raise ArchiveError(f"MAST answered HTTP {status} to {what}") from exc
            last = f"HTTP {status}"
        except _Retryable as exc:
            last = str(exc)
        except (requests.RequestException, TimeoutError, json.JSONDecodeError) as exc:
            # a truncated JSON answer surfaces as a decode error
            last = f"{type(exc).__name__}: {exc}"
        if attempt <= retries:
            delay = _backoff_delay(attempt, backoff, max_backoff)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, last, attempt,
                        retries, delay)
            time.sleep(delay)
    raise ArchiveError(f"{what} failed after {retries + 1} attempts; last error: {last}")


# --------------------------------------------------------------------------------------
# MAST query
# --------------------------------------------------------------------------------------
def query_mast(programs, *, observations=None, modes=None, detectors=None, gratings=None,
               filters=None, archive_url: str = DEFAULT_ARCHIVE_URL, token: str | None = None,
               pagesize: int | None = None, timeout: float = 120.0, retries: int = 3,
               backoff: float = 2.0) -> list[dict]:
    """Query MAST for the level-2 RATE, CAL, RATEINTS and CALINTS products of NIRSpec programs.

    Parameters
    ----------
    programs : str, int or sequence
        JWST program IDs (``"1345"``, ``"01345"``, ``1345``, ``"jw01345"``).
    observations : int, str or sequence, optional
        Observation numbers to keep (``62`` or ``"062"``).
    modes : str or sequence, optional
        ``IFU``, ``MOS``, ``FS``, ``BOTS`` or EXP_TYPEs; default all four.
    detectors : str or sequence, optional
        ``NRS1`` and/or ``NRS2``.
    gratings, filters : str or sequence, optional
        e.g. ``G395H``/``PRISM`` and ``F290LP``/``CLEAR``.
    archive_url : str
        MAST base URL; see :func:`configure_mast_server` for the import-time caveat.
    token : str, optional
        MAST API token; default the ``MAST_API_TOKEN`` environment variable.  If set,
        the client logs in (``whoami``) before querying.
    pagesize : int, optional
        Rows per page requested from MAST (astroquery default 50000).
    timeout : float
        Seconds allowed for any single request, and for one query's polling.
    retries : int
        Extra attempts after server errors, timeouts or truncated answers.
    backoff : float
        First retry delay in seconds; doubles on every retry.

    Returns
    -------
    list of dict
        One dict per product file (unique by file name) with keys ``productFilename``,
        ``dataURI``, ``size``, ``productSubGroupDescription``, ``dataRights``,
        ``stem``, ``exp_type``, ``grating``, ``filter`` and the stem parts
        (``program``, ``observation``, ``visit``, ``exposure``, ``detector``).

    Raises
    ------
    ArchiveError
        On a refused query or token, or when retries run out.
    """
    program_ids = _normalise_programs(programs)
    exp_types = _normalise_modes(modes) or set(MODES.values())
    wanted_obs = _observation_set(observations)
    wanted_detectors = _upper_set(detectors)
    wanted_gratings = _upper_set(gratings)
    wanted_filters = _upper_set(filters)

    client = _observations_client(archive_url, timeout)
    token = _token_from_env(token)
    _check_token_transport(archive_url, token)
    if token:
        _login(client, token, archive_url, retries=retries, backoff=backoff)

    instruments = sorted({_CAOM_MODE[e][0] for e in exp_types}
                         | {name for name, e in _CAOM_ALIASES.items() if e in exp_types})
    proposal_ids = [str(int(p)) for p in program_ids]
    log.info("querying %s for JWST programs %s, %s", archive_url, ",".join(proposal_ids),
             ",".join(instruments))
    obs_table = _retrying(
        lambda: client.query_criteria(obs_collection="JWST", proposal_id=proposal_ids,
                                      instrument_name=instruments, pagesize=pagesize),
        f"observation query for programs {','.join(proposal_ids)}",
        retries=retries, backoff=backoff)

    obs_by_id = _observations_by_id(obs_table, exp_types, wanted_gratings, wanted_filters)
    if not obs_by_id:
        log.warning("no NIRSpec observations match in programs %s", proposal_ids)
        return []

    products = _product_lists(client, sorted(obs_by_id), retries=retries, backoff=backoff)
    selected = _select_products(products, obs_by_id, program_ids, wanted_obs,
                                wanted_detectors)
    log.info("%d rate/cal products selected from %d observations", len(selected),
             len(obs_by_id))
    return sorted(selected.values(), key=lambda p: p["productFilename"])


def _product_lists(client, obsids: list[str], *, retries: int, backoff: float) -> list[dict]:
    """Level-2 RATE, CAL, RATEINTS and CALINTS product rows of the observations.

    The observations are asked for in chunks of 200 (retrying server errors).
    """
    products = []
    for start in range(0, len(obsids), 200):
        chunk = obsids[start:start + 200]
        table = _retrying(lambda chunk=chunk: client.get_product_list(chunk),
                          f"product list for {len(chunk)} observations",
                          retries=retries, backoff=backoff)
        table = client.filter_products(
            table, productSubGroupDescription=["RATE", "CAL", "RATEINTS", "CALINTS"],
            calib_level=[2])
        products.extend(dict(zip(table.colnames, row, strict=True)) for row in table)
    return products


def _select_products(products: list[dict], obs_by_id: dict, program_ids, wanted_obs,
                     wanted_detectors) -> dict[str, dict]:
    """Wanted product files by name, with their observation's keys and any problem.

    A file listed twice with different sizes or URIs, an unusable name or a data URI
    that is not ``mast:`` gets a non-empty ``problem``.
    """
    selected: dict[str, dict] = {}
    for product in products:
        name = str(product["productFilename"])
        if name in selected:  # level-2 and level-3 rows list the same files
            if not _same_product(selected[name], {**product, "size": _plain(
                    product.get("size")), "dataURI": str(product["dataURI"])}):
                selected[name]["problem"] = (f"the archive lists {name} twice with "
                                             "different sizes or URIs")
            continue
        if not name.endswith(_SUFFIXES):
            continue
        stem = stem_of(name)
        parts = _stem_parts(stem)
        if not parts or parts["program"] not in program_ids:
            continue
        if wanted_obs is not None and parts["observation"] not in wanted_obs:
            continue
        if not _wanted(parts["detector"], wanted_detectors):
            continue
        obs = (obs_by_id.get(str(product.get("obsID", "")))
               or obs_by_id.get(str(product.get("parent_obsid", ""))))
        if obs is None:
            continue
        problem = _name_problem(name)
        uri = str(product["dataURI"])
        if not problem and not uri.startswith("mast:"):
            # a file: URI would make the download copy a local file of ours instead
            problem = f"the archive gives {name} the data URI {uri[:60]!r}, not a mast: URI"
        if problem:
            log.warning("%s: the archive lists a product with an unusable name: %s", stem,
                        problem)
        selected[name] = {
            "problem": problem or "",
            "productFilename": name, "dataURI": str(product["dataURI"]),
            "size": _plain(product.get("size")),
            "productSubGroupDescription": str(product["productSubGroupDescription"]),
            "dataRights": str(_plain(product.get("dataRights")) or "PUBLIC"),
            "stem": stem, **parts, **obs,
        }
    return selected


def _login(client, token, archive_url, *, retries, backoff) -> None:
    """Log the astroquery client in with the token (retrying server errors)."""
    from astroquery.exceptions import LoginError

    def login():
        try:
            client.login(token=token)
        except KeyError as exc:  # astroquery reads whoami without checking the status
            raise _Retryable("whoami answered without the 'anon' field (a server "
                             "error page?)") from exc
        except LoginError as exc:
            raise ArchiveError(f"MAST did not accept the token from {TOKEN_ENV} "
                               "(whoami answered anonymous)") from exc

    _retrying(login, "MAST login", retries=retries, backoff=backoff)
    log.info("logged in to %s with the token from %s", archive_url, TOKEN_ENV)


def _observations_by_id(obs_table, exp_types, wanted_gratings, wanted_filters) -> dict:
    """``{obsid: {exp_type, grating, filter}}`` of the observations that are selected."""
    obs_by_id: dict[str, dict] = {}
    for row in obs_table:
        caom = (str(row["instrument_name"]).upper(), str(row["dataproduct_type"]).lower())
        exp_type = (_CAOM_ALIASES.get(caom[0])
                    or next((e for e, m in _CAOM_MODE.items() if m == caom), None))
        if exp_type is None:  # e.g. NIRSPEC/SLIT with an unexpected product type
            exp_type = next((e for e, m in _CAOM_MODE.items() if m[0] == caom[0]), "")
        if exp_type not in exp_types:
            continue
        grating, filt = _split_filters(row["filters"])
        if not (_wanted(grating, wanted_gratings) and _wanted(filt, wanted_filters)):
            continue
        obs_by_id[str(row["obsid"])] = {"exp_type": exp_type, "grating": grating,
                                        "filter": filt}
    return obs_by_id


def _size(product: dict | None) -> int | None:
    size = None if product is None else product.get("size")
    if size is None or not str(size).strip().isdigit():
        return None  # unknown: the download then trusts Content-Length
    return int(size)


def _same_product(one: dict, other: dict) -> bool:
    return all(str(one.get(key)) == str(other.get(key))
               for key in ("productFilename", "dataURI", "size"))


def _row_problem(stem: str, used: list[dict],
                 conflicts: dict[tuple[str, int | None], list[str]]) -> str:
    """Why an exposure cannot be processed though the archive lists it ("" if it can).

    ``used`` are the files the exposure would be processed from (a time series' unused
    ``_rate`` files do not count), ``conflicts`` the file names listed for one product
    (kind and segment) that are not the same file.
    """
    kinds = {_split_name(f["productFilename"])[2] for f in used}
    reasons = [f"the archive lists different files for one {kind} product"
               f"{'' if segment is None else f' (seg{segment:03d})'} of {stem}: "
               + ", ".join(names)
               for (kind, segment), names in conflicts.items() if kind in kinds]
    reasons += [f["problem"] for f in used if f.get("problem")]
    return "; ".join(reasons)


def _row_skip(used: list[dict]) -> str:
    return "; ".join(f["skip"] for f in used if f.get("skip"))


def _sizes(products: list[dict]) -> int | str | None:
    """The size of one file, or the space-separated sizes of a segmented exposure's."""
    sizes = [_size(p) for p in products]
    if not sizes or None in sizes:
        return None
    return sizes[0] if len(sizes) == 1 else " ".join(map(str, sizes))


def _exposure_files(stem: str, files: dict[str, list[dict]]):
    """Which files of an exposure to process: (rate files, cal files, status, reason).

    A time series is cleaned integration by integration: its ``_rateints`` segments with
    the ``_calints`` ones, never its ``_rate`` files (segmented too, one plane each).
    Other exposures pair ``_rate`` with ``_cal`` (or a ``_calints``, for a BOTS rate).
    """
    def in_order(kind):
        return sorted(files.get(kind, []), key=lambda f: (f["segment"] or 0,
                                                          f["productFilename"]))

    status, reason = "ok", ""
    if files.get("rateints"):
        rates, cals = in_order("rateints"), in_order("calints")
        numbers = [f["segment"] for f in rates if f["segment"] is not None]
        missing = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
        if missing:
            status = "skipped"
            reason = (f"time series segment seg{missing[0]:03d} is not in the archive "
                      f"(have {', '.join(f'seg{n:03d}' for n in numbers)})")
            log.warning("%s: %s; skipped", stem, reason)
        return rates, cals, status, reason
    rates = in_order("rate")
    cals = in_order("cal") or in_order("calints")
    if len(rates) > 1:
        status = "skipped"
        reason = "segmented rate files without their rateints: not supported"
        log.warning("%s: %s; skipped", stem, reason)
    return rates, cals, status, reason


#: What to do with an exposure that has a rate but no cal file (config archive.missing_cal).
MISSING_CAL_POLICIES = ("skip", "error", "user_mask")


def build_manifest(products: Iterable[dict], *, missing_cal: str = "skip") -> Manifest:
    """Pair rate and cal products by exposure stem.

    The segments of a time series (``..._00001-seg001_nrs1_rateints.fits`` ...) are one
    exposure: one row listing them in segment order, processed from its ``_rateints``
    with its ``_calints``; a missing segment skips it (see :class:`ManifestRow`).

    Parameters
    ----------
    products : iterable of dict
        As returned by :func:`query_mast` (or built by :func:`scan_local`): each with
        ``productFilename``, ``dataURI``, ``size``, ``dataRights``, ``stem``, the stem
        parts, ``exp_type``, ``grating``, ``filter`` and optionally ``subarray``.
    missing_cal : {"skip", "error", "user_mask"}
        What to do with an exposure that has no cal file (it cannot get an automatic
        mask): list it as ``status="skipped"``, raise, or keep it (``status="ok"``,
        ``mask_source="user"``: the workflow cleans it with the mask its ``user_masks``
        configures).  ``MISSING_CAL_POLICIES`` lists them, as the workflow's schema does.

    Returns
    -------
    Manifest
        Rows sorted by stem (skipped ones included), plus the stems without cal or
        without rate.  A product dict may carry a ``problem`` (an unreadable local
        file, a file name that is a path): its exposure is listed with
        ``status="failed"`` and that reason; or a ``skip`` reason (a local file whose
        name the workflow cannot use, such as a ``... (1)`` copy): ``"skipped"``.  An
        exposure for which two different rate (or cal) files, or two different files
        for one segment, are listed fails too.  The same product listed twice is taken
        once, with a warning.  Only the files the exposure is processed from count (not
        the ``_rate`` files of a time series).

    Raises
    ------
    ArchiveError
        With ``missing_cal="error"`` when an exposure has no cal file.
    """
    if missing_cal not in MISSING_CAL_POLICIES:
        raise ValueError(f"missing_cal must be one of {', '.join(MISSING_CAL_POLICIES)}, "
                         f"not {missing_cal!r}")
    by_stem: dict[str, dict[str, list[dict]]] = {}
    conflicts: dict[str, dict[tuple[str, int | None], list[str]]] = {}
    for product in products:
        name, stem = product["productFilename"], product["stem"]
        _, segment, kind = _split_name(name)
        listed = by_stem.setdefault(stem, {}).setdefault(kind, [])
        earlier = next((f for f in listed if f["segment"] == segment), None)
        if earlier is not None:  # one product (segment) twice: the same file, or a conflict
            if _same_product(earlier, product):
                log.warning("%s: %s listed twice; taken once", stem, name)
            else:
                log.warning("%s: two different %s files listed (%s, %s)", stem, kind,
                            earlier["productFilename"], name)
                conflicts.setdefault(stem, {}).setdefault(
                    (kind, segment), [earlier["productFilename"]]).append(name)
            continue
        listed.append(dict(product, segment=segment))

    manifest = Manifest()
    for stem in sorted(by_stem):
        rates, cals, status, reason = _exposure_files(stem, by_stem[stem])
        mask_source = "cal"
        problem = _row_problem(stem, rates + cals, conflicts.get(stem, {}))
        skip = _row_skip(rates + cals)
        if problem:  # unreadable, unsafe or ambiguous: this exposure fails, alone
            status, reason = "failed", problem
            log.warning("%s: failed: %s", stem, problem)
        elif skip:
            status, reason = "skipped", skip
            log.warning("%s: skipped: %s", stem, skip)
        elif not rates:
            manifest.without_rate.append(stem)
            status, reason = "skipped", "no rate file"
            log.warning("%s: cal file but no rate file; skipped", stem)
        elif not cals:
            manifest.without_cal.append(stem)
            mask_source = "user"
            if status != "ok":  # already skipped, with its reason
                pass
            elif missing_cal == "skip":
                status, reason = "skipped", "no cal file, so no automatic mask"
                log.warning("%s: no cal file, so no automatic mask; skipped (missing_cal "
                            "'user_mask' cleans it with a configured user mask, nsclean "
                            "clean --mask with a mask of your own)", stem)
            else:
                reason = "no cal file: needs a user mask"
                log.warning("%s: no cal file; kept, it needs a user mask", stem)
        known = (rates or cals)[0]
        rights = {f["dataRights"] for f in rates + cals}
        data_rights = ("EXCLUSIVE_ACCESS" if "EXCLUSIVE_ACCESS" in rights
                       else sorted(rights)[0])
        manifest.rows.append(ManifestRow(
            stem=stem, program=known["program"], observation=known["observation"],
            visit=known["visit"], exposure=known["exposure"], detector=known["detector"],
            exp_type=known["exp_type"], subarray=known.get("subarray", ""),
            grating=known["grating"], filter=known["filter"],
            rate_file=" ".join(f["productFilename"] for f in rates),
            rate_size=_sizes(rates),
            cal_file=" ".join(f["productFilename"] for f in cals),
            cal_size=_sizes(cals),
            mask_source=mask_source, data_rights=data_rights, status=status, reason=reason,
            rate_uri=" ".join(f["dataURI"] for f in rates),
            cal_uri=" ".join(f["dataURI"] for f in cals)))
    if manifest.without_cal and missing_cal == "error":
        raise ArchiveError(f"{len(manifest.without_cal)} exposures have no cal file (so no "
                           f"automatic mask): {', '.join(manifest.without_cal)}")
    return manifest


# --------------------------------------------------------------------------------------
# local source
# --------------------------------------------------------------------------------------
def scan_local(directory: str | Path, programs=None, *, observations=None, modes=None,
               detectors=None, gratings=None, filters=None) -> list[dict]:
    """Describe the rate/cal files in a directory like :func:`query_mast` does.

    Parameters
    ----------
    directory : str or Path
        Directory holding ``*_rate.fits`` and ``*_cal.fits``, and for time series
        ``*_rateints.fits`` and ``*_calints.fits`` (with or without ``-segNNN``; not
        searched recursively).
    programs, observations, modes, detectors, gratings, filters
        Optional selections, as in :func:`query_mast`; compared with the primary
        header keywords PROGRAM, OBSERVTN, EXP_TYPE, DETECTOR, GRATING and FILTER.

    Returns
    -------
    list of dict
        Product dicts for :func:`build_manifest`; ``dataURI`` is a ``file://`` URI,
        ``dataRights`` is ``LOCAL`` and ``subarray`` comes from the header.  A file
        that cannot be read (empty, not FITS, damaged) carries a ``problem`` and one
        whose name the workflow cannot use (``... (1)_rate.fits``) a ``skip`` reason,
        so that its exposure is listed as failed or skipped and the others go on.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArchiveError(f"local source directory {directory} does not exist")
    program_ids = set(_normalise_programs(programs)) if _as_list(programs) else None
    exp_types = _normalise_modes(modes)
    wanted_obs = _observation_set(observations)
    wanted_detectors = _upper_set(detectors)
    wanted_gratings = _upper_set(gratings)
    wanted_filters = _upper_set(filters)
    products = []
    names = {p for suffix in _SUFFIXES for p in directory.glob(f"*{suffix}")}
    for path in sorted(names):
        header, problem = _local_header(path)
        stem = stem_of(path.name)
        # a copy's name ("<stem> (1)") still starts with the 30-character JWST stem
        parts = _stem_parts(stem) or _stem_parts(stem[:30])
        skip = _name_problem(path.name)
        if problem or skip:
            if not _local_wanted(parts, program_ids, wanted_obs, wanted_detectors):
                continue
            log.warning("%s: %s", path, skip or problem)
            products.append(_unusable_local(path, stem, parts, problem=problem, skip=skip))
            continue

        def keyword(key, fallback="", header=header):
            value = header.get(key)
            return fallback if value is None else str(value).strip()

        entry = {
            "productFilename": path.name, "dataURI": path.resolve().as_uri(),
            "size": path.stat().st_size, "dataRights": "LOCAL",
            "productSubGroupDescription": _split_name(path.name)[2].upper(),
            "stem": stem,
            "program": keyword("PROGRAM", parts.get("program", "")).zfill(5),
            "observation": keyword("OBSERVTN", parts.get("observation", "")).zfill(3),
            "visit": keyword("VISIT", parts.get("visit", "")).zfill(3),
            "exposure": keyword("EXPOSURE", parts.get("exposure", "")).zfill(5),
            "detector": keyword("DETECTOR", parts.get("detector", "")).upper(),
            "exp_type": keyword("EXP_TYPE").upper(),
            "subarray": keyword("SUBARRAY").upper(),
            "grating": keyword("GRATING").upper(), "filter": keyword("FILTER").upper(),
        }
        if program_ids is not None and entry["program"] not in program_ids:
            continue
        if exp_types is not None and entry["exp_type"] not in exp_types:
            continue
        if wanted_obs is not None and entry["observation"] not in wanted_obs:
            continue
        if not (_wanted(entry["detector"], wanted_detectors)
                and _wanted(entry["grating"], wanted_gratings)
                and _wanted(entry["filter"], wanted_filters)):
            continue
        products.append(entry)
    return products


def _local_header(path: Path):
    """The primary header of a local file, or why it cannot be read (not raising)."""
    from astropy.io import fits

    if not path.is_file():  # a directory, a FIFO, a device (never opened: it could block)
        what = "a dangling or looping link" if path.is_symlink() and not path.exists() \
            else "not a regular file"
        return None, f"{path.name} is {what}"
    size = path.stat().st_size
    if size == 0:
        return None, f"{path.name} is empty (0 bytes: an interrupted copy?)"
    try:
        with open(path, "rb") as handle:
            start = handle.read(30)
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"
    if not start.startswith(b"SIMPLE  =") or start[29:30] != b"T":
        what = "an HTML page" if b"<" in start.lower()[:15] else "not FITS"
        return None, f"{path.name} is not a FITS file ({what}: it starts {start[:20]!r})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reason is reported instead
            return fits.getheader(path, 0), ""
    except Exception as exc:  # astropy raises many kinds for damaged files
        return None, f"{path.name} is not a readable FITS file ({type(exc).__name__}: " \
            f"{' '.join(str(exc).split())[:120]})"


def _local_wanted(parts: dict, program_ids, wanted_obs, wanted_detectors) -> bool:
    """Selections by what the name says, for a file whose header cannot be read."""
    if program_ids is not None and parts.get("program") not in program_ids:
        return False
    if wanted_obs is not None and parts.get("observation") not in wanted_obs:
        return False
    return _wanted(parts.get("detector", ""), wanted_detectors)


def _unusable_local(path: Path, stem: str, parts: dict, *, problem: str, skip: str) -> dict:
    try:  # a dangling link or a link loop has no size
        size = path.stat().st_size
    except OSError:
        size = 0
    return {
        "productFilename": path.name, "dataURI": path.absolute().as_uri(),
        "size": size, "dataRights": "LOCAL",
        "productSubGroupDescription": _split_name(path.name)[2].upper(),
        "stem": stem, "program": parts.get("program", ""),
        "observation": parts.get("observation", ""), "visit": parts.get("visit", ""),
        "exposure": parts.get("exposure", ""), "detector": parts.get("detector", ""),
        "exp_type": "", "subarray": "", "grating": "", "filter": "",
        "problem": problem if not skip else "", "skip": skip,
    }


def fetch_manifest(programs=None, *, source: str = "mast", local_dir=None, observations=None,
                   modes=None, detectors=None, gratings=None, filters=None,
                   missing_cal: str = "skip", archive_url: str = DEFAULT_ARCHIVE_URL,
                   pagesize: int | None = None, timeout: float = 120.0,
                   retries: int = 3, backoff: float = 2.0) -> Manifest:
    """Build the exposure manifest from MAST or from a local directory.

    Parameters
    ----------
    programs : str, int or sequence
        Program IDs (required for ``source="mast"``, optional for ``"local"``).
    source : {"mast", "local"}
        Where the files come from.
    local_dir : str or Path, optional
        The directory for ``source="local"``.
    observations, modes, detectors, gratings, filters
        Selections, see :func:`query_mast`.
    missing_cal : {"skip", "error", "user_mask"}
        Policy for exposures without a cal file, see :func:`build_manifest`.
    archive_url, pagesize, timeout, retries, backoff
        Passed to :func:`query_mast`.

    Returns
    -------
    Manifest
    """
    selections = {"observations": observations, "modes": modes, "detectors": detectors,
                  "gratings": gratings, "filters": filters}
    if source == "mast":
        products = query_mast(programs, archive_url=archive_url, pagesize=pagesize,
                              timeout=timeout, retries=retries, backoff=backoff, **selections)
    elif source == "local":
        if local_dir is None:
            raise ValueError("source='local' needs local_dir")
        products = scan_local(local_dir, programs, **selections)
    else:
        raise ValueError(f"source must be 'mast' or 'local', not {source!r}")
    manifest = build_manifest(products, missing_cal=missing_cal)
    log.info("manifest: %d exposures (%d without cal, %d without rate)", len(manifest.rows),
             len(manifest.without_cal), len(manifest.without_rate))
    return manifest


# --------------------------------------------------------------------------------------
# manifest file
# --------------------------------------------------------------------------------------
def _delimiter(path) -> str:
    return "\t" if str(path).lower().endswith(".tsv") else ","


def write_manifest(manifest: Manifest | Sequence[ManifestRow], path: str | Path) -> Path:
    """Write the manifest as CSV or TSV (header = ``MANIFEST_COLUMNS``), atomically.

    Parameters
    ----------
    manifest : Manifest or sequence of ManifestRow
    path : str or Path
        A ``.tsv`` suffix writes tab-separated values, anything else commas.

    Returns
    -------
    Path
    """
    rows = manifest.rows if isinstance(manifest, Manifest) else list(manifest)
    path = Path(path)
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS,
                                delimiter=_delimiter(path))
        writer.writeheader()
        for row in rows:
            record = dataclasses.asdict(row)
            writer.writerow({k: "" if record[k] is None else record[k]
                             for k in MANIFEST_COLUMNS})
    return path


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest`.

    Parameters
    ----------
    path : str or Path
        ``.tsv``: tab-separated, anything else comma-separated.

    Returns
    -------
    list of ManifestRow
        One per stem: a stem listed again is taken once, with a warning.  A size
        column holds an int, the space-separated sizes of a segmented time series
        (a str), or None when it is empty or not a byte count (the download then
        trusts the archive's ``Content-Length``).

    Raises
    ------
    ValueError
        If columns are missing.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=_delimiter(path))
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a manifest: missing columns {sorted(missing)}")
        rows: dict[str, ManifestRow] = {}
        for record in reader:
            values = {}
            for key in MANIFEST_COLUMNS:
                value = record[key]
                if key in _INT_COLUMNS:  # a size, or the sizes of segments; else unknown
                    sizes = str(value or "").split()
                    value = (None if not sizes or not all(v.isdigit() for v in sizes)
                             else int(sizes[0]) if len(sizes) == 1 else " ".join(sizes))
                values[key] = value
            row = ManifestRow(**values)
            if row.stem in rows:  # one exposure, however often it is listed
                log.warning("%s: %s is listed more than once%s; the first row is used",
                            path, row.stem, "" if row == rows[row.stem] else
                            " with different values")
                continue
            rows[row.stem] = row
    return list(rows.values())


# --------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------
def _download_url(archive_url: str, uri: str) -> str:
    return f"{archive_url.rstrip('/')}/api/v0.1/Download/file?uri={quote(uri, safe=':/')}"


def _copy_local(uri: str, destination: Path, expected_size: int | None, started: float):
    source = Path(urlsplit(uri).path)
    if not source.is_file():
        raise DownloadError(f"{destination.name}: local source file {source} does not exist")
    size = source.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{destination.name}: local file has {size} bytes, the manifest "
                            f"says {expected_size}")
    if destination.resolve() == source.resolve():
        return DownloadResult(destination, False, 0, size, time.monotonic() - started)
    atomic_copy(source, destination)  # a hard link where possible: no space, no copying
    return DownloadResult(destination, True, 1, size, time.monotonic() - started)


def _has_size(path: Path, size: int | None) -> bool:
    """Whether ``path`` exists and has ``size`` bytes (False when ``size`` is None)."""
    return path.exists() and size is not None and path.stat().st_size == size


def download_file(uri: str, destination: str | Path, *, expected_size: int | None = None,
                  archive_url: str = DEFAULT_ARCHIVE_URL, token: str | None = None,
                  timeout: tuple[float, float] | float = (10.0, 60.0), retries: int = 4,
                  backoff: float = 1.0, max_backoff: float = 60.0,
                  session: requests.Session | None = None,
                  chunk_size: int = 1 << 20, fsync: bool = False,
                  deadline: float | None = None,
                  min_rate: float = MIN_RATE) -> DownloadResult:
    """Download one archive file into place, with a cache, atomic rename and retries.

    Parameters
    ----------
    uri : str
        MAST data URI (``mast:JWST/product/<file>``) or a ``file://`` URI (local
        source: the file is copied).
    destination : str or Path
        Final path of the file (its directory is created).
    expected_size : int, optional
        Size from the manifest.  An existing file of this size is a cache hit and no
        request is made; a download of any other size is rejected.  Without it, a
        HEAD request's ``Content-Length`` decides whether an existing file is complete.
    archive_url : str
        MAST base URL.
    token : str, optional
        MAST API token; default ``$MAST_API_TOKEN``; ``""`` forces anonymous access.
    timeout : float or (float, float)
        Connect and read timeouts in seconds (the read timeout bounds every wait for
        bytes, so a stalled transfer fails instead of hanging).
    retries : int
        Extra attempts after a server error (5xx, 408, 429), a timeout, a dropped
        connection or a size mismatch.
    backoff, max_backoff : float
        Delay before the first retry, doubling each time, capped at ``max_backoff``.
    session : requests.Session, optional
        Session to reuse (connection pooling across files).
    chunk_size : int
        Bytes per read.
    fsync : bool
        Flush the file to disk before it is renamed into place, so that a crash of the
        machine cannot leave a complete-looking but empty or short file.  Off by
        default: the download would wait for the disk (the workflow's ``fsync`` key).
    deadline : float, optional
        Seconds one attempt may take in all (the read timeout only bounds each wait,
        so a server sending a byte now and then would otherwise hold the job forever).
        Default ``DEADLINE_BASE + size / min_rate`` with the size the answer announces
        (the missing bytes when a partial download is resumed).
    min_rate : float
        Slowest transfer (bytes/s) the default deadline allows.

    Returns
    -------
    DownloadResult

    Notes
    -----
    The token goes only to the archive's origin (scheme, host and port of
    ``archive_url``), and to a non-loopback host only over https.  Redirects are
    followed (MAST sends large files to cloud storage), without the token when they
    leave that origin.  The file is created with the permissions the umask allows, like
    every other output.

    Raises
    ------
    AuthenticationRequired
        On 401/403: without a token the message says ``MAST_API_TOKEN`` is needed.
    DownloadError
        On 404 or other client errors, or when retries run out; names the file.  No
        partial file is left at ``destination`` or in its directory (only a killed
        process leaves its partial file, which the next download resumes).
    """
    started = time.monotonic()
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    name = destination.name
    if uri.startswith("file:"):
        if _has_size(destination, expected_size):
            return DownloadResult(destination, False, 0, expected_size,
                                  time.monotonic() - started)
        return _copy_local(uri, destination, expected_size, started)

    if _has_size(destination, expected_size):
        log.info("%s: cached (%d bytes)", name, expected_size)
        return DownloadResult(destination, False, 0, expected_size, time.monotonic() - started)

    # Randomly named temporaries of earlier writers that were killed (SIGKILL, a batch
    # time limit) are never complete; the resumable .<name>.part is kept.
    remove_stale_temporaries(destination, STALE_SUFFIXES)
    token = _token_from_env(token)
    _check_token_transport(archive_url, token)
    own_session = session is None
    session = session or requests.Session()
    cookies = {"mast_token": token} if token else None
    url = _download_url(archive_url, uri)
    limits = {"archive_url": archive_url, "deadline": deadline, "min_rate": min_rate}
    try:
        if destination.exists() and expected_size is None:
            head = _retrying_head(session, url, cookies, timeout, name, token,
                                  archive_url=archive_url)
            if head is not None and destination.stat().st_size == head:
                log.info("%s: cached (%d bytes, size from HEAD)", name, head)
                return DownloadResult(destination, False, 0, head, time.monotonic() - started)
        result, last_error = _download_attempts(
            session, url, cookies, timeout, destination, expected_size, chunk_size, token,
            fsync, limits, retries=retries, backoff=backoff, max_backoff=max_backoff,
            started=started)
        if result is not None:
            return result
    except DownloadError:  # refused (401, 404 ...): no partial data stays behind
        _discard_partial(destination)
        raise
    finally:
        if own_session:
            session.close()
    # Given up: no partial data stays behind (a killed process leaves its partial file,
    # and the next download resumes from it; another process's transfer keeps its own).
    _discard_partial(destination)
    raise DownloadError(f"{name}: download failed after {retries + 1} attempts from "
                        f"{archive_url}; last error: {last_error}")


def _download_attempts(session, url, cookies, timeout, destination: Path, expected_size,
                       chunk_size, token, fsync, limits, *, retries, backoff, max_backoff,
                       started):
    """Fetch the file with up to ``retries`` retries after transient failures.

    Returns
    -------
    result : DownloadResult or None
        None when every attempt failed.
    last_error : str
        What went wrong in the last failed attempt (``""`` if none failed).
    """
    name = destination.name
    last_error = ""
    for attempt in range(1, retries + 2):
        server_delay = None
        if attempt > 1 and _has_size(destination, expected_size):
            # another process's download of this file finished meanwhile
            log.info("%s: complete (%d bytes, downloaded by another process)", name,
                     expected_size)
            return DownloadResult(destination, False, attempt - 1, expected_size,
                                  time.monotonic() - started), last_error
        try:
            nbytes = _fetch_once(session, url, cookies, timeout, destination,
                                 expected_size, chunk_size, token, fsync, **limits)
            seconds = time.monotonic() - started
            log.info("%s: downloaded %d bytes in %.2f s (attempt %d)", name, nbytes,
                     seconds, attempt)
            return DownloadResult(destination, True, attempt, nbytes, seconds), last_error
        except _Retryable as exc:
            last_error = str(exc)
            server_delay = exc.retry_after
        except requests.Timeout as exc:
            last_error = f"timed out ({type(exc).__name__})"
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:
            last_error = f"connection broken ({type(exc).__name__})"
        if attempt <= retries:
            delay = _backoff_delay(attempt, backoff, max_backoff)
            if server_delay is not None:  # the server asked for a pause (429/503)
                delay = min(max(delay, server_delay), max_backoff)
            log.warning("%s: attempt %d failed: %s; retrying in %.1f s", name, attempt,
                        last_error, delay)
            time.sleep(delay)
    return None, last_error


def _auth_error(name: str, status: int, token: str) -> AuthenticationRequired:
    if token:
        return AuthenticationRequired(
            f"{name}: the archive refused access (HTTP {status}) although a token was "
            f"given in {TOKEN_ENV}; it may be expired or lack exclusive access to this "
            "program")
    return AuthenticationRequired(
        f"{name}: exclusive-access data (HTTP {status}); a MAST API token is needed: "
        f"create one at https://auth.mast.stsci.edu/token and set {TOKEN_ENV}")


def _check_status(response: requests.Response, name: str, token: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise _auth_error(name, status, token)
    if status in _RETRY_STATUS:
        retry_after = response.headers.get("Retry-After", "")
        raise _Retryable(f"HTTP {status}",
                         float(retry_after) if retry_after.strip().isdigit() else None)
    if status == 404:
        raise DownloadError(f"{name}: not found in the archive (HTTP 404)")
    if status >= 400:
        raise DownloadError(f"{name}: the archive answered HTTP {status}")


def _archive_request(session, method: str, url: str, *, archive_url: str, cookies,
                     timeout, stream: bool = False, headers=None) -> requests.Response:
    """One request, following redirects; the cookies go to the archive's origin only."""
    for _ in range(_MAX_REDIRECTS + 1):
        response = session.request(
            method, url, cookies=cookies if _same_origin(url, archive_url) else None,
            timeout=timeout, stream=stream, allow_redirects=False, headers=headers)
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["Location"])
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"the archive redirected to {urlsplit(url).scheme}: URL, "
                                "not http(s)")
    raise _Retryable(f"more than {_MAX_REDIRECTS} redirects")


def _content_length(response: requests.Response) -> int | None:
    """The announced body size; a value that is not a byte count is an odd answer."""
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    if not length.strip().isdigit():
        raise _Retryable(f"Content-Length {length[:40]!r} is not a number of bytes")
    return int(length)


def _body_blocks(response: requests.Response, chunk_size: int, started: float,
                 allowed: float):
    """Yield the body as it arrives, and stop the transfer once ``allowed`` s are used.

    ``read1`` returns what one read of the socket gives, so a server that trickles a
    byte at a time is checked against the deadline between its bytes.
    """
    raw = response.raw
    while True:
        elapsed = time.monotonic() - started
        if elapsed > allowed:
            raise _Retryable(f"too slow: not complete after {elapsed:.0f} s (the deadline "
                             f"of this attempt is {allowed:.0f} s)")
        try:
            block = raw.read1(chunk_size, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.exceptions.ReadTimeout(str(exc)) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError,
                OSError) as exc:
            raise requests.exceptions.ChunkedEncodingError(str(exc)) from None
        if not block:
            return
        yield block


def _retrying_head(session, url, cookies, timeout, name, token, *,
                   archive_url: str) -> int | None:
    try:
        with _archive_request(session, "HEAD", url, archive_url=archive_url, cookies=cookies,
                              timeout=timeout) as response:
            _check_status(response, name, token)
            return _content_length(response)
    except (_Retryable, requests.RequestException):
        return None  # the GET loop retries and reports properly


#: Seconds between progress lines of a download in the log.
PROGRESS_INTERVAL = 10.0


def partial_path(destination: Path) -> Path:
    """Where the bytes of an unfinished download of ``destination`` are kept (hidden)."""
    return destination.parent / f".{destination.name}.part"


def _open_partial(partial: Path, *, create: bool):
    """The partial file, opened for reading and writing with an exclusive ``flock``.

    Returns None when another process holds the lock (its download of the same file is
    in progress), or when the file does not exist and ``create`` is false.  The lock is
    taken without waiting, and kept only if the name still refers to the locked file (a
    process that finished renamed it into place, or gave up and removed it, meanwhile).
    """
    while True:
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                         0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            named = os.stat(partial)
        except FileNotFoundError:
            named = None
        opened = os.fstat(fd)
        if named is not None and (named.st_dev, named.st_ino) == (opened.st_dev,
                                                                   opened.st_ino):
            return os.fdopen(fd, "r+b")
        os.close(fd)
        if not create:
            return None


def _discard_partial(destination: Path) -> None:
    """Remove the partial file of a download that gave up, unless another process's
    download of the same file holds it."""
    handle = _open_partial(partial_path(destination), create=False)
    if handle is not None:
        with handle:
            partial_path(destination).unlink(missing_ok=True)


def _fetch_once(session, url, cookies, timeout, destination: Path, expected_size, chunk_size,
                token, fsync, *, archive_url: str, deadline: float | None,
                min_rate: float) -> int:
    """One GET; resumes from the partial file with a Range request when there is one.

    The bytes go to :func:`partial_path`, which is kept when the transfer breaks (the
    next attempt, or the next run after a killed job, asks for the rest with
    ``Range: bytes=<have>-``) and renamed into place only when complete.  A server that
    answers a Range request with the whole file (200) is written from the start.  The
    partial file is locked (``flock``) while this runs: a second process downloading
    the same file meanwhile does not write into it (its attempt fails and is retried),
    and :func:`_discard_partial` of another process leaves it alone.  The request
    follows redirects with the token to the archive's origin only, asks for the bytes
    as stored (``Accept-Encoding: identity``), stops at the attempt's deadline, and
    never writes more than the answer announced.
    """
    name = destination.name
    started = time.monotonic()
    partial = partial_path(destination)
    handle = _open_partial(partial, create=True)
    if handle is None:
        raise _Retryable(f"another process is downloading {name} (its partial file "
                         f"{partial.name} is locked)")
    with handle:  # closing it releases the lock, after the rename
        offset = os.fstat(handle.fileno()).st_size
        if expected_size is not None and offset > expected_size:
            handle.truncate(0)  # not a prefix of this file
            offset = 0
        if expected_size is not None and offset == expected_size:
            # complete before a crash could rename it
            publish(partial, destination)
            return offset
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with _archive_request(session, "GET", url, archive_url=archive_url, cookies=cookies,
                              timeout=timeout, stream=True, headers=headers) as response:
            if response.status_code == 416:  # the partial file is no prefix of this file
                handle.truncate(0)
                raise _Retryable("the archive refused the resume range (HTTP 416)")
            _check_status(response, name, token)
            length = _content_length(response)
            if length is None:
                raise _Retryable("no Content-Length in the answer")
            if response.status_code == 206:
                found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)",
                                     response.headers.get("Content-Range", "").strip())
                if (not found or int(found.group(1)) != offset
                        or int(found.group(2)) + 1 != int(found.group(3))
                        or length != int(found.group(3)) - offset):
                    handle.truncate(0)
                    raise _Retryable("the archive answered the resume with another range")
                total = int(found.group(3))
                log.info("%s: resuming at byte %d of %d", name, offset, total)
            else:
                offset, total = 0, length
                handle.truncate(0)
            if expected_size is not None and total != expected_size:
                raise _Retryable(f"the archive sends {total} bytes but the catalogue size "
                                 f"is {expected_size}")
            allowed = deadline if deadline is not None else DEADLINE_BASE + length / min_rate
            handle.seek(offset)
            received = offset
            body_started = last_report = time.monotonic()
            for block in _body_blocks(response, chunk_size, started, allowed):
                received += len(block)
                if received > total:  # never more on disk than was announced
                    handle.truncate(0)  # and what came is not this file
                    raise _Retryable(f"more than the announced {length} bytes")
                handle.write(block)
                now = time.monotonic()
                if now - last_report >= PROGRESS_INTERVAL:
                    last_report = now
                    log.info("%s: %d of %d bytes (%.0f %%), %.1f MB/s", name, received,
                             total, 100 * received / max(total, 1),
                             (received - offset) / 1e6 / max(now - body_started, 1e-9))
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
            if received != total:
                raise _Retryable(f"received {received} of {total} bytes")
            publish(partial, destination)
    seconds = max(time.monotonic() - body_started, 1e-9)
    log.info("%s: %d bytes transferred%s, %.1f MB/s", name, total - offset,
             f" (resumed at byte {offset})" if offset else "",
             (total - offset) / 1e6 / seconds)
    return received


def download_exposure(row: ManifestRow, directory: str | Path, **options) -> dict[str, Path]:
    """Download the rate (and cal, if any) files of one manifest row into a directory.

    Parameters
    ----------
    row : ManifestRow
    directory : str or Path
        Files keep their archive names inside it.
    **options
        Passed to :func:`download_file` (``archive_url``, ``timeout``, ``retries``...).

    Returns
    -------
    dict
        ``{"rate": path, "cal": path}`` (no ``"cal"`` key without a cal file); for a
        segmented time series the values are lists of paths, in segment order.

    Raises
    ------
    DownloadError
        As :func:`download_file`, and before any request when a file name of the row is
        not a plain file name (``../x``, an absolute path) or the row's names, URIs and
        sizes do not pair up: nothing is written outside ``directory``.
    """
    directory = Path(directory)
    for name in row.rate_files + row.cal_files:
        problem = _name_problem(name)
        if problem:
            raise DownloadError(f"{row.stem}: {problem}; refused (a file must be written "
                                f"as a plain file name inside {directory})")
    try:
        files = row.files()
    except ValueError as exc:
        raise DownloadError(f"{exc}; refused") from None
    fetched = {name: download_file(uri, directory / name, expected_size=size, **options).path
               for name, uri, size in files}
    paths = {}
    for key, names in (("rate", row.rate_files), ("cal", row.cal_files)):
        if names:
            paths[key] = fetched[names[0]] if len(names) == 1 else [fetched[n] for n in names]
    return paths
