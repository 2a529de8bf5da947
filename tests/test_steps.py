"""The workflow's per-file steps (nsclean.workflow.steps) run in this process: what they check
before reading a file, the ``fsync`` setting, the mask options the clean step honours, and
the QA measured from the clean step's arrays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nsclean.testing import simulate
from nsclean.workflow import steps
from nsclean.workflow.pipeline import read_status

# Steps run in this process take over stdout, stderr and logging (conftest.py).
pytestmark = pytest.mark.usefixtures("restore_streams")


@pytest.fixture(scope="module")
def exposure(tmp_path_factory):
    """A small fixed-slit exposure (rate, cal)."""
    sim = simulate.simulate_exposure("fs", "NRS1", readout="NRS", subarray="SUB512", seed=3,
                                     observation=2)
    return simulate.write_exposure(sim, tmp_path_factory.mktemp("steps-sim"))


def job_arguments(exposure, out, fsync=False, mask_options=None):
    """Arguments of the mask and clean steps of one exposure, as the workflow passes
    them, with download status records as rule fetch_file writes them."""
    rate, cal = (Path(p) for p in exposure)
    stem = rate.name.removesuffix("_rate.fits")
    base, logs = out / "09999" / stem, out / "logs"
    statuses = {}
    for key, path in (("rate", rate), ("cal", cal)):
        statuses[key] = out / "downloads" / f"{path.name}.json"
        statuses[key].parent.mkdir(parents=True, exist_ok=True)
        statuses[key].write_text(json.dumps({"status": "ok", "file": path.name,
                                             "bytes": path.stat().st_size}))
    common = {"wildcards": {"program": "09999", "stem": stem}}
    mask = {"input": {"rate": str(rate), "cal": str(cal),
                      "rate_status": str(statuses["rate"]),
                      "cal_status": str(statuses["cal"])},
            "output": {"mask": f"{base}/{stem}_mask.fits", "status": f"{base}/{stem}_mask.json"},
            "params": {"options": dict(mask_options or {}), "fsync": fsync},
            "log": f"{logs}/mask.log", **common}
    clean = {"input": {"rate": str(rate), "mask": mask["output"]["mask"],
                       "mask_status": mask["output"]["status"]},
             "output": {"cleaned": f"{base}/{stem}_nsclean_rate.fits",
                        "status": f"{base}/{stem}_clean.json",
                        "metrics": f"{base}/{stem}_qa.json", "figures": f"{base}/figures"},
             "params": {"options": {}, "qa_options": {"figures": False}, "fsync": fsync},
             "log": f"{logs}/clean.log", **common}
    return {"mask": mask, "clean": clean}


def run_steps(arguments, names=("mask", "clean")):
    for name in names:
        getattr(steps, name)(**arguments[name])


def test_status_records_carry_the_sizes_of_the_products(exposure, tmp_path):
    arguments = job_arguments(exposure, tmp_path)
    run_steps(arguments)
    mask = read_status(arguments["mask"]["output"]["status"])
    clean = read_status(arguments["clean"]["output"]["status"])
    assert mask["bytes"] == os.path.getsize(arguments["mask"]["output"]["mask"]) > 0
    assert clean["bytes"] == os.path.getsize(arguments["clean"]["output"]["cleaned"]) > 0
    assert read_status(arguments["clean"]["output"]["metrics"])["status"] == "cleaned"


@pytest.mark.parametrize("cut", ["rate", "mask"])
def test_a_file_cut_short_after_it_was_recorded_fails_its_exposure(cut, exposure,
                                                                  tmp_path):
    """What a crash of the machine can leave without fsync: a file under its final name
    that is shorter than its producer wrote.  The step reading it fails the exposure
    with a message naming the file, and writes all its outputs, the QA record too."""
    rate = tmp_path / Path(exposure[0]).name
    rate.write_bytes(Path(exposure[0]).read_bytes())
    arguments = job_arguments((rate, exposure[1]), tmp_path)
    consumer = {"rate": "mask", "mask": "clean"}[cut]
    producer = {"rate": "its download", "mask": "the mask step"}[cut]
    if consumer == "clean":
        run_steps(arguments, ["mask"])
    victim = Path(arguments[consumer]["input"][cut])
    size = victim.stat().st_size
    with open(victim, "r+b") as handle:
        handle.truncate(size // 2)
    run_steps(arguments, ["mask", "clean"] if consumer == "mask" else ["clean"])
    record = read_status(arguments[consumer]["output"]["status"])
    assert record["status"] == "failed"
    assert str(victim) in record["reason"]
    assert f"{size // 2} bytes on disk, but {producer} recorded {size}" in record["reason"]
    final = read_status(arguments["clean"]["output"]["metrics"])
    assert final["status"] == "failed" and str(victim) in final["reason"]
    assert final["program"] == "09999" and final["cleaned_file"] is None
    assert os.path.getsize(arguments["clean"]["output"]["cleaned"]) == 0
    assert list(Path(arguments["clean"]["output"]["figures"]).iterdir()) == []


def test_the_clean_step_honours_the_configured_weak_column_guard(exposure, tmp_path):
    """The clean step's summary reports the weak columns of the guard the mask step was
    configured with (mask.guard_*), not those of the default options."""
    strict = {"guard_min_pixels": 120, "guard_max_gap": 8}
    counts = {}
    for name, options in (("default", {}), ("strict", strict)):
        arguments = job_arguments(exposure, tmp_path / name, mask_options=options)
        run_steps(arguments)
        mask = read_status(arguments["mask"]["output"]["status"])["mask"]
        clean = read_status(arguments["clean"]["output"]["status"])["clean"]
        assert clean["n_weak_columns"] == mask["n_weak_columns"], name
        assert clean["weak_columns"] == mask["weak_columns"], name
        counts[name] = clean["n_weak_columns"]
    assert counts["strict"] > counts["default"]


def test_the_qa_is_measured_from_the_arrays_in_memory(exposure, tmp_path, monkeypatch):
    """The clean step measures the QA from what it holds: after reading the rate (and
    copying its other extensions into the cleaned file) it opens neither the cleaned
    file it wrote nor the mask a second time; the metrics equal those measured from the
    files."""
    import numpy as np
    from astropy.io import fits

    from nsclean.algorithm import qa
    from nsclean.io.exposure import read_mask, read_rate

    arguments = job_arguments(exposure, tmp_path)
    run_steps(arguments, ["mask"])
    opened = []
    real_open = fits.open

    def spy(name, *args, **kwargs):
        opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(fits, "open", spy)
    run_steps(arguments, ["clean"])
    monkeypatch.undo()
    output = arguments["clean"]["output"]
    record = read_status(output["metrics"])
    assert record["status"] == "cleaned"
    assert Path(output["cleaned"]).name not in opened
    assert opened.count(Path(arguments["clean"]["input"]["mask"]).name) == 1
    # The same metrics as measured from the files written.
    before, after = read_rate(arguments["clean"]["input"]["rate"]), read_rate(output["cleaned"])
    mask, _ = read_mask(arguments["clean"]["input"]["mask"], before)
    before_sci, after_sci = (e.sci.astype(np.float32) for e in (before, after))
    model = np.nan_to_num(before_sci.astype(np.float64) - after_sci, nan=0.0)
    from_files = qa.exposure_metrics(before_sci, after_sci, model, mask,
                                     fit_info=record["clean"]["fit"])
    assert json.loads(json.dumps(from_files, default=float)) == record["metrics"]


@pytest.mark.parametrize("fsync", [False, True])
def test_the_fsync_setting_decides_whether_products_are_flushed(fsync, exposure, tmp_path,
                                                               monkeypatch):
    """With fsync the mask and the cleaned file are flushed to disk before they are
    renamed into place; without it nothing is."""
    flushed = []
    real_fsync = os.fsync

    def spy(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    arguments = job_arguments(exposure, tmp_path, fsync=fsync)
    run_steps(arguments)
    # What was flushed: the temporary files ".<name>.<random>.tmp" beside the products.
    flushed_names = sorted(Path(path).name for path in flushed)
    if fsync:
        products = sorted(Path(arguments[name]["output"][key]).name
                          for name, key in (("mask", "mask"), ("clean", "cleaned")))
        assert len(flushed_names) == 2, flushed_names
        for product, name in zip(products, flushed_names, strict=True):
            assert name.startswith(f".{product}."), (name, product)
    else:
        assert flushed == []


def test_a_crashing_job_says_so_on_the_console(tmp_path):
    """A rule script's uncaught exception: the traceback in the rule's log, one line on
    the console (which the default profile keeps free of job error blocks)."""
    import subprocess
    import sys

    log = tmp_path / "logs" / "clean.log"
    code = ("import sys; from nsclean.workflow.pipeline import script_logging;"
            f"script_logging({str(log)!r}); raise ValueError('a bug, not bad data')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"nsclean: ValueError: a bug, not bad data (log: {log})"
    text = log.read_text()
    assert "Traceback" in text and "ValueError: a bug, not bad data" in text
