"""HTML/CSV report: columns, escaping, flags, links, and a real headless browser."""

import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nsclean import __version__
from nsclean.algorithm import qa
from nsclean.report import figures, report

EVIL_STEM = "jw01345<img src=x onerror=\"document.title='pwned'\">&'_nrs1"


def _metrics(seed, stripe=2.0, bad=False, shape=(128, 128)):
    rng = np.random.default_rng(seed)
    mask = np.broadcast_to((np.arange(shape[0]) % 32 < 10)[:, None], shape).copy()
    white = rng.normal(0.0, 5.0, shape)
    stripes = np.broadcast_to(rng.normal(0.0, stripe, shape[1]), shape)
    before = white + stripes
    after = before + stripes if bad else white
    return before, after, np.array(stripes), mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A results tree: 2 programs, cleaned/flagged/failed/skipped records as JSON."""
    root = tmp_path_factory.mktemp("results")
    records = []
    specs = [
        ("01345", "jw01345062001_03101_00001_nrs1", "cleaned", False, 9.5),
        ("01345", "jw01345062001_03101_00001_nrs2", "cleaned", True, 10.5),
        ("01345", EVIL_STEM, "cleaned", False, 100.0),
        ("02736", "jw02736007001_03103_00001_nrs1", "failed", None, None),
        ("02736", "jw02736007001_03103_00002_nrs1", "skipped", None, None),
        ("02736", "jw02736007001_03103_00003_nrs1", "cleaned", False, 0.5),
    ]
    for i, (program, stem, status, bad, banding) in enumerate(specs):
        record = {"program": program, "stem": stem, "status": status}
        if status == "cleaned":
            before, after, model, mask = _metrics(i, bad=bad)
            metrics = qa.exposure_metrics(before, after, model, mask)
            # Values chosen so that text order and numeric order differ.
            metrics["before"]["banding_rms"] = banding
            figure_dir = root / program / "qa"
            safe = f"exp{i}"
            record["figures"] = figures.write_figures(before, after, model, mask, figure_dir, safe)
            record["metrics"] = metrics
            record["cleaned_file"] = f"{program}/cleaned/{safe}_rate.fits"
            record["timing"] = {"clean": 1.25, "qa": 0.5}
            (root / program / "cleaned").mkdir(exist_ok=True)
            (root / record["cleaned_file"]).write_bytes(b"SIMPLE")
        else:
            record["reason"] = (
                "<b>no background</b> pixels in mask" if status == "failed" else "not NIRSpec"
            )
        json_path = root / program / "qa" / f"rec{i}.json"
        report.write_record(record, json_path)
        records.append(json_path)
    return root, records


def _build(run, subdir="."):
    root, json_paths = run
    records = report.load_records(json_paths)
    html_path = root / subdir / "report.html"
    csv_path = root / subdir / "report.csv"
    report.write_report(
        records,
        html_path,
        csv_path,
        title="nsclean <run> & co",
        config={"cleaner": {"method": "fft", "cutoff": 1 / 256}, "note": "<i>x</i>"},
        results_dir=root,
    )
    return html_path, csv_path


def test_record_round_trip_is_relocatable(run, tmp_path):
    root, json_paths = run
    with open(json_paths[0]) as handle:
        raw = json.load(handle)
    assert list(raw) == [
        "program",
        "stem",
        "status",
        "reason",
        "cleaned_file",
        "metrics",
        "figures",
        "timing",
        "nsclean_version",
        "inputs",
        "setup",
    ]
    # Stored relative to the JSON file, so moving the tree keeps them valid.
    assert raw["figures"]["thumbnail"] == "exp0_thumbnail.png"
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    record = report.load_records([moved / "01345" / "qa" / "rec0.json"])[0]
    assert os.path.isfile(record["figures"]["comparison"])
    assert record["figures"]["comparison"].startswith(str(moved))


def test_load_records_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        report.load_records([bad])
    bad.write_text(json.dumps({"program": "1", "stem": "s", "status": "done"}))
    with pytest.raises(ValueError, match="status"):
        report.load_records([bad])
    bad.write_text(json.dumps({"program": "1", "stem": "s", "status": "cleaned", "figures": []}))
    with pytest.raises(ValueError, match="figures must be an object"):
        report.load_records([bad])
    bad.write_text(json.dumps({"program": "1", "status": "cleaned"}))
    with pytest.raises(ValueError, match="stem"):
        report.load_records([bad])


def test_csv_columns_and_rows(run):
    _, csv_path = _build(run)
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["program", "stem", "status", "reason", "cleaned_file"]
    assert tuple(header) == report.CSV_COLUMNS
    assert len(body) == 6
    by_stem = {row[1]: dict(zip(header, row, strict=True)) for row in body}
    assert by_stem[EVIL_STEM]["status"] == "cleaned"
    failed = by_stem["jw02736007001_03103_00001_nrs1"]
    assert failed["status"] == "failed" and "no background" in failed["reason"]
    assert failed["after.banding_rms"] == ""
    good = by_stem["jw01345062001_03101_00001_nrs1"]
    assert float(good["before.banding_rms"]) == 9.5
    assert good["cleaned_file"] == "01345/cleaned/exp0_rate.fits"
    assert good["n_flags"] == "0"
    flagged = by_stem["jw01345062001_03101_00001_nrs2"]
    assert int(flagged["n_flags"]) > 0 and "banding not reduced" in flagged["flags"]
    # time taken: the sum of the record's timing (clean 1.25 + qa 0.5); none when failed
    assert float(good["time_s"]) == 1.75 and failed["time_s"] == ""
    assert header.index("time_s") == len(report.BASE_COLUMNS) + len(qa.FLAT_METRIC_KEYS)


def test_step_timings_from_benchmark_files(tmp_path):
    from nsclean.workflow.pipeline import read_benchmark_seconds, step_timings

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    paths = []
    for step, seconds in (("mask", "1.0312"), ("clean", "0.9"), ("qa", "2.5")):
        path = tmp_path / "benchmarks" / step / "01345" / "jw01345062001_03101_00001_nrs1.tsv"
        path.parent.mkdir(parents=True)
        path.write_text(header + f"{seconds}\t0:00:01\t10\t10\t10\t10\t0\t0\t1\t0.5\n")
        paths.append(path)
    repeated = tmp_path / "repeated.tsv"  # benchmark: repeat(..., 2) writes one row each
    repeated.write_text(header + "1.0\t-\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n"
                        + "3.0\t-\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n")
    assert read_benchmark_seconds(repeated) == 2.0
    assert read_benchmark_seconds(tmp_path / "missing.tsv") is None
    assert step_timings(paths) == {
        "jw01345062001_03101_00001_nrs1": {"mask": 1.0312, "clean": 0.9, "qa": 2.5}}


def test_html_escaping_marks_and_links(run):
    root, _ = run
    html_path, _ = _build(run)
    text = html_path.read_text()
    assert "<img src=x" not in text and 'onerror="document' not in text
    assert html.escape(EVIL_STEM, quote=True) in text
    assert "<b>no background</b>" not in text and "&lt;b&gt;no background" in text
    assert "<i>x</i>" not in text and "<run>" not in text
    assert "http://" not in text and "https://" not in text  # self-contained
    assert f"nsclean {__version__}" in text
    assert 'id="n-cleaned">4<' in text and 'id="n-failed">1<' in text
    assert 'id="n-skipped">1<' in text and 'id="n-flagged">1<' in text
    assert "addEventListener('click'" in text and "aria-sort" in text

    states = {
        html.unescape(stem): state
        for state, stem in re.findall(r'<tr class="(\w+)" data-stem="([^"]*)"', text)
    }
    assert states["jw01345062001_03101_00001_nrs2"] == "flagged"
    assert states["jw02736007001_03103_00001_nrs1"] == "failed"
    assert states["jw02736007001_03103_00002_nrs1"] == "skipped"
    assert states["jw01345062001_03101_00001_nrs1"] == "ok"

    links = re.findall(r'(?:href|src)="([^"]+)"', text)
    embedded = [link for link in links if link.startswith("data:image/png;base64,")]
    links = [link for link in links if link not in embedded]
    assert links and embedded
    for link in links:
        assert not os.path.isabs(link) and ":" not in link
        assert (root / html.unescape(link)).is_file(), link
    assert 'href="01345/cleaned/exp0_rate.fits"' in text
    # Thumbnails are in the HTML itself (they show inside Snakemake's report, where
    # relative links do not resolve): the same bytes as the PNG files.
    thumbnails = {path.read_bytes() for path in root.rglob("*thumbnail*.png")}
    assert {base64.b64decode(link.split(",", 1)[1]) for link in embedded} <= thumbnails


def test_links_relative_to_a_report_in_a_subfolder(run):
    root, _ = run
    html_path, _ = _build(run, subdir="01345")
    text = html_path.read_text()
    links = [link for link in re.findall(r'(?:href|src)="([^"]+)"', text)
             if not link.startswith("data:")]
    assert any(link.startswith("qa/") for link in links)
    assert any(link.startswith("../02736/") for link in links)
    for link in links:
        assert (root / "01345" / html.unescape(link)).resolve().is_file(), link


def test_24_exposure_report_build_time(run, tmp_path):
    root, json_paths = run
    template = report.load_records(json_paths[:1])[0]
    records = []
    for i in range(24):
        record = dict(template, stem=f"jw01345062001_03101_{i:05d}_nrs1")
        records.append(record)
    start = time.perf_counter()
    report.write_report(records, tmp_path / "r.html", tmp_path / "r.csv", title="24")
    print(f"report for 24 exposures: {time.perf_counter() - start:.3f} s")
    text = (tmp_path / "r.html").read_text()
    assert text.count("<tr class=") == 24


CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (im) {
    return {src: im.getAttribute('src'), ok: im.complete && im.naturalWidth > 0};
  });
  var table = document.getElementById('exposures');
  var headers = table.tHead.rows[0].cells, column = -1;
  for (var i = 0; i < headers.length; i++) {
    if (headers[i].textContent === 'banding before') { column = i; }
  }
  function order() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[column].getAttribute('data-sort');
    });
  }
  headers[column].click();
  var ascending = order();
  headers[column].click();
  var descending = order();
  var out = document.createElement('pre');
  out.id = 'qa-check';
  out.textContent = JSON.stringify({
    title: document.title, rows: table.tBodies[0].rows.length, images: images,
    ascending: ascending, descending: descending});
  document.body.appendChild(out);
});
</script>
"""

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (bash tests/system/install-system-packages.sh installs it)",
)
def test_report_in_headless_chromium(run, tmp_path):
    root, _ = run
    html_path, _ = _build(run)
    # The probe goes into a copy beside the report so relative links still work.
    probe = root / "report-probe.html"
    probe.write_text(html_path.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 90 s")
    match = re.search(r'<pre id="qa-check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"probe output missing; rc={result.returncode} stderr={result.stderr[-2000:]}"
    check = json.loads(html.unescape(match.group(1)))

    assert check["title"] == "nsclean <run> & co"  # the evil stem's onerror never ran
    assert check["rows"] == 6
    # One thumbnail per cleaned exposure, and no image injected by the stem.
    assert len(check["images"]) == 4
    broken = [im["src"] for im in check["images"] if not im["ok"]]
    assert not broken, f"images that did not load: {broken}"

    # Numeric sort (9.5 before 10.5 before 100), empty cells last both ways.
    numbers = [float(v) for v in check["ascending"] if v]
    assert numbers == sorted(numbers) == [0.5, 9.5, 10.5, 100.0]
    assert check["ascending"][-2:] == ["", ""]
    assert [float(v) for v in check["descending"] if v] == numbers[::-1]
    assert check["descending"][-2:] == ["", ""]


def test_report_rebuilt_from_outputs_alone(run, tmp_path):
    """`python -m nsclean.report` over the JSON records reproduces the CSV."""
    root, json_paths = run
    _, csv_path = _build(run)
    config = tmp_path / "config.yaml"
    config.write_text("cleaner:\n  method: fft\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsclean.report",
            "--title",
            "rebuilt",
            "--html",
            str(tmp_path / "r.html"),
            "--csv",
            str(tmp_path / "r.csv"),
            "--config",
            str(config),
            "--results-dir",
            str(root),
            *map(str, json_paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.csv").read_text() == csv_path.read_text()
    text = (tmp_path / "r.html").read_text()
    assert "cleaner.method" in text and "<title>rebuilt</title>" in text


def test_table_shows_each_exposures_setup(tmp_path):
    records = [
        {"program": "01345", "stem": "jw01345062001_03101_00001_nrs2", "status": "skipped",
         "reason": "no cal file", "setup": {"exp_type": "NRS_MSASPEC", "detector": "NRS2",
                                             "grating": "PRISM", "filter": "CLEAR",
                                             "readpatt": "NRSIRS2"}},
        {"program": "01366", "stem": "jw01366004001_04101_00001_nrs1", "status": "skipped",
         "reason": "x", "setup": {"exp_type": "NRS_BRIGHTOBJ", "detector": "NRS1",
                                   "grating": "G395H", "filter": "F290LP"}},
    ]
    html_path, csv_path = report.write_report(records, tmp_path / "r.html", tmp_path / "r.csv",
                                              title="setup")
    text = Path(html_path).read_text()
    for cells in (("MOS", "NRS2", "PRISM/CLEAR", "NRSIRS2"), ("BOTS", "NRS1", "G395H/F290LP")):
        row = re.search(r"<tr[^>]*>.*?" + ".*?".join(f">{c}</td>" for c in cells), text)
        assert row, cells
    import csv

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["mode"], r["detector"], r["grating"], r["filter"], r["readpatt"])
            for r in rows] == [("MOS", "NRS2", "PRISM", "CLEAR", "NRSIRS2"),
                               ("BOTS", "NRS1", "G395H", "F290LP", "")]
