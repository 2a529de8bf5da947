"""The workflow's per-file steps (nsclean.workflow.steps) run in this process: what they check
before reading a file, and the ``fsync`` setting."""

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


def job_arguments(exposure, out, fsync=False):
    """Arguments of the mask, clean and QA steps of one exposure, as the workflow passes
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
            "params": {"options": {}, "fsync": fsync}, "log": f"{logs}/mask.log", **common}
    clean = {"input": {"rate": str(rate), "mask": mask["output"]["mask"],
                       "mask_status": mask["output"]["status"]},
             "output": {"cleaned": f"{base}/{stem}_nsclean_rate.fits",
                        "status": f"{base}/{stem}_clean.json"},
             "params": {"options": {}, "fsync": fsync}, "log": f"{logs}/clean.log", **common}
    qa = {"input": {"rate": str(rate), "cleaned": clean["output"]["cleaned"],
                    "mask": mask["output"]["mask"], "clean_status": clean["output"]["status"]},
          "output": {"metrics": f"{base}/{stem}_qa.json", "figures": f"{base}/figures"},
          "params": {"options": {"figures": False}}, "log": f"{logs}/qa.log", **common}
    return {"mask": mask, "clean": clean, "qa": qa}


def test_status_records_carry_the_sizes_of_the_products(exposure, tmp_path):
    arguments = job_arguments(exposure, tmp_path)
    for name in ("mask", "clean", "qa"):
        steps.STEPS[name](**arguments[name])
    mask = read_status(arguments["mask"]["output"]["status"])
    clean = read_status(arguments["clean"]["output"]["status"])
    assert mask["bytes"] == os.path.getsize(arguments["mask"]["output"]["mask"]) > 0
    assert clean["bytes"] == os.path.getsize(arguments["clean"]["output"]["cleaned"]) > 0
    assert read_status(arguments["qa"]["output"]["metrics"])["status"] == "cleaned"


@pytest.mark.parametrize("cut", ["rate", "mask", "cleaned"])
def test_a_file_cut_short_after_it_was_recorded_fails_its_exposure(cut, exposure,
                                                                  tmp_path):
    """What a crash of the machine can leave without fsync: a file under its final name
    that is shorter than its producer wrote.  The step reading it fails the exposure
    with a message naming the file, and writes all its outputs."""
    rate = tmp_path / Path(exposure[0]).name
    rate.write_bytes(Path(exposure[0]).read_bytes())
    arguments = job_arguments((rate, exposure[1]), tmp_path)
    order = ("mask", "clean", "qa")
    consumer = {"rate": "mask", "mask": "clean", "cleaned": "qa"}[cut]
    producer = {"rate": "its download", "mask": "the mask step",
                "cleaned": "the clean step"}[cut]
    for name in order[:order.index(consumer)]:
        steps.STEPS[name](**arguments[name])
    victim = Path(arguments[consumer]["input"][cut])
    size = victim.stat().st_size
    with open(victim, "r+b") as handle:
        handle.truncate(size // 2)
    for name in order[order.index(consumer):]:
        steps.STEPS[name](**arguments[name])
    status_key = "metrics" if consumer == "qa" else "status"
    record = read_status(arguments[consumer]["output"][status_key])
    assert record["status"] == "failed"
    assert str(victim) in record["reason"]
    assert f"{size // 2} bytes on disk, but {producer} recorded {size}" in record["reason"]
    final = read_status(arguments["qa"]["output"]["metrics"])
    assert final["status"] == "failed" and str(victim) in final["reason"]


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
    for name in ("mask", "clean"):
        steps.STEPS[name](**arguments[name])
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
