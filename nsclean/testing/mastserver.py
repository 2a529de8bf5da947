"""A small MAST-speaking HTTP server on loopback, for tests and the offline demo.

It answers the requests that ``astroquery.mast.Observations`` (0.4.x) makes, for a
catalogue built from the primary headers of the FITS files in one directory:

- ``POST /portal/Mashup/Mashup.asmx/columnsconfig`` (form ``colConfigId=...``):
  column configurations for ``Mast.Caom.Cone`` and ``Mast.Caom.Products``;
- ``POST /api/v0/invoke`` (form ``request=<JSON>``): the services
  ``Mast.Caom.Filtered`` (observations matching filters) and ``Mast.Caom.Products``
  (products of a comma-separated list of ``obsid``), with paging and, on request, an
  ``EXECUTING`` answer to the first poll(s);
- ``HEAD``/``GET /api/v0.1/Download/file?uri=mast:JWST/product/<file>``: the file,
  with ``Content-Length``; exclusive-access files answer 401 without a valid
  ``mast_token`` cookie;
- ``GET /whoami``: ``{"anon": false, ...}`` for a known token, ``{"anon": true}``
  otherwise.

The catalogue follows what MAST holds for JWST: one level-3 observation row per
program, observation and instrument set-up (``obs_id`` like
``jw01345-o062_t001_nirspec_prism-clear``) and one level-2 row per exposure
(``obs_id`` equal to the file stem, e.g. ``jw01345062001_03101_00001_nrs2``).  The
products of a level-3 row are the files of all its exposures; the products of a
level-2 row are the files of that exposure.  ``proposal_id`` has no leading zeros.

Fault injection
---------------
``faults`` maps a target to fault kinds.  A target is a product file name (applies
to GET downloads of that file), a service name (``Mast.Caom.Filtered``,
``Mast.Caom.Products``), ``columnsconfig`` or ``whoami``.  A list of kinds is
consumed one per request (so a retry can succeed); a single string applies to every
request.  Kinds:

``"500"``, ``"503"``
    answer with that HTTP status (file downloads: 503 with ``Retry-After: 1``).
``"slow"``
    send the headers and half the body, wait ``slow_seconds``, then send the rest
    (JSON answers: wait before answering).
``"cut"``
    announce the full ``Content-Length``, send half the body, close the connection.
``"wrong_size"``
    send a consistent but shorter body (``Content-Length`` = catalogue size - 100).

Run ``python -m nsclean.testing.mastserver --root DIR`` to serve a directory for the demo.
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from astropy.io import fits

__all__ = ["Catalogue", "MastServer", "RequestRecord", "build_catalogue", "main"]

_MODE_BY_EXP_TYPE = {
    # EXP_TYPE -> (CAOM instrument_name, CAOM dataproduct_type)
    "NRS_IFU": ("NIRSPEC/IFU", "cube"),
    "NRS_MSASPEC": ("NIRSPEC/MSA", "spectrum"),
    "NRS_FIXEDSLIT": ("NIRSPEC/SLIT", "spectrum"),
    "NRS_BRIGHTOBJ": ("NIRSPEC/SLIT", "timeseries"),
}

_FILE_SUFFIXES = {
    # file-name suffix -> (productSubGroupDescription, calib_level)
    "uncal": ("UNCAL", 1),
    "rate": ("RATE", 2),
    "rateints": ("RATEINTS", 2),
    "cal": ("CAL", 2),
    "calints": ("CALINTS", 2),
}

_OBS_FIELDS = [
    ("intentType", "string"), ("obs_collection", "string"), ("provenance_name", "string"),
    ("instrument_name", "string"), ("project", "string"), ("filters", "string"),
    ("wavelength_region", "string"), ("target_name", "string"),
    ("target_classification", "string"), ("obs_id", "string"), ("s_ra", "float"),
    ("s_dec", "float"), ("dataproduct_type", "string"), ("proposal_pi", "string"),
    ("calib_level", "int"), ("t_min", "float"), ("t_max", "float"), ("t_exptime", "float"),
    ("em_min", "float"), ("em_max", "float"), ("obs_title", "string"),
    ("t_obs_release", "float"), ("proposal_id", "string"), ("proposal_type", "string"),
    ("sequence_number", "int"), ("s_region", "string"), ("jpegURL", "string"),
    ("dataURL", "string"), ("dataRights", "string"), ("mtFlag", "boolean"),
    ("srcDen", "float"), ("obsid", "string"), ("objID", "string"),
]

_PRODUCT_FIELDS = [
    ("obsID", "string"), ("obs_collection", "string"), ("dataproduct_type", "string"),
    ("obs_id", "string"), ("description", "string"), ("type", "string"),
    ("dataURI", "string"), ("productType", "string"), ("productGroupDescription", "string"),
    ("productSubGroupDescription", "string"), ("productDocumentationURL", "string"),
    ("project", "string"), ("prvversion", "string"), ("proposal_id", "string"),
    ("productFilename", "string"), ("size", "int"), ("parent_obsid", "string"),
    ("dataRights", "string"), ("calib_level", "int"), ("filters", "string"),
]

_CONTINUOUS_TYPES = {"float", "double"}


@dataclass
class RequestRecord:
    """One request as the server saw it (never the token value).

    Attributes
    ----------
    method, path : str
        HTTP method and URL path.
    target : str
        Service name, ``columnsconfig``, ``whoami`` or the product file name.
    status : int
        HTTP status sent (0 if the connection was cut before a status line).
    fault : str
        The injected fault kind, or ``""``.
    authenticated : bool
        Whether a valid ``mast_token`` cookie came with the request.
    executing : bool
        Whether the answer was an ``EXECUTING`` poll.
    page : int
        Page requested (invoke requests), else 0.
    range : str
        The ``Range`` header of a download (``"bytes=1000-"``), or ``""``.
    """

    method: str
    path: str
    target: str
    status: int = 0
    fault: str = ""
    authenticated: bool = False
    executing: bool = False
    page: int = 0
    range: str = ""


@dataclass
class Catalogue:
    """What the server serves: observation rows, products per ``obsid``, file paths."""

    observations: list[dict] = field(default_factory=list)
    products_by_obsid: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _column_config(fields: list[tuple[str, str]]) -> dict:
    config = {"_selected_": {"text": "selected", "type": "boolean", "hidden": True}}
    for name, kind in fields:
        entry = {"text": name, "vot.datatype": "double" if kind == "float" else kind,
                 "vot.ID": name, "vot.name": name}
        if name in ("filters", "obs_collection", "instrument_name"):
            entry["separator"] = ";"
        config[name] = entry
    return config


_SEGMENT = re.compile(r"(_\d{5})-seg\d{3}(?=_)", re.IGNORECASE)


def _header_value(header, key, default=""):
    value = header.get(key, default)
    return default if value is None else value


def build_catalogue(root: str | Path, *, exclusive: Iterable[str] = ()) -> Catalogue:
    """Build the MAST catalogue served for a directory of JWST NIRSpec FITS files.

    Parameters
    ----------
    root : str or Path
        Directory searched (not recursively) for ``jw*_<suffix>.fits`` files, with
        ``<suffix>`` one of uncal, rate, rateints, cal, calints.
    exclusive : iterable of str
        File names to mark ``EXCLUSIVE_ACCESS``; every other file is ``PUBLIC``.

    Returns
    -------
    Catalogue
        Observation rows, products per ``obsid`` and the file paths by name.

    Notes
    -----
    PROGRAM, OBSERVTN, VISIT, EXP_TYPE, DETECTOR, GRATING, FILTER, TARGPROP,
    TARG_RA, TARG_DEC and EFFEXPTM are read from each primary header.  Files whose
    EXP_TYPE is not a NIRSpec spectroscopic mode are served as ``NIRSPEC/IMAGE``.
    """
    exclusive = set(exclusive)
    catalogue = Catalogue()
    exposures: dict[str, dict] = {}
    for path in sorted(Path(root).glob("jw*_*.fits")):
        stem, _, suffix = path.stem.rpartition("_")
        if suffix not in _FILE_SUFFIXES:
            continue
        # A segmented time series is one exposure (one level-2 observation) with a file
        # per segment: jw..._00001-seg002_nrs1_rateints.fits belongs to jw..._00001_nrs1.
        stem = _SEGMENT.sub(r"\1", stem)
        header = fits.getheader(path, 0)
        exposure = exposures.setdefault(stem, {"header": header, "files": []})
        exposure["files"].append((path, suffix))
        catalogue.files[path.name] = path

    level3: dict[str, dict] = {}
    next_obsid = 90000001
    for stem, exposure in sorted(exposures.items()):
        header = exposure["header"]
        program = str(_header_value(header, "PROGRAM", stem[2:7])).zfill(5)
        observation = str(_header_value(header, "OBSERVTN", stem[7:10])).zfill(3)
        exp_type = str(_header_value(header, "EXP_TYPE", "")).upper()
        instrument, product_type = _MODE_BY_EXP_TYPE.get(exp_type, ("NIRSPEC/IMAGE", "image"))
        grating = str(_header_value(header, "GRATING", "")).upper()
        filt = str(_header_value(header, "FILTER", "")).upper()
        rights = ("EXCLUSIVE_ACCESS"
                  if any(p.name in exclusive for p, _ in exposure["files"]) else "PUBLIC")
        common = {
            "intentType": "science", "obs_collection": "JWST", "provenance_name": "CALJWST",
            "instrument_name": instrument, "project": "JWST",
            "filters": f"{filt};{grating}", "wavelength_region": "INFRARED",
            "target_name": str(_header_value(header, "TARGPROP", "UNKNOWN")),
            "target_classification": "", "s_ra": float(_header_value(header, "TARG_RA", 0.0)),
            "s_dec": float(_header_value(header, "TARG_DEC", 0.0)),
            "dataproduct_type": product_type, "proposal_pi": "Loopback, Server",
            "t_min": None, "t_max": None,
            "t_exptime": float(_header_value(header, "EFFEXPTM", 0.0)),
            "em_min": None, "em_max": None, "obs_title": f"Loopback program {program}",
            "t_obs_release": None, "proposal_id": str(int(program)), "proposal_type": "GO",
            "sequence_number": None, "s_region": "", "jpegURL": None, "dataURL": None,
            "mtFlag": False, "srcDen": None, "objID": None,
        }
        l3_id = (f"jw{program}-o{observation}_t001_nirspec_"
                 f"{grating.lower()}-{filt.lower()}")
        if l3_id not in level3:
            row = dict(common, obs_id=l3_id, calib_level=3, dataRights="PUBLIC",
                       obsid=str(next_obsid))
            next_obsid += 1
            level3[l3_id] = row
            catalogue.observations.append(row)
            catalogue.products_by_obsid[row["obsid"]] = []
        parent = level3[l3_id]
        if rights == "EXCLUSIVE_ACCESS":
            parent["dataRights"] = "EXCLUSIVE_ACCESS"
        row2 = dict(common, obs_id=stem, calib_level=2, dataRights=rights,
                    obsid=str(next_obsid))
        next_obsid += 1
        catalogue.observations.append(row2)
        catalogue.products_by_obsid[row2["obsid"]] = []
        for path, suffix in exposure["files"]:
            subgroup, level = _FILE_SUFFIXES[suffix]
            product = {
                "obsID": row2["obsid"], "obs_collection": "JWST",
                "dataproduct_type": product_type, "obs_id": stem,
                "description": f"exposure/{suffix}", "type": "S",
                "dataURI": f"mast:JWST/product/{path.name}", "productType": "SCIENCE",
                "productGroupDescription": "", "productSubGroupDescription": subgroup,
                "productDocumentationURL": "", "project": "CALJWST", "prvversion": "1.0",
                "proposal_id": common["proposal_id"], "productFilename": path.name,
                "size": path.stat().st_size, "dataRights": (
                    "EXCLUSIVE_ACCESS" if path.name in exclusive else "PUBLIC"),
                "calib_level": level, "filters": common["filters"],
            }
            catalogue.products_by_obsid[row2["obsid"]].append(
                dict(product, parent_obsid=row2["obsid"]))
            catalogue.products_by_obsid[parent["obsid"]].append(
                dict(product, parent_obsid=parent["obsid"]))
    _add_associations(catalogue, root)
    return catalogue


_ASSOCIATION = re.compile(r"^jw(\d{5})-o(\d{3})_.*_asn\.json$", re.IGNORECASE)


def _add_associations(catalogue: Catalogue, root) -> None:
    """Serve ``jw<program>-o<obs>_..._asn.json`` files as MAST does: products (ASN) of the
    program's level-3 observations of that observation number."""
    for path in sorted(Path(root).glob("jw*_asn.json")):
        found = _ASSOCIATION.match(path.name)
        if not found:
            continue
        prefix = f"jw{found.group(1)}-o{found.group(2)}_"
        for row in catalogue.observations:
            if row["calib_level"] != 3 or not row["obs_id"].startswith(prefix):
                continue
            catalogue.products_by_obsid[row["obsid"]].append({
                "obsID": row["obsid"], "obs_collection": "JWST",
                "dataproduct_type": row["dataproduct_type"], "obs_id": row["obs_id"],
                "description": "association", "type": "D",
                "dataURI": f"mast:JWST/product/{path.name}", "productType": "INFO",
                "productGroupDescription": "", "productSubGroupDescription": "ASN",
                "productDocumentationURL": "", "project": "CALJWST", "prvversion": "1.0",
                "proposal_id": row["proposal_id"], "productFilename": path.name,
                "size": path.stat().st_size, "dataRights": "PUBLIC", "calib_level": 3,
                "filters": row["filters"], "parent_obsid": row["obsid"]})
            catalogue.files[path.name] = path


def _matches(row: dict, flt: dict, kinds: dict[str, str]) -> bool:
    name = flt.get("paramName", "")
    value = row.get(name)
    if kinds.get(name) in _CONTINUOUS_TYPES:
        for bounds in flt.get("values", []):
            if value is not None and bounds["min"] <= value <= bounds["max"]:
                return True
        return False
    separator = flt.get("separator")
    text = "" if value is None else str(value)
    parts = text.split(separator) if separator else [text]
    parts = {p.strip().casefold() for p in parts}
    wanted = {str(v).casefold() for v in flt.get("values", [])}
    if parts & wanted:
        return True
    free_text = flt.get("freeText")
    if free_text:
        import fnmatch

        pattern = free_text.replace("%", "*").casefold()
        return any(fnmatch.fnmatchcase(p, pattern) for p in parts)
    return False


class MastServer:
    """A MAST-protocol HTTP server on 127.0.0.1 serving a directory of FITS files.

    Parameters
    ----------
    root : str or Path
        Directory of ``jw*_rate.fits``, ``jw*_cal.fits`` (and similar) files.
    port : int
        TCP port; 0 (default) picks a free ephemeral port.
    host : str
        Loopback address to bind; anything not loopback is refused.
    exclusive : iterable of str
        File names served as ``EXCLUSIVE_ACCESS`` (401 without a valid token).
    tokens : mapping of str to str
        Accepted MAST tokens and the display name ``whoami`` returns for each.
    faults : mapping of str to str or list of str
        Injected faults, see the module documentation.
    max_page_size : int, optional
        Cap on the page size, to force paging (the client's ``pagesize`` is honoured
        below it).
    executing_polls : int
        Number of ``EXECUTING`` answers before each invoke request completes.
    slow_seconds : float
        Stall of the ``"slow"`` fault.

    Attributes
    ----------
    url : str
        Base URL, e.g. ``http://127.0.0.1:40123`` (valid once started).
    requests : list of RequestRecord
        Every request served, in order.

    Examples
    --------
    >>> with MastServer("sim/", faults={"x_rate.fits": ["500"]}) as server:  # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, root, *, port: int = 0, host: str = "127.0.0.1",
                 exclusive: Iterable[str] = (), tokens: Mapping[str, str] | None = None,
                 faults: Mapping[str, str | list[str]] | None = None,
                 max_page_size: int | None = None, executing_polls: int = 0,
                 slow_seconds: float = 2.0):
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"MastServer binds loopback addresses only, not {host!r}")
        self.root = Path(root)
        self.host = host
        self.port = port
        self.exclusive = set(exclusive)
        self.tokens = dict(tokens or {})
        self.max_page_size = max_page_size
        self.executing_polls = int(executing_polls)
        self.slow_seconds = float(slow_seconds)
        self.requests: list[RequestRecord] = []
        self.catalogue = build_catalogue(self.root, exclusive=self.exclusive)
        self._faults: dict[str, str | list[str]] = {}
        self._lock = threading.Lock()
        self._polls: dict[str, int] = {}
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for target, kinds in (faults or {}).items():
            self.add_faults(target, kinds)

    # -- public control -------------------------------------------------------------
    def add_faults(self, target: str, kinds: str | list[str]) -> None:
        """Inject faults for one target (a list is consumed one per request).

        Parameters
        ----------
        target : str
            File name, service name, ``columnsconfig`` or ``whoami``.
        kinds : str or list of str
            ``"500"``, ``"503"``, ``"slow"``, ``"cut"`` or ``"wrong_size"``; a plain
            string is persistent.
        """
        allowed = {"500", "503", "slow", "cut", "wrong_size"}
        for kind in [kinds] if isinstance(kinds, str) else kinds:
            if kind not in allowed:
                raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(allowed)}")
        with self._lock:
            self._faults[target] = kinds if isinstance(kinds, str) else list(kinds)

    def count(self, target: str, method: str | None = None) -> int:
        """Number of requests served for ``target`` (optionally one HTTP method)."""
        with self._lock:
            return sum(1 for r in self.requests
                       if r.target == target and (method is None or r.method == method))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    #: Request handler class (a subclass may serve other answers).
    handler_class = None

    def start(self) -> MastServer:
        """Bind and serve in a daemon thread; returns self."""
        handler = type("_BoundHandler", (self.handler_class or _Handler,), {"mast": self})
        self._httpd = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MastServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler --------------------------------------------------------
    def _take_fault(self, target: str) -> str:
        with self._lock:
            kinds = self._faults.get(target)
            if isinstance(kinds, str):
                return kinds
            if kinds:
                return kinds.pop(0)
            return ""

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _executing(self, key: str) -> bool:
        with self._lock:
            seen = self._polls.get(key, 0)
            self._polls[key] = seen + 1
            return seen < self.executing_polls


class _Handler(http.server.BaseHTTPRequestHandler):
    mast: MastServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # quiet: tests read MastServer.requests instead

    # -- helpers --------------------------------------------------------------------
    def _authenticated(self) -> str | None:
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        token = cookie["mast_token"].value if "mast_token" in cookie else None
        return self.mast.tokens.get(token) if token else None

    def _send(self, record: RequestRecord, status: int, body: bytes,
              content_type: str = "application/json", fault: str = "",
              extra_headers: dict | None = None, head: bool = False,
              recorded: bool = False) -> None:
        record.status, record.fault = status, fault
        if not recorded:
            self.mast._record(record)
        announced = len(body)
        if fault == "wrong_size":
            body = body[:-100] if len(body) > 100 else body[:-1]
            announced = len(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(announced))
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        if fault == "cut":
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        try:
            if fault == "cut":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif fault == "slow":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(self.mast.slow_seconds)
                self.wfile.write(body[len(body) // 2:])
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _send_json(self, record, payload, fault=""):
        if fault in ("500", "503"):
            self._send(record, int(fault), b'{"status": "ERROR", "msg": "injected"}',
                       fault=fault)
            return
        body = json.dumps(payload).encode()
        if fault == "slow":  # record on arrival: the client may give up before the answer
            record.fault = fault
            self.mast._record(record)
            time.sleep(self.mast.slow_seconds)
            self._send(record, 200, body, recorded=True)
            record.fault = fault
            return
        self._send(record, 200, body, fault=fault)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length", 0) or 0)
        raw = self.rfile.read(length).decode() if length else ""
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    # -- verbs ----------------------------------------------------------------------
    def do_POST(self):  # noqa: N802 - the stdlib's name
        path = urlsplit(self.path).path
        form = self._form()
        authenticated = self._authenticated() is not None
        if path.endswith("/Mashup.asmx/columnsconfig"):
            record = RequestRecord("POST", path, "columnsconfig", authenticated=authenticated)
            fault = self.mast._take_fault("columnsconfig")
            config_id = form.get("colConfigId", "")
            if config_id.startswith("Mast.Caom.Products"):
                payload = _column_config(_PRODUCT_FIELDS)
            elif config_id.startswith("Mast.Caom"):
                payload = _column_config(_OBS_FIELDS)
            else:
                payload = {}
            self._send_json(record, payload, fault)
        elif path == "/api/v0/invoke":
            self._invoke(path, form, authenticated)
        else:
            record = RequestRecord("POST", path, path, authenticated=authenticated)
            self._send(record, 404, b'{"status": "ERROR", "msg": "not found"}')

    def _invoke(self, path, form, authenticated):
        try:
            request = json.loads(unquote(form.get("request", "")) or "{}")
        except json.JSONDecodeError:
            request = {}
        service = request.get("service", "")
        record = RequestRecord("POST", path, service, authenticated=authenticated)
        fault = self.mast._take_fault(service)
        if fault in ("500", "503"):
            self._send_json(record, {}, fault)
            return
        key = f"{request.get('cacheBreaker')}:{request.get('page')}"
        record.page = int(request.get("page") or 0)
        if self.mast._executing(key):
            record.executing = True
            self._send_json(record, {"status": "EXECUTING", "msg": "", "data": [],
                                     "fields": []}, fault)
            return
        params = request.get("params", {})
        if service == "Mast.Caom.Filtered":
            kinds = dict(_OBS_FIELDS)
            unknown = [f["paramName"] for f in params.get("filters", [])
                       if f.get("paramName") not in kinds]
            if unknown:
                self._send_json(record, {"status": "ERROR", "msg": f"unknown column {unknown}",
                                         "data": [], "fields": []}, fault)
                return
            rows = [row for row in self.mast.catalogue.observations
                    if all(_matches(row, f, kinds) for f in params.get("filters", []))]
            fields = _OBS_FIELDS
        elif service == "Mast.Caom.Products":
            rows = []
            for obsid in str(params.get("obsid", "")).split(","):
                rows.extend(self.mast.catalogue.products_by_obsid.get(obsid.strip(), []))
            fields = _PRODUCT_FIELDS
        else:
            self._send_json(record, {"status": "ERROR", "msg": f"unknown service {service}",
                                     "data": [], "fields": []}, fault)
            return
        page_size = int(request.get("pagesize") or 50000)
        if self.mast.max_page_size:
            page_size = min(page_size, self.mast.max_page_size)
        page = max(int(request.get("page") or 1), 1)
        pages = max(1, -(-len(rows) // page_size))
        chunk = rows[(page - 1) * page_size: page * page_size]
        payload = {
            "status": "COMPLETE", "msg": "",
            "fields": [{"name": n, "type": t} for n, t in fields],
            "data": chunk,
            "paging": {"page": page, "pageSize": page_size, "pagesFiltered": pages,
                       "rows": len(chunk), "rowsFiltered": len(rows), "rowsTotal": len(rows)},
        }
        self._send_json(record, payload, fault)

    def do_GET(self):  # noqa: N802
        self._get_or_head(head=False)

    def do_HEAD(self):  # noqa: N802
        self._get_or_head(head=True)

    def _get_or_head(self, head: bool):
        parts = urlsplit(self.path)
        method = "HEAD" if head else "GET"
        user = self._authenticated()
        if parts.path == "/whoami":
            record = RequestRecord(method, parts.path, "whoami", authenticated=user is not None)
            fault = self.mast._take_fault("whoami")
            if user is None:
                payload = {"anon": True, "attrib": {}, "info": {}}
            else:
                payload = {"anon": False, "attrib": {"display_name": user},
                           "info": {"scopes": ["mast:exclusive_access"]}}
            self._send_json(record, payload, fault)
            return
        if parts.path != "/api/v0.1/Download/file":
            record = RequestRecord(method, parts.path, parts.path)
            self._send(record, 404, b"not found", "text/plain", head=head)
            return
        uri = parse_qs(parts.query).get("uri", [""])[0]
        name = uri.rsplit("/", 1)[-1]
        record = RequestRecord(method, parts.path, name, authenticated=user is not None)
        path = self.mast.catalogue.files.get(name)
        if path is None:
            self._send(record, 404, f"no such product {name}".encode(), "text/plain", head=head)
            return
        if name in self.mast.exclusive and user is None:
            self._send(record, 401, b"exclusive access: a MAST token is required",
                       "text/plain", head=head)
            return
        fault = "" if head else self.mast._take_fault(name)
        if fault in ("500", "503"):
            self._send(record, int(fault), b"injected server error", "text/plain", fault=fault,
                       extra_headers={"Retry-After": "1"} if fault == "503" else None)
            return
        if head or not fault:  # stream the file: real exposures are ~84 MB each
            size = path.stat().st_size
            start, end = 0, size - 1
            record.range = self.headers.get("Range", "") if not head else ""
            if record.range:
                # RFC 9110 single byte range, as MAST serves it: "bytes=<first>-[<last>]"
                found = re.fullmatch(r"bytes=(\d+)-(\d*)", record.range.strip())
                if not found or int(found.group(1)) >= size:
                    self._send(record, 416, b"range not satisfiable", "text/plain",
                               extra_headers={"Content-Range": f"bytes */{size}"})
                    return
                start = int(found.group(1))
                end = min(int(found.group(2)), size - 1) if found.group(2) else size - 1
            partial = start > 0 or end < size - 1
            record.status = 206 if partial else 200
            self.mast._record(record)
            self.send_response(record.status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Disposition", f"attachment; filename={name}")
            self.end_headers()
            if not head:
                try:
                    with open(path, "rb") as handle:
                        handle.seek(start)
                        remaining = end - start + 1
                        while remaining > 0:
                            block = handle.read(min(1 << 20, remaining))
                            if not block:
                                break
                            self.wfile.write(block)
                            remaining -= len(block)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True
            return
        self._send(record, 200, path.read_bytes(), "application/octet-stream", fault=fault,
                   extra_headers={"Content-Disposition": f"attachment; filename={name}"})


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: serve a directory until interrupted.

    Parameters
    ----------
    argv : list of str, optional
        ``--root DIR [--port P] [--exclusive NAME ...] [--token-file PATH]
        [--max-page-size N] [--executing-polls N]``.

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m nsclean.testing.mastserver",
                                     description="Serve FITS files over the MAST protocol "
                                                 "on 127.0.0.1.")
    parser.add_argument("--root", required=True, help="directory of jw*_rate/cal.fits files")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--exclusive", nargs="*", default=[],
                        help="file names to serve as EXCLUSIVE_ACCESS")
    parser.add_argument("--token-file",
                        help="file with accepted tokens, one per line (never printed)")
    parser.add_argument("--max-page-size", type=int, default=None)
    parser.add_argument("--executing-polls", type=int, default=0)
    args = parser.parse_args(argv)
    tokens = {}
    if args.token_file:
        lines = Path(args.token_file).read_text().split()
        tokens = {token: f"user{i}" for i, token in enumerate(lines, 1)}
    server = MastServer(args.root, port=args.port, exclusive=args.exclusive, tokens=tokens,
                        max_page_size=args.max_page_size,
                        executing_polls=args.executing_polls).start()
    n_files = len(server.catalogue.files)
    print(f"MAST loopback server at {server.url} serving {n_files} files from {args.root}",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
