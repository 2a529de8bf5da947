"""Find and fetch the rate and cal files of JWST NIRSpec programs.

Two sources give the same manifest (one row per exposure, see ``MANIFEST_COLUMNS``):

- ``"mast"``: the MAST archive, queried with the real ``astroquery.mast.Observations``
  client (:func:`query_mast`); files are downloaded by :func:`download_file`.
- ``"local"``: a directory of ``*_rate.fits`` / ``*_cal.fits`` files someone already
  downloaded (:func:`scan_local`); the manifest points at them with ``file://`` URIs.

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
    temporary name in the destination directory, checks the byte count against both
    ``Content-Length`` and the catalogue size, and renames atomically
    (``os.replace``); it retries server errors, timeouts, connection drops and size
    mismatches with exponential backoff and then raises :class:`DownloadError` naming
    the file.  A 401/403 is not retried: without a token it raises
    :class:`AuthenticationRequired` saying that ``MAST_API_TOKEN`` is needed.
The token
    Read from the environment variable ``MAST_API_TOKEN`` only when a request needs
    it.  It is sent as the ``mast_token`` cookie and never logged, printed, put in an
    exception message or written to the manifest.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

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
_SUFFIXES = ("_rate.fits", "_cal.fits")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


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

    ``status`` is ``"ok"`` (to be processed) or ``"skipped"``, with ``reason`` saying
    why (no cal file under the ``skip`` policy, or no rate file).  ``cal_file`` is
    empty when the archive has no cal file for the exposure (such a row is skipped, with
    ``mask_source="user"``: only a mask of your own could clean it, with ``nsclean clean
    --mask``); otherwise ``mask_source`` is ``"cal"``.
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
    rate_size: int | None
    cal_file: str
    cal_size: int | None
    mask_source: str
    data_rights: str
    status: str
    reason: str
    rate_uri: str
    cal_uri: str


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
    """Exposure stem of a rate or cal file name.

    Parameters
    ----------
    filename : str
        e.g. ``jw01345062001_03101_00001_nrs2_rate.fits`` (a path is accepted).

    Returns
    -------
    str
        e.g. ``jw01345062001_03101_00001_nrs2``.

    Raises
    ------
    ValueError
        If the name does not end in ``_rate.fits`` or ``_cal.fits``.
    """
    name = Path(filename).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name!r} is not a *_rate.fits or *_cal.fits file name")


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
    """requests adapter that supplies a timeout when the caller gave none."""

    def __init__(self, timeout, **kwargs):
        self._default_timeout = timeout
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._default_timeout
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
    adapter = _TimeoutAdapter(timeout)
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
    """Query MAST for the level-2 RATE and CAL products of NIRSpec programs.

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

    products = []
    obsids = sorted(obs_by_id)
    for start in range(0, len(obsids), 200):
        chunk = obsids[start:start + 200]
        table = _retrying(lambda chunk=chunk: client.get_product_list(chunk),
                          f"product list for {len(chunk)} observations",
                          retries=retries, backoff=backoff)
        table = client.filter_products(table, productSubGroupDescription=["RATE", "CAL"],
                                       calib_level=[2])
        products.extend(dict(zip(table.colnames, row, strict=True)) for row in table)

    selected: dict[str, dict] = {}
    for product in products:
        name = str(product["productFilename"])
        if name in selected or not name.endswith(_SUFFIXES):
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
        selected[name] = {
            "productFilename": name, "dataURI": str(product["dataURI"]),
            "size": _plain(product.get("size")),
            "productSubGroupDescription": str(product["productSubGroupDescription"]),
            "dataRights": str(_plain(product.get("dataRights")) or "PUBLIC"),
            "stem": stem, **parts, **obs,
        }
    log.info("%d rate/cal products selected from %d observations", len(selected),
             len(obs_by_id))
    return sorted(selected.values(), key=lambda p: p["productFilename"])


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
    return None if size is None else int(size)


#: What to do with an exposure that has a rate but no cal file (config archive.missing_cal).
MISSING_CAL_POLICIES = ("skip", "error")


def build_manifest(products: Iterable[dict], *, missing_cal: str = "skip") -> Manifest:
    """Pair rate and cal products by exposure stem.

    Parameters
    ----------
    products : iterable of dict
        As returned by :func:`query_mast` (or built by :func:`scan_local`): each with
        ``productFilename``, ``dataURI``, ``size``, ``dataRights``, ``stem``, the stem
        parts, ``exp_type``, ``grating``, ``filter`` and optionally ``subarray``.
    missing_cal : {"skip", "error"}
        What to do with an exposure that has no cal file (it cannot get an automatic
        mask): list it as ``status="skipped"``, keep it (``status="ok"``,
        ``mask_source="user"``), or raise.

    Returns
    -------
    Manifest
        Rows sorted by stem (skipped ones included), plus the stems without cal or
        without rate.

    Raises
    ------
    ArchiveError
        With ``missing_cal="error"`` when an exposure has no cal file.
    """
    if missing_cal not in MISSING_CAL_POLICIES:
        raise ValueError(f"missing_cal must be one of {', '.join(MISSING_CAL_POLICIES)}, "
                         f"not {missing_cal!r}")
    by_stem: dict[str, dict[str, dict]] = {}
    for product in products:
        name = product["productFilename"]
        kind = "rate" if name.endswith("_rate.fits") else "cal"
        by_stem.setdefault(product["stem"], {})[kind] = product

    manifest = Manifest()
    for stem in sorted(by_stem):
        files = by_stem[stem]
        rate, cal = files.get("rate"), files.get("cal")
        status, reason, mask_source = "ok", "", "cal"
        if rate is None:
            manifest.without_rate.append(stem)
            status, reason = "skipped", "no rate file"
            log.warning("%s: cal file but no rate file; skipped", stem)
        elif cal is None:
            manifest.without_cal.append(stem)
            mask_source = "user"
            status, reason = "skipped", "no cal file, so no automatic mask"
            log.warning("%s: no cal file, so no automatic mask; skipped (nsclean clean "
                        "--mask cleans it with a mask of your own)", stem)
        known = rate or cal
        rights = {f["dataRights"] for f in (rate, cal) if f is not None}
        data_rights = ("EXCLUSIVE_ACCESS" if "EXCLUSIVE_ACCESS" in rights
                       else sorted(rights)[0])
        manifest.rows.append(ManifestRow(
            stem=stem, program=known["program"], observation=known["observation"],
            visit=known["visit"], exposure=known["exposure"], detector=known["detector"],
            exp_type=known["exp_type"], subarray=known.get("subarray", ""),
            grating=known["grating"], filter=known["filter"],
            rate_file=rate["productFilename"] if rate else "",
            rate_size=_size(rate),
            cal_file=cal["productFilename"] if cal else "",
            cal_size=_size(cal),
            mask_source=mask_source, data_rights=data_rights, status=status, reason=reason,
            rate_uri=rate["dataURI"] if rate else "", cal_uri=cal["dataURI"] if cal else ""))
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
        Directory holding ``*_rate.fits`` and ``*_cal.fits`` (not searched recursively).
    programs, observations, modes, detectors, gratings, filters
        Optional selections, as in :func:`query_mast`; compared with the primary
        header keywords PROGRAM, OBSERVTN, EXP_TYPE, DETECTOR, GRATING and FILTER.

    Returns
    -------
    list of dict
        Product dicts for :func:`build_manifest`; ``dataURI`` is a ``file://`` URI,
        ``dataRights`` is ``LOCAL`` and ``subarray`` comes from the header.
    """
    from astropy.io import fits

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
    for path in sorted(p for suffix in _SUFFIXES for p in directory.glob(f"*{suffix}")):
        header = fits.getheader(path, 0)
        stem = stem_of(path.name)
        parts = _stem_parts(stem)

        def keyword(key, fallback="", header=header):
            value = header.get(key)
            return fallback if value is None else str(value).strip()

        entry = {
            "productFilename": path.name, "dataURI": path.resolve().as_uri(),
            "size": path.stat().st_size, "dataRights": "LOCAL",
            "productSubGroupDescription": "RATE" if path.name.endswith("_rate.fits")
            else "CAL",
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
    missing_cal : {"skip", "error"}
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
    from ..io.atomic import atomic_file

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
        rows = []
        for record in reader:
            values = {}
            for key in MANIFEST_COLUMNS:
                value = record[key]
                if key in _INT_COLUMNS:
                    value = int(value) if value not in ("", None) else None
                values[key] = value
            rows.append(ManifestRow(**values))
    return rows


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
    from ..io.atomic import atomic_copy

    atomic_copy(source, destination)  # a hard link where possible: no space, no copying
    return DownloadResult(destination, True, 1, size, time.monotonic() - started)


def download_file(uri: str, destination: str | Path, *, expected_size: int | None = None,
                  archive_url: str = DEFAULT_ARCHIVE_URL, token: str | None = None,
                  timeout: tuple[float, float] | float = (10.0, 60.0), retries: int = 4,
                  backoff: float = 1.0, max_backoff: float = 60.0,
                  session: requests.Session | None = None,
                  chunk_size: int = 1 << 20, fsync: bool = False) -> DownloadResult:
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

    Returns
    -------
    DownloadResult

    Raises
    ------
    AuthenticationRequired
        On 401/403: without a token the message says ``MAST_API_TOKEN`` is needed.
    DownloadError
        On 404 or other client errors, or when retries run out; names the file.  No
        partial file is left at ``destination`` or in its directory.
    """
    started = time.monotonic()
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    name = destination.name
    if uri.startswith("file:"):
        if destination.exists() and expected_size is not None \
                and destination.stat().st_size == expected_size:
            return DownloadResult(destination, False, 0, expected_size,
                                  time.monotonic() - started)
        return _copy_local(uri, destination, expected_size, started)

    if destination.exists() and expected_size is not None \
            and destination.stat().st_size == expected_size:
        log.info("%s: cached (%d bytes)", name, expected_size)
        return DownloadResult(destination, False, 0, expected_size, time.monotonic() - started)

    # Temporary files of an earlier attempt that was killed (SIGKILL, a batch time
    # limit) are never complete; this download replaces them.
    for stale in destination.parent.glob(f".{glob_escape(name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    token = _token_from_env(token)
    own_session = session is None
    session = session or requests.Session()
    cookies = {"mast_token": token} if token else None
    url = _download_url(archive_url, uri)
    last_error = ""
    try:
        if destination.exists() and expected_size is None:
            head = _retrying_head(session, url, cookies, timeout, name, token)
            if head is not None and destination.stat().st_size == head:
                log.info("%s: cached (%d bytes, size from HEAD)", name, head)
                return DownloadResult(destination, False, 0, head, time.monotonic() - started)
        for attempt in range(1, retries + 2):
            server_delay = None
            try:
                nbytes = _fetch_once(session, url, cookies, timeout, destination,
                                     expected_size, chunk_size, token, fsync)
                seconds = time.monotonic() - started
                log.info("%s: downloaded %d bytes in %.2f s (attempt %d)", name, nbytes,
                         seconds, attempt)
                return DownloadResult(destination, True, attempt, nbytes, seconds)
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
    finally:
        if own_session:
            session.close()
    raise DownloadError(f"{name}: download failed after {retries + 1} attempts from "
                        f"{archive_url}; last error: {last_error}")


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


def _retrying_head(session, url, cookies, timeout, name, token) -> int | None:
    try:
        with session.head(url, cookies=cookies, timeout=timeout,
                          allow_redirects=True) as response:
            _check_status(response, name, token)
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    except (_Retryable, requests.RequestException):
        return None  # the GET loop retries and reports properly


def _fetch_once(session, url, cookies, timeout, destination: Path, expected_size, chunk_size,
                token, fsync) -> int:
    name = destination.name
    with session.get(url, cookies=cookies, timeout=timeout, stream=True) as response:
        _check_status(response, name, token)
        length = response.headers.get("Content-Length")
        if length is None:
            raise _Retryable("no Content-Length in the answer")
        length = int(length)
        if expected_size is not None and length != expected_size:
            raise _Retryable(f"the archive sends {length} bytes but the catalogue size is "
                             f"{expected_size}")
        from ..io.atomic import atomic_file

        received = 0
        # A short body raises inside the block: the destination is left as it was.
        with atomic_file(destination, fsync=fsync) as handle:
            for block in response.iter_content(chunk_size):
                handle.write(block)
                received += len(block)
            if received != length:
                raise _Retryable(f"received {received} of {length} bytes")
    return received


def download_exposure(row: ManifestRow, directory: str | Path, **options) -> dict[str, Path]:
    """Download the rate (and cal, if any) file of one manifest row into a directory.

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
        ``{"rate": path, "cal": path}`` (no ``"cal"`` key without a cal file).
    """
    directory = Path(directory)
    paths = {"rate": download_file(row.rate_uri, directory / row.rate_file,
                                   expected_size=row.rate_size, **options).path}
    if row.cal_file:
        paths["cal"] = download_file(row.cal_uri, directory / row.cal_file,
                                     expected_size=row.cal_size, **options).path
    return paths
