"""Self-contained HTML report and CSV table of a cleaning run.

A run leaves one JSON record per exposure (see :func:`write_record` for the
layout); :func:`load_records` reads them back and :func:`write_report` turns
any list of records into one HTML file (inline CSS and a few lines of inline
JavaScript to sort the table, no external resources) plus a CSV of the same
table. The report can therefore be rebuilt from the run's outputs alone, for
one program or for the whole run.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
import math
import os
import string
import urllib.parse

from ..algorithm.qa import FLAT_METRIC_KEYS, flatten_metrics
from ..io.atomic import atomic_write_text

__all__ = [
    "BASE_COLUMNS",
    "CSV_COLUMNS",
    "FIGURE_KINDS",
    "SETUP_COLUMNS",
    "STATUSES",
    "TIMING_COLUMNS",
    "load_records",
    "write_record",
    "write_report",
]

STATUSES = ("cleaned", "failed", "skipped")
BASE_COLUMNS = ("program", "stem", "status", "reason", "cleaned_file")
#: Provenance at the end of every CSV row: software version and input checksums.
PROVENANCE_COLUMNS = ("nsclean_version", "rate_sha256", "cal_sha256", "mask_sha256")
#: Processing time of the exposure (seconds, the sum of its steps' ``timing``): after the
#: metrics, and the one column that differs between identical runs.
TIMING_COLUMNS = ("time_s",)
#: The exposure's set-up, last in every CSV row: instrument mode (IFU, MOS, FS, BOTS),
#: detector, grating, filter and readout pattern (READPATT).
SETUP_COLUMNS = ("mode", "detector", "grating", "filter", "readpatt")
#: CSV header: the five record fields, every QA metric in a stable order, the time taken,
#: provenance, set-up.
CSV_COLUMNS = (BASE_COLUMNS + FLAT_METRIC_KEYS + TIMING_COLUMNS + PROVENANCE_COLUMNS
               + SETUP_COLUMNS)
#: Figures linked from the table, in display order; "thumbnail" is shown inline.
FIGURE_KINDS = ("comparison", "mask", "column", "spectrum")


# --------------------------------------------------------------------------------------
# Records on disk
# --------------------------------------------------------------------------------------


def _normalise(record, source="record"):
    """Check a record and fill the optional fields; returns a new dict."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("program", "stem", "status") if not record.get(key)]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    status = record["status"]
    if status not in STATUSES:
        raise ValueError(f"{source}: status {status!r} is not one of {STATUSES}")
    for key in ("metrics", "figures", "timing"):
        value = record.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be an object or null")
    out = {
        "program": str(record["program"]),
        "stem": str(record["stem"]),
        "status": status,
        "reason": str(record.get("reason") or ""),
        "cleaned_file": record.get("cleaned_file") or None,
        "metrics": record.get("metrics") or None,
        "figures": dict(record.get("figures") or {}),
        "timing": dict(record.get("timing") or {}),
        # Provenance, when the record has it (the workflow's records do).
        "nsclean_version": record.get("nsclean_version") or None,
        "inputs": dict(record.get("inputs") or {}),
        # Set-up (exp_type, detector, grating, filter, readpatt, subarray), when known.
        "setup": {str(k): str(v) for k, v in (record.get("setup") or {}).items()
                  if v not in (None, "")},
    }
    return out


def write_record(record, json_path):
    """Write one per-exposure QA record as JSON (atomically).

    Parameters
    ----------
    record : dict
        ``program`` (str, e.g. "01345"), ``stem`` (exposure stem), ``status``
        (one of "cleaned", "failed", "skipped"), ``reason`` (str, why it
        failed or was skipped; "" otherwise), ``cleaned_file`` (path of the
        cleaned product relative to the results directory, or None),
        ``metrics`` (the dict of :func:`nsclean.algorithm.qa.exposure_metrics`, or
        None), ``figures`` (kind -> PNG path, absolute or relative to the
        current directory; kinds "comparison", "mask", "column", "spectrum",
        "thumbnail"), ``timing`` (step -> seconds) and, optionally, the
        provenance: ``nsclean_version`` and ``inputs`` (file name or "mask" ->
        "sha256:<hex>"), which end the CSV rows.
    json_path : str or os.PathLike
        Where to write. Figure paths are stored relative to this file's
        folder, so a results tree can be moved as a whole.

    Returns
    -------
    str
        ``json_path``.
    """
    record = _normalise(record)
    base = os.path.dirname(os.path.abspath(json_path))
    record["figures"] = {
        kind: os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
        for kind, path in record["figures"].items()
    }
    text = json.dumps(record, indent=1, allow_nan=False, default=_json_default)
    return atomic_write_text(json_path, text + "\n")


def _json_default(value):
    # numpy scalars and arrays, without importing numpy here
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_records(json_paths):
    """Read per-exposure QA records written by :func:`write_record`.

    Parameters
    ----------
    json_paths : iterable of str or os.PathLike
        The record files.

    Returns
    -------
    list of dict
        Records in the given order, with figure paths made absolute.

    Raises
    ------
    ValueError
        If a file is not valid JSON or lacks ``program``, ``stem`` or a known
        ``status``; the message names the file.
    """
    records = []
    for path in json_paths:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        record = _normalise(raw, source=path)
        base = os.path.dirname(os.path.abspath(path))
        record["figures"] = {
            kind: os.path.normpath(os.path.join(base, figure))
            for kind, figure in record["figures"].items()
        }
        records.append(record)
    return records


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------


def _metric(record, key):
    flat = record.get("_flat")
    if flat is None:
        flat = record["_flat"] = flatten_metrics(record.get("metrics"))
    return flat.get(key)


def _fmt(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _sort_key(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


# (header, tooltip, function record -> raw value). Raw values sort; _fmt shows.
_NUMERIC_COLUMNS = (
    ("bg frac", "background pixel fraction", lambda r: _metric(r, "background_fraction")),
    (
        "bg rms before",
        "robust rms of background pixels before cleaning",
        lambda r: _metric(r, "before.background_rms"),
    ),
    (
        "bg rms after",
        "robust rms of background pixels after cleaning",
        lambda r: _metric(r, "after.background_rms"),
    ),
    (
        "banding before",
        "rms of background column means before",
        lambda r: _metric(r, "before.banding_rms"),
    ),
    (
        "banding after",
        "rms of background column means after",
        lambda r: _metric(r, "after.banding_rms"),
    ),
    (
        "resid. banding",
        "length-weighted banding excess after cleaning (0 = down to white noise)",
        lambda r: _metric(r, "after.banding_uniform_excess_rms"),
    ),
    (
        "banding white",
        "banding expected from white noise alone (after)",
        lambda r: _metric(r, "after.banding_white_rms"),
    ),
    ("banding ratio", "banding after / before", lambda r: _metric(r, "ratio.banding_rms")),
    (
        "frame before",
        "picture-frame amplitude before",
        lambda r: _metric(r, "before.picture_frame_amplitude"),
    ),
    (
        "frame after",
        "picture-frame amplitude after",
        lambda r: _metric(r, "after.picture_frame_amplitude"),
    ),
    (
        "LF rows before",
        "low-frequency power of the column-mean series before",
        lambda r: _metric(r, "before.lowfreq_power_rows"),
    ),
    (
        "LF rows after",
        "low-frequency power of the column-mean series after",
        lambda r: _metric(r, "after.lowfreq_power_rows"),
    ),
    (
        "LF cols before",
        "low-frequency power of the row-mean series before",
        lambda r: _metric(r, "before.lowfreq_power_columns"),
    ),
    (
        "LF cols after",
        "low-frequency power of the row-mean series after",
        lambda r: _metric(r, "after.lowfreq_power_columns"),
    ),
    (
        "model rms",
        "rms of the subtracted model about its median",
        lambda r: _metric(r, "model.rms"),
    ),
    ("guarded", "lines guarded + left uncleaned (fft), or predicted from their neighbours "
     "only (readout)", lambda r: _guarded(r)),
    ("time (s)", "total processing time of the exposure", lambda r: _total_time(r)),
)


def _guarded(record):
    counts = [_metric(record, f"guard.{key}")
              for key in ("n_guarded", "n_uncleaned", "n_predicted")]
    if all(count is None for count in counts):
        return None
    return sum(count or 0 for count in counts)


def _total_time(record):
    values = [v for v in record["timing"].values() if isinstance(v, int | float)]
    return float(sum(values)) if values else None


def _flags(record):
    return list((record.get("metrics") or {}).get("flags") or [])


def _row_state(record):
    if record["status"] == "failed":
        return "failed"
    if record["status"] == "skipped":
        return "skipped"
    return "flagged" if _flags(record) else "ok"


def _href(path, base):
    """Relative, percent-encoded URL of a file, for an attribute value."""
    relative = os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
    # Quoting ":" too means no data value can turn into a javascript: or
    # other scheme URL; the result is always a relative path.
    return html.escape(urllib.parse.quote(relative, safe="/"), quote=True)


def _embedded(path, base):
    """The thumbnail as a data: URI, so that it shows wherever the HTML is opened (inside
    Snakemake's report too, where relative links do not resolve); a link if unreadable."""
    import base64

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return _href(path, base)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(value):
    return html.escape("" if value is None else str(value), quote=True)


def _flatten_config(config, prefix=""):
    items = []
    if isinstance(config, dict):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                items.extend(_flatten_config(value, name))
            else:
                items.append((name, value))
    else:
        items.append((prefix or "config", config))
    return items


def _config_html(config):
    if not config:
        return "<p class=meta>No configuration recorded.</p>"
    rows = []
    for name, value in _flatten_config(config):
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > 300:
            text = text[:297] + "..."
        rows.append(f"<tr><th>{_e(name)}</th><td>{_e(text)}</td></tr>")
    return "<details><summary>Configuration</summary><table>" + "".join(rows) + "</table></details>"


def _counts(records):
    counts = dict.fromkeys((*STATUSES, "flagged"), 0)
    for record in records:
        counts[record["status"]] += 1
        if _row_state(record) == "flagged":
            counts["flagged"] += 1
    return counts


def _program_summary(records):
    programs = {}
    for record in records:
        programs.setdefault(record["program"], []).append(record)
    if len(programs) < 2:
        return ""
    rows = []
    for program in sorted(programs):
        counts = _counts(programs[program])
        cells = "".join(
            f'<td class=num data-sort="{counts[k]}">{counts[k]}</td>'
            for k in (*STATUSES, "flagged")
        )
        total = len(programs[program])
        rows.append(
            f'<tr><td data-sort="{_e(program)}">{_e(program)}</td>'
            f'<td class=num data-sort="{total}">{total}</td>{cells}</tr>'
        )
    head = "".join(f"<th>{h}</th>" for h in ("program", "exposures", *STATUSES, "flagged"))
    return (
        "<h2>Programs</h2><table class=sortable id=programs><thead><tr>"
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _exposure_row(record, base, results_dir):
    state = _row_state(record)
    figures = record["figures"]
    cells = []

    thumb = figures.get("thumbnail")
    if thumb:
        target = figures.get("comparison") or thumb
        image = (
            f'<a href="{_href(target, base)}"><img class=thumb src="{_embedded(thumb, base)}"'
            f' alt="{_e(record["stem"])} before|after"></a>'
        )
    else:
        image = ""
    cells.append(f'<td data-sort="{1 if thumb else 0}">{image}</td>')
    cells.append(f'<td data-sort="{_e(record["program"])}">{_e(record["program"])}</td>')
    cells.append(f'<td class=stem data-sort="{_e(record["stem"])}">{_e(record["stem"])}</td>')
    mode, detector, grating, filt, readpatt = _setup(record)
    optics = "/".join(v for v in (grating, filt) if v)
    for value in (mode, detector, optics, readpatt):
        cells.append(f'<td data-sort="{_e(value)}">{_e(value)}</td>')
    status_key = {"failed": 0, "flagged": 1, "skipped": 2, "ok": 3}[state]
    label = "cleaned (flagged)" if state == "flagged" else record["status"]
    cells.append(f'<td class=status data-sort="{status_key}">{_e(label)}</td>')

    reasons = ([record["reason"]] if record["reason"] else []) + _flags(record)
    why = "<ul>" + "".join(f"<li>{_e(text)}</li>" for text in reasons) + "</ul>"
    cells.append(f'<td class=why data-sort="{len(reasons)}">{why if reasons else ""}</td>')
    for header, _tip, getter in _NUMERIC_COLUMNS:
        value = getter(record)
        title = ""
        if header == "time (s)" and record["timing"]:
            breakdown = ", ".join(f"{k} {_fmt(v)}" for k, v in record["timing"].items())
            title = f' title="{_e(breakdown)}"'
        cells.append(
            f'<td class=num data-sort="{_e(_sort_key(value))}"{title}>{_e(_fmt(value))}</td>'
        )

    links = [
        f'<a href="{_href(figures[kind], base)}">{kind}</a>'
        for kind in FIGURE_KINDS
        if figures.get(kind)
    ]
    cells.append(f'<td data-sort="{len(links)}">{" ".join(links)}</td>')
    cleaned = record["cleaned_file"]
    if cleaned and results_dir is not None:
        link = f'<a href="{_href(os.path.join(results_dir, cleaned), base)}">{_e(cleaned)}</a>'
    else:
        link = _e(cleaned)
    cells.append(f'<td data-sort="{_e(cleaned)}">{link}</td>')
    return f'<tr class="{state}" data-stem="{_e(record["stem"])}">' + "".join(cells) + "</tr>"


def _html(records, html_path, *, title, config, results_dir):
    from .. import __version__

    base = os.path.dirname(os.path.abspath(html_path))
    counts = _counts(records)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    headers = (
        [("", "thumbnail (before | after); click for the full comparison")]
        + [("program", ""), ("stem", "exposure stem")]
        + [("mode", "IFU, MOS, FS or BOTS"), ("detector", ""),
           ("grating/filter", ""), ("readout", "readout pattern (READPATT)")]
        + [("status", ""), ("why", "reason / flags")]
        + [(h, tip) for h, tip, _ in _NUMERIC_COLUMNS]
        + [("figures", ""), ("cleaned file", "relative to the results directory")]
    )
    head = "".join(
        f'<th title="{_e(tip)}">{_e(text)}</th>' if tip else f"<th>{_e(text)}</th>"
        for text, tip in headers
    )
    # Problems first: failed, then flagged, skipped, fine; by stem within each.
    order = {"failed": 0, "flagged": 1, "skipped": 2, "ok": 3}
    ordered = sorted(records, key=lambda r: (order[_row_state(r)], r["program"], r["stem"]))
    body = "\n".join(_exposure_row(r, base, results_dir) for r in ordered)
    count_html = "".join(
        f'<span class=count-{k}>{k}: <b id="n-{k}">{counts[k]}</b></span>'
        for k in (*STATUSES, "flagged")
    )
    page = _template("report.html").substitute(
        title=_e(title), version=_e(__version__), generated=_e(now),
        n_exposures=len(records), counts=count_html, configuration=_config_html(config),
        programs=_program_summary(records), head=head, body=body)
    return page


def _template(name: str) -> string.Template:
    """A page template of this package (``nsclean/report/templates/``, package data)."""
    from importlib.resources import files

    return string.Template(files(__package__).joinpath("templates", name)
                           .read_text(encoding="utf-8"))


def _csv(records):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in sorted(records, key=lambda r: (r["program"], r["stem"])):
        row = [record[key] if record[key] is not None else "" for key in BASE_COLUMNS]
        for key in FLAT_METRIC_KEYS:
            value = _metric(record, key)
            row.append("" if value is None else value)
        total = _total_time(record)
        row.append("" if total is None else round(total, 3))
        row.extend(_provenance(record))
        row.extend(_setup(record))
        writer.writerow(row)
    return buffer.getvalue()


def _setup(record):
    """The SETUP_COLUMNS values of a record ("" where unknown)."""
    from ..archive.archive import MODES

    setup = record.get("setup") or {}
    exp_type = setup.get("exp_type", "")
    mode = next((name for name, value in MODES.items() if value == exp_type), exp_type)
    return [mode, setup.get("detector", ""), setup.get("grating", ""),
            setup.get("filter", ""), setup.get("readpatt", "")]


def _provenance(record):
    """Version and the rate/cal/mask checksums of a record (empty where unknown)."""
    inputs = record.get("inputs") or {}

    def digest(suffix):
        for name, value in sorted(inputs.items()):
            if str(name).endswith(suffix):
                return str(value).partition(":")[2] or str(value)
        return ""

    return [record.get("nsclean_version") or "", digest("_rate.fits"),
            digest(("_cal.fits", "_calints.fits")), digest("mask")]


def write_report(records, html_path, csv_path, *, title, config=None, results_dir=None):
    """Write the HTML report and the CSV table of a set of exposure records.

    Parameters
    ----------
    records : iterable of dict
        Per-exposure records (the layout of :func:`write_record`; figure paths
        absolute or relative to the current directory, as returned by
        :func:`load_records`).
    html_path, csv_path : str or os.PathLike
        Outputs, written atomically. Links to figures are made relative to
        the HTML file's folder.
    title : str
        Report title (e.g. "nsclean: program 01345").
    config : dict, optional
        Run configuration, shown (flattened) in the report header.
    results_dir : str or os.PathLike, optional
        Folder that ``cleaned_file`` paths are relative to; when given, the
        cleaned files are linked.

    Returns
    -------
    tuple of str
        ``(html_path, csv_path)``.

    Notes
    -----
    The CSV has one row per exposure sorted by program and stem, columns
    :data:`CSV_COLUMNS`: ``program, stem, status, reason, cleaned_file``
    followed by :data:`nsclean.algorithm.qa.FLAT_METRIC_KEYS`, ``time_s`` (the sum of the
    record's ``timing``, empty without one) and the provenance. Every string from the
    records is HTML-escaped; URLs are percent-encoded relative paths.
    """
    records = [_normalise(r, source=f"record {i}") for i, r in enumerate(records)]
    text = _html(records, html_path, title=title, config=config, results_dir=results_dir)
    atomic_write_text(html_path, text)
    atomic_write_text(csv_path, _csv(records))
    return os.fspath(html_path), os.fspath(csv_path)


def main(argv=None):
    """Rebuild a report from per-exposure JSON records: ``python -m nsclean.report``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nsclean.report",
        description="Write the HTML report and CSV table from per-exposure QA records.",
    )
    parser.add_argument("records", nargs="+", help="per-exposure QA JSON files")
    parser.add_argument("--html", required=True, help="HTML report to write")
    parser.add_argument("--csv", required=True, help="CSV table to write")
    parser.add_argument("--title", default="nsclean report")
    parser.add_argument("--config", help="YAML or JSON run configuration to show")
    parser.add_argument("--results-dir", help="folder that cleaned_file paths are relative to")
    args = parser.parse_args(argv)
    config = None
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    records = load_records(args.records)
    write_report(
        records,
        args.html,
        args.csv,
        title=args.title,
        config=config,
        results_dir=args.results_dir,
    )
    print(f"{len(records)} exposures -> {args.html}, {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
