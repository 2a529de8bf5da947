"""calwebb_spec2 on the rewritten associations (rule ``stage2_run``,
:func:`nsclean.workflow.stage2.run_spec2`), with the real jwst pipeline.

Skipped without the ``[jwst]`` extra.  Offline (always): every step that needs CRDS
reference files is skipped (tests/spec2_offline.py says why each piece is needed), so
the run exercises what is ours: the members found from the association's folder, the
imprint and background members read by jwst's own steps, clean_flicker_noise skipped,
the products published, the per-association status.  With a CRDS cache (``CRDS_PATH``):
the full pipeline, nothing skipped but clean_flicker_noise.

Each run is in a child process: run_spec2 sets the process's CRDS environment, and CRDS
keeps its configuration for the life of the process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import run_child
from astropy.io import fits
from spec2_offline import (
    closed_port_url,
    crds_configuration_only,
    offline_steps,
    pipeline_product,
)

pytest.importorskip("jwst", reason="needs the [jwst] extra: pip install -e '.[jwst]'")

from nsclean.archive.associations import (  # noqa: E402
    rewrite_spec2_association,
    write_association,
)
from nsclean.io import exposure as ex  # noqa: E402
from nsclean.io import tso  # noqa: E402
from nsclean.testing import simulate  # noqa: E402
from nsclean.workflow.stage2 import spec2_steps  # noqa: E402

PROGRAM = "01234"
GOOD = "jw01234-o001_20240101t000000_spec2_00001_asn.json"
LOST = "jw01234-o001_20240101t000000_spec2_00002_asn.json"
BROKEN = "jw01234-o001_20240101t000000_spec2_00003_asn.json"
REFUSED = "jw01234-o001_20240101t000000_spec2_00004_asn.json"


def _association(science, background, imprint):
    return {"asn_type": "spec2", "asn_rule": "Asn_Lv2SpecSpecial", "program": PROGRAM,
            "asn_id": "o001", "asn_pool": "jw01234_pool.csv", "products": [
                {"name": science, "members": [
                    {"expname": f"{science}_rate.fits", "exptype": "science"},
                    {"expname": f"{background}_rate.fits", "exptype": "background"},
                    {"expname": f"{imprint}_rate.fits", "exptype": "imprint"}]}]}


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """Three IFU exposures (science, background, imprint), cleaned, and four rewritten
    associations: a good one, one whose cleaned background was deleted since, one whose
    cleaned science file is truncated, and one the rewrite refused."""
    directory = tmp_path_factory.mktemp("stage2_run")
    archive, results = directory / "archive", directory / "results"
    stems, rates, cleaned = [], {}, {}
    for exposure in (1, 2, 3):
        sim = simulate.simulate_exposure("ifu", "NRS1", seed=exposure, program=PROGRAM,
                                         exposure=exposure)
        rate, cal = simulate.write_exposure(sim, archive)
        pipeline_product(rate)
        out = results / PROGRAM / sim.stem / f"{sim.stem}_nsclean_rate.fits"
        ex.clean_exposure(rate, out, cal_path=cal)
        stems.append(sim.stem)
        rates[sim.stem], cleaned[sim.stem] = rate, out
    science, background, imprint = stems
    folder = results / PROGRAM / "stage2" / "associations"
    write_association(rewrite_spec2_association(
        _association(science, background, imprint), cleaned, folder, source=GOOD),
        folder / GOOD)
    gone = dict(cleaned, **{science: results / PROGRAM / "deleted" /
                            f"{science}_nsclean_rate.fits"})
    write_association(rewrite_spec2_association(
        _association(background, science, imprint), gone, folder, source=LOST),
        folder / LOST)
    truncated = results / PROGRAM / "truncated" / f"{background}_nsclean_rate.fits"
    truncated.parent.mkdir()
    truncated.write_bytes(cleaned[background].read_bytes()[:20000])
    write_association(rewrite_spec2_association(
        _association(background, imprint, imprint),
        dict(cleaned, **{background: truncated}), folder, source=BROKEN), folder / BROKEN)
    status = folder.parent / "associations.json"
    status.write_text(json.dumps({"associations": [
        {"file": name, "status": "ok", "reason": ""} for name in (GOOD, LOST, BROKEN)] + [
        {"file": REFUSED, "status": "refused", "reason": f"{REFUSED}: not every member "
         "is cleaned"}]}))
    return {"stems": stems, "rates": rates, "cleaned": cleaned, "folder": folder,
            "status": status, "directory": directory}


def run_spec2_in_child(program, name, crds, steps=None, env_extra=None, before=""):
    """run_spec2 in a child process on ``program``'s associations; returns (entries or
    the error, products folder)."""
    products = program["directory"] / name
    shutil.rmtree(products, ignore_errors=True)
    child = run_child(f"""
import logging
{before}
from nsclean.workflow.stage2 import run_spec2
logging.basicConfig(level=logging.INFO)
try:
    result = run_spec2({str(program['folder'])!r}, {str(program['status'])!r},
                       {str(products)!r}, {str(products.with_suffix('.json'))!r},
                       crds={crds!r}, steps={steps!r}, logger=logging.getLogger("test"))
except (RuntimeError, ValueError) as error:
    result = {{"error": str(error)}}
""", env_extra={"STPIPE_DISABLE_CRDS_STEPPARS": "true", **(env_extra or {})},
                      timeout=600)
    assert child["rc"] == 0, child["stderr"][-4000:]
    return child["result"], products


def test_offline_run_publishes_each_associations_products(program, tmp_path):
    crds = {"crds_path": str(crds_configuration_only(tmp_path / "crds")),
            "crds_server_url": closed_port_url()}
    before = {p: p.read_bytes() for p in program["folder"].iterdir()}
    entries, products = run_spec2_in_child(program, "products", crds, offline_steps())
    status = {e["file"]: e for e in entries}
    assert json.loads(products.with_suffix(".json").read_text())["associations"] == entries
    science, background, imprint = program["stems"]

    # the good association: its product, published, nothing else left in the folder
    assert status[GOOD]["status"] == "ok", status[GOOD]
    assert status[GOOD]["products"] == [f"{science}_cal.fits"]
    assert sorted(p.name for p in products.iterdir()) == [f"{science}_cal.fits"]
    # one bad association does not stop the others; each says why, in one line
    assert status[LOST]["status"] == "failed"
    assert status[LOST]["reason"].startswith(f"{LOST}: background ../../deleted/")
    assert "not found" in status[LOST]["reason"]
    assert status[BROKEN]["status"] == "failed"
    assert status[BROKEN]["reason"].startswith(f"{BROKEN}: calwebb_spec2 failed: ")
    assert status[REFUSED] == {"file": REFUSED, "status": "refused",
                               "reason": f"{REFUSED}: not every member is cleaned"}
    assert all("\n" not in e["reason"] for e in entries)
    # the associations are inputs: untouched
    assert {p: p.read_bytes() for p in program["folder"].iterdir()} == before

    # jwst read the cleaned members: science - background (the imprint, subtracted from
    # both, cancels), with the imprint's DQ flags; not the archive's rates
    read = {stem: fits.getdata(program["cleaned"][stem], "SCI") for stem in (science,
                                                                             background)}
    with fits.open(products / f"{science}_cal.fits") as cal:
        data, dq, header = cal["SCI"].data, cal["DQ"].data, cal[0].header
    expected = read[science] - read[background]
    both = np.isfinite(data) & np.isfinite(expected)
    assert both.mean() > 0.9
    np.testing.assert_allclose(data[both], expected[both], rtol=0, atol=1e-5)
    raw = (fits.getdata(program["rates"][science], "SCI")
           - fits.getdata(program["rates"][background], "SCI"))
    assert np.abs(data[both] - raw[both]).max() > 1e-3
    imprint_dq = fits.getdata(program["cleaned"][imprint], "DQ")
    assert np.array_equal(dq & imprint_dq, imprint_dq)
    assert header["S_IMPRNT"] == "COMPLETE" and header["S_BKDSUB"] == "COMPLETE"
    # cleaned by nsclean (S_NSCLEN), and jwst's clean_flicker_noise was not run on it
    assert header["S_NSCLEN"] == "COMPLETE" and header["S_CLNFNS"] == "SKIPPED"
    assert header["ASNTABLE"] == GOOD
    # our provenance (version, options) goes on into the product
    assert header["NSCVER"] == fits.getval(program["cleaned"][science], "NSCVER")


def test_offline_run_of_a_segmented_time_series(tmp_path):
    """A BOTS exposure in two rateints segments: one association per segment, each
    member its segment's cleaned file; one calints per segment."""
    series = simulate.simulate_timeseries("NRS1", 4, seed=5, subarray="SUB512",
                                          program=PROGRAM, observation=2)
    rates, cals = simulate.write_timeseries(series, tmp_path / "archive", segments=2)
    for rate in rates:
        pipeline_product(rate)
    results = tmp_path / "results" / PROGRAM
    summary = tso.clean_rateints(rates, results / series.stem / "nsclean_rateints",
                                 calints_paths=cals, workers=1)
    cleaned = {Path(r).name: Path(out) for r, out in zip(rates, summary["outputs"],
                                                           strict=True)}
    folder = results / "stage2" / "associations"
    names = []
    for number, rate in enumerate(rates, start=1):
        names.append(f"jw01234-o002_20240101t000000_spec2_0000{number}_asn.json")
        segment = {"asn_type": "spec2", "asn_rule": "Asn_Lv2SpecTSO", "program": PROGRAM,
                   "asn_id": "o002", "asn_pool": "jw01234_pool.csv", "products": [
                       {"name": Path(rate).name.replace("_rateints.fits", ""), "members": [
                           {"expname": Path(rate).name, "exptype": "science"}]}]}
        write_association(rewrite_spec2_association(segment, cleaned, folder,
                                                    source=names[-1]), folder / names[-1])
    status = folder.parent / "associations.json"
    status.write_text(json.dumps({"associations": [
        {"file": name, "status": "ok", "reason": ""} for name in names]}))
    crds = {"crds_path": str(crds_configuration_only(tmp_path / "crds")),
            "crds_server_url": closed_port_url()}
    entries, products = run_spec2_in_child(
        {"folder": folder, "status": status, "directory": tmp_path}, "products", crds,
        offline_steps())
    for entry, rate in zip(entries, rates, strict=True):
        calints = Path(rate).name.replace("_rateints.fits", "_calints.fits")
        assert entry["status"] == "ok" and entry["products"] == [calints], entry
        with fits.open(products / calints) as hdul:
            assert hdul["SCI"].data.shape == (2, 32, 512)
            assert hdul[0].header["S_CLNFNS"] == "SKIPPED"
            data = hdul["SCI"].data
        expected = fits.getdata(cleaned[Path(rate).name], "SCI")
        np.testing.assert_array_equal(np.isfinite(data), np.isfinite(expected))
        np.testing.assert_allclose(data[np.isfinite(data)],
                                   expected[np.isfinite(expected)], atol=1e-6)


def test_an_association_without_its_product_is_failed(program, tmp_path):
    """Without WCS, jwst ends the association quietly and makes no product: that is a
    failure, not an ok with nothing in it."""
    crds = {"crds_path": str(crds_configuration_only(tmp_path / "crds")),
            "crds_server_url": closed_port_url()}
    steps = offline_steps()
    del steps["assign_wcs"]["post_hooks"]
    entries, products = run_spec2_in_child(program, "no_wcs", crds, steps)
    status = {e["file"]: e for e in entries}
    assert status[GOOD] == {"file": GOOD, "status": "failed", "products": [], "reason":
                            f"{GOOD}: calwebb_spec2 made 0 of 1 products (assign_wcs "
                            "skipped or failed: see the log)"}
    assert list(products.iterdir()) == []


def test_an_unusable_crds_fails_each_association_in_one_line(program, tmp_path):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    server = closed_port_url()
    crds = {"crds_path": str(empty), "crds_server_url": server}
    # default steps: assign_wcs and the others ask CRDS for their references
    entries, products = run_spec2_in_child(program, "no_crds", crds, {})
    status = {e["file"]: e for e in entries}
    assert status[GOOD]["status"] == "failed"
    assert status[GOOD]["reason"].startswith(
        f"{GOOD}: CRDS could not be used (CRDS_PATH={empty}, CRDS_SERVER_URL={server}): ")
    assert "\n" not in status[GOOD]["reason"]
    assert status[LOST]["status"] == "failed"  # (stopped before CRDS: its file is gone)
    assert list(products.iterdir()) == []  # nothing half-written


def test_no_crds_cache_or_no_jwst_stop_with_one_line(program, monkeypatch):
    monkeypatch.delenv("CRDS_PATH", raising=False)
    result, _ = run_spec2_in_child(program, "unset", {}, {})
    assert result == {"error": "stage2.run needs a CRDS cache: set stage2.crds_path (and "
                               "stage2.crds_server_url, or a complete offline cache)"}
    result, _ = run_spec2_in_child(program, "no_jwst", {"crds_path": "/nonexistent"}, {},
                                   before="import sys\nsys.modules['jwst'] = None")
    assert result == {"error": "stage2.run needs the jwst pipeline: pip install "
                               "'nsclean[jwst]'"}


def test_clean_flicker_noise_is_always_skipped():
    options = {"extract_1d": {"skip": True}, "clean_flicker_noise": {"fit_method": "fft"}}
    steps = spec2_steps(options)
    assert steps == {"extract_1d": {"skip": True},
                     "clean_flicker_noise": {"fit_method": "fft", "skip": True}}
    assert options["clean_flicker_noise"] == {"fit_method": "fft"}  # not modified
    assert spec2_steps(None) == {"clean_flicker_noise": {"skip": True}}
    with pytest.raises(ValueError, match="clean_flicker_noise must stay skipped"):
        spec2_steps({"clean_flicker_noise": {"skip": False}})


def _crds_cache():
    """``$CRDS_PATH``, if it is a CRDS cache that was filled from a server."""
    path = os.environ.get("CRDS_PATH", "")
    if not path or not (Path(path) / "config" / "jwst" / "server_config").is_file():
        return None
    return path


@pytest.mark.skipif(_crds_cache() is None,
                    reason="needs a CRDS cache with the NIRSpec IFU references (and the "
                           "step parameters): set CRDS_PATH to one filled from "
                           "https://jwst-crds.stsci.edu (the test itself stays offline)")
def test_full_spec2_run_with_crds(program):
    # the cache only: a server nothing listens on (tests talk to loopback only)
    crds = {"crds_path": _crds_cache(), "crds_server_url": closed_port_url()}
    # CRDS's own step parameters are used too (pars-spec2pipeline); ours win
    entries, products = run_spec2_in_child(
        program, "crds_products", crds, {},
        env_extra={"STPIPE_DISABLE_CRDS_STEPPARS": ""})
    status = {e["file"]: e for e in entries}
    science = program["stems"][0]
    assert status[GOOD]["status"] == "ok", status[GOOD]["reason"]
    assert f"{science}_cal.fits" in status[GOOD]["products"]
    assert sorted(p.name for p in products.iterdir()) == sorted(status[GOOD]["products"])
    header = fits.getheader(products / f"{science}_cal.fits")
    assert header["S_WCS"] == "COMPLETE"
    assert header["S_IMPRNT"] == "COMPLETE" and header["S_BKDSUB"] == "COMPLETE"
    assert header["S_NSCLEN"] == "COMPLETE" and header["S_CLNFNS"] == "SKIPPED"
    assert status[LOST]["status"] == status[BROKEN]["status"] == "failed"
