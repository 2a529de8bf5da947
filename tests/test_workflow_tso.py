"""The workflow on a program with time series, fetched from the loopback MAST server with
the real astroquery client: a segmented BOTS exposure (rateints/calints), one whose
second segment the archive lacks, and a BOTS rate with its calints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from workflow_helpers import read_report, write_bots_exposures

from nsclean.io import tso
from nsclean.testing import simulate
from nsclean.testing.mastserver import MastServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "04245"
SEGMENTED = "jw04245001001_03101_00001_nrs1"
GAP = "jw04245002001_03101_00001_nrs2"
RATE = "jw04245003001_03101_00001_nrs2"
CUT = "jw04245004001_03101_00001_nrs1"


def snakemake(workdir, *args, config=None, limit=600, env=None):
    """Run the workflow in ``workdir`` (writing ``config`` to its config.yaml first, if
    given), killed after ``limit`` seconds; stdout and stderr come back together."""
    if config is not None:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    command = ["timeout", "-s", "KILL", str(limit), sys.executable, "-m", "snakemake",
               "--snakefile", str(ROOT / "Snakefile"), "--configfile", "config.yaml", *args]
    return subprocess.run(command, cwd=workdir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=limit * 1.1,
                          check=False, env=env)


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tso_archive")
    good = simulate.simulate_timeseries("NRS1", 6, seed=1, subarray="SUB512",
                                        program=PROGRAM, observation=1)
    simulate.write_timeseries(good, directory, segments=3)
    gap = simulate.simulate_timeseries("NRS2", 6, seed=2, subarray="SUB512",
                                       program=PROGRAM, observation=2)
    rates, _ = simulate.write_timeseries(gap, directory, segments=3)
    rates[1].unlink()  # the archive lacks a segment in the middle: seen in the manifest
    cut = simulate.simulate_timeseries("NRS1", 4, seed=4, subarray="SUB512",
                                       program=PROGRAM, observation=4)
    rates, _ = simulate.write_timeseries(cut, directory, segments=2)
    rates[1].unlink()  # ... or the last one: only the headers (NINTS) tell
    bots = simulate.simulate_exposure("bots", "NRS2", subarray="SUB512", seed=3,
                                      program=PROGRAM, observation=3)
    simulate.write_exposure(bots, directory)
    return directory


@pytest.fixture(scope="module")
def run(archive_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tso_run")
    with MastServer(archive_dir) as server:
        config = {"programs": [PROGRAM], "archive": {"url": server.url},
                  "results": "results"}
        result = snakemake(workdir, "--cores", "2", config=config)
    return workdir / "results", result


def test_segmented_time_series_is_cleaned_per_integration(run, archive_dir):
    results, result = run
    # one exposure failed (CUT), so the run says it was not clean
    assert result.returncode != 0 and "1 of 4 exposures failed" in result.stdout, \
        result.stdout[-4000:]
    folder = results / PROGRAM / SEGMENTED
    record = json.loads((folder / f"{SEGMENTED}_clean_timeseries.json").read_text())
    assert record["status"] == "ok" and record["clean"]["n_integrations"] == 6
    cleaned = sorted((folder / "nsclean_rateints").glob("jw*"))  # (and Snakemake's stamp)
    sources = sorted(archive_dir.glob(f"{SEGMENTED[:-5]}-seg*_nrs1_rateints.fits"))
    assert [p.name for p in cleaned] == [tso.cleaned_name(p) for p in sources]
    assert record["files"] == {p.name: p.stat().st_size for p in cleaned}
    for source, product in zip(sources, cleaned, strict=True):
        before, after = fits.getdata(source, "SCI"), fits.getdata(product, "SCI")
        assert before.shape == after.shape == (2, 32, 512)
        assert not np.array_equal(np.nan_to_num(before), np.nan_to_num(after))
        assert fits.getval(product, "S_NSCLEN") == "COMPLETE"
    mask = fits.getdata(folder / f"{SEGMENTED}_mask.fits")
    assert mask.shape == (32, 512) and 0 < mask.mean() < 1


def test_report_lists_each_kind_with_its_outcome(run):
    results, _ = run
    rows = {row["stem"]: row for row in read_report(results)}
    assert rows[SEGMENTED]["status"] == "cleaned"
    assert rows[SEGMENTED]["cleaned_file"] == f"{PROGRAM}/{SEGMENTED}/nsclean_rateints"
    assert rows[RATE]["status"] == "cleaned"  # a BOTS rate, masked from its calints
    assert rows[RATE]["cleaned_file"].endswith("_nsclean_rate.fits")
    assert rows[GAP]["status"] == "skipped"
    assert "seg002 is not in the archive" in rows[GAP]["reason"]
    # the set-up of each exposure: from the rate header, or the manifest when skipped
    setup = ("mode", "detector", "grating", "filter", "readpatt")
    assert [rows[SEGMENTED][k] for k in setup] == ["BOTS", "NRS1", "G395H", "F290LP",
                                                   "NRSRAPID"]
    assert [rows[GAP][k] for k in setup] == ["BOTS", "NRS2", "G395H", "F290LP", ""]
    assert rows[CUT]["status"] == "failed"
    assert rows[CUT]["reason"].endswith("integrations 3-4 of NINTS 4 are in no given file: "
                                        f"a segment after seg001 of exposure {CUT} is missing")


# ------------------------------------------------------------------------------------
# missing_cal: user_mask
# ------------------------------------------------------------------------------------
def test_exposures_without_cal_use_the_configured_user_masks(tmp_path):
    """Three BOTS rates without calints: one gets a mask by its stem, one by mode and
    detector, the third (other detector, nothing configured) fails alone, in one line."""
    local = tmp_path / "local"
    rates = []
    for exposure, detector in ((1, "NRS1"), (2, "NRS1"), (3, "NRS2")):
        sim = simulate.simulate_exposure("bots", detector, subarray="SUB512", seed=exposure,
                                         program="04246", observation=1, exposure=exposure)
        rate, cal = simulate.write_exposure(sim, local)
        if exposure == 1:  # a mask made from this exposure's own calints, then no calints
            tso_mask = tmp_path / "by_stem.fits"
            from nsclean.io.exposure import make_mask

            make_mask(cal, rate, tso_mask)
            shutil.copyfile(tso_mask, tmp_path / "by_mode.fits")
        cal.unlink()
        rates.append(rate.name.removesuffix("_rate.fits"))
    by_stem, by_mode, unmasked = rates
    config = {"programs": ["4246"], "results": "results",
              "archive": {"source": "local", "local_dir": str(local),
                          "missing_cal": "user_mask"},
              "user_masks": {"exposures": {by_stem: str(tmp_path / "by_stem.fits")},
                             "modes": {"BOTS": {"NRS1": str(tmp_path / "by_mode.fits")}}}}
    result = snakemake(tmp_path, "--cores", "2", config=config)
    assert "1 of 3 exposures failed" in result.stdout, result.stdout[-4000:]
    rows = {row["stem"]: row for row in read_report(tmp_path / "results")}
    for stem, name in ((by_stem, "by_stem.fits"), (by_mode, "by_mode.fits")):
        assert rows[stem]["status"] == "cleaned", rows[stem]
        record = json.loads((tmp_path / "results" / "04246" / stem / f"{stem}_mask.json")
                            .read_text())
        assert record["mask"]["source"] == "user" and name in record["inputs"]
        assert fits.getval(tmp_path / "results" / rows[stem]["cleaned_file"],
                           "NSCMUSER") == f"{stem}_mask.fits"
    assert rows[unmasked]["status"] == "failed"
    assert "no cal file (so no automatic mask) and no user mask" in rows[unmasked]["reason"]
    assert "\n" not in rows[unmasked]["reason"]


def test_snakemake_report_shows_our_report_with_its_thumbnails(run):
    """`snakemake --report` puts our HTML reports in its zip; their thumbnails are in the
    HTML itself, so they show there (relative links would not resolve inside the zip)."""
    import base64
    import re
    import zipfile

    results, _ = run
    workdir = results.parent
    result = snakemake(workdir, "--report", "report.zip", limit=300)
    assert result.returncode == 0, result.stdout[-3000:]
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        ours = [archive.read(name).decode() for name in archive.namelist()
                if name.endswith("/report.html") and "/data/raw/" in name]
    assert len(ours) == 2  # the run's and the program's
    thumbnails = {p.read_bytes() for p in results.rglob("*_thumbnail.png")}
    for text in ours:
        sources = re.findall(r'<img class=thumb src="([^"]+)"', text)
        assert len(sources) == 2  # the two cleaned exposures (no figures when failed)
        for source in sources:
            assert source.startswith("data:image/png;base64,")
            assert base64.b64decode(source.split(",", 1)[1]) in thumbnails


# ------------------------------------------------------------------------------------
# save_noise_model
# ------------------------------------------------------------------------------------
def test_the_workflow_saves_the_noise_model_when_asked(tmp_path):
    local = tmp_path / "local"
    sim = simulate.simulate_exposure("bots", "NRS2", subarray="SUB512", seed=7,
                                     program="04247", observation=1)
    rate, _ = simulate.write_exposure(sim, local)
    series = simulate.simulate_timeseries("NRS1", 4, seed=8, subarray="SUB512",
                                          program="04247", observation=2)
    rateints, _ = simulate.write_timeseries(series, local, segments=2)
    config = {"programs": ["4247"], "results": "results", "save_noise_model": True,
              "archive": {"source": "local", "local_dir": str(local)}}
    result = snakemake(tmp_path, "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout[-4000:]
    folder = tmp_path / "results" / "04247" / sim.stem
    model = fits.getdata(folder / f"{sim.stem}_flicker_noise.fits", "SCI")
    before = fits.getdata(rate, "SCI")
    after = fits.getdata(folder / f"{sim.stem}_nsclean_rate.fits", "SCI")
    finite = np.isfinite(before)
    # (float32 files: compare at the precision of the bright star's values)
    np.testing.assert_allclose(after[finite], (before - model)[finite], rtol=1e-6, atol=1e-6)
    cleaned_dir = tmp_path / "results" / "04247" / series.stem / "nsclean_rateints"
    for path in rateints:
        model_file = cleaned_dir / path.name.replace("_rateints", "_flicker_noise")
        assert fits.getdata(model_file, "SCI").shape == (2, 32, 512)


# ------------------------------------------------------------------------------------
# stage 2 again, on the cleaned rates
# ------------------------------------------------------------------------------------
def _asn(program, members):
    return {"asn_type": "spec2", "asn_rule": "Asn_Lv2SpecSpecial", "program": program,
            "asn_id": "o001", "asn_pool": "pool.csv", "products": [
                {"name": members[0][0], "members": [
                    {"expname": f"{stem}_rate.fits", "exptype": kind}
                    for stem, kind in members]}]}


def test_stage2_associations_point_at_the_cleaned_rates(tmp_path):
    local = tmp_path / "local"
    stems, cals = write_bots_exposures(local, "04248", 4, subarray="SUB512")
    shutil.copyfile(cals[0], cals[3])  # exposure 4 fails (its calints is another's)
    good = "jw04248-o001_20240101t000000_spec2_00001_asn.json"
    bad = "jw04248-o001_20240101t000000_spec2_00002_asn.json"
    (local / good).write_text(json.dumps(_asn("04248", [
        (stems[0], "science"), (stems[1], "background"), (stems[2], "imprint")])))
    (local / bad).write_text(json.dumps(_asn("04248", [
        (stems[1], "science"), (stems[3], "background")])))
    config = {"programs": ["4248"], "results": "results", "stage2": {"associations": True},
              "archive": {"source": "local", "local_dir": str(local)}}
    result = snakemake(tmp_path, "--cores", "2", "--keep-going", config=config)
    stage2 = tmp_path / "results" / "04248" / "stage2"
    assert (stage2 / "associations.json").is_file(), result.stdout[-4000:]
    status = {e["file"]: e for e in
              json.loads((stage2 / "associations.json").read_text())["associations"]}
    assert status[good]["status"] == "ok"
    assert status[bad]["status"] == "refused"
    assert f"background {stems[3]}_rate.fits" in status[bad]["reason"]
    rewritten = json.loads((stage2 / "associations" / good).read_text())
    for member, stem in zip(rewritten["products"][0]["members"], stems, strict=False):
        target = (stage2 / "associations" / member["expname"]).resolve()
        assert target == (tmp_path / "results" / "04248" / stem /
                          f"{stem}_nsclean_rate.fits").resolve()
        assert fits.getval(target, "S_CLNFNS") == "COMPLETE"
    assert not (stage2 / "associations" / bad).exists()


def test_stage2_run_through_snakemake(tmp_path):
    """stage2: {associations: true, run: true} on two fixed-slit exposures (science and
    its nodded background), with the real calwebb_spec2 run offline as
    tests/test_stage2_run.py runs it (tests/spec2_offline.py)."""
    pytest.importorskip("jwst", reason="needs the [jwst] extra: pip install -e '.[jwst]'")
    import os

    from spec2_offline import (
        closed_port_url,
        crds_configuration_only,
        offline_steps,
        pipeline_product,
    )

    local = tmp_path / "local"
    stems = []
    for exposure in (1, 2):
        sim = simulate.simulate_exposure("fs", "NRS1", readout="NRS", subarray="SUB512",
                                         seed=exposure, program="04249", exposure=exposure)
        rate, _ = simulate.write_exposure(sim, local)
        pipeline_product(rate)
        stems.append(sim.stem)
    name = "jw04249-o001_20240101t000000_spec2_00001_asn.json"
    (local / name).write_text(json.dumps(_asn("04249", [
        (stems[0], "science"), (stems[1], "background")])))
    refused = "jw04249-o001_20240101t000000_spec2_00002_asn.json"  # exposure 3: none
    (local / refused).write_text(json.dumps(_asn("04249", [
        (stems[1], "science"), (stems[0].replace("_00001_", "_00003_"), "background")])))
    config = {"programs": ["4249"], "results": "results",
              "archive": {"source": "local", "local_dir": str(local)},
              "stage2": {"associations": True, "run": True,
                         "crds_path": str(crds_configuration_only(tmp_path / "crds")),
                         "crds_server_url": closed_port_url(), "steps": offline_steps()}}
    env = dict(os.environ, STPIPE_DISABLE_CRDS_STEPPARS="true",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    result = snakemake(tmp_path, "--cores", "2", config=config, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    stage2 = tmp_path / "results" / "04249" / "stage2"
    entry, other = json.loads((stage2 / "products.json").read_text())["associations"]
    assert other["file"] == refused and other["status"] == "refused"
    assert f"nsclean: stage 2: 1 of 2 associations not run (see results/04249/stage2/" \
           f"products.json): refused: {refused}: not every member" in result.stdout
    assert entry == {"file": name, "status": "ok", "reason": "",
                     "products": [f"{stems[0]}_cal.fits"]}
    # (Snakemake marks a directory output with its .snakemake_timestamp)
    assert sorted(p.name for p in (stage2 / "products").iterdir()
                  if p.name != ".snakemake_timestamp") == entry["products"]
    cleaned = [fits.getdata(tmp_path / "results" / "04249" / stem /
                            f"{stem}_nsclean_rate.fits", "SCI") for stem in stems]
    with fits.open(stage2 / "products" / entry["products"][0]) as cal:
        assert cal[0].header["S_CLNFNS"] == "SKIPPED"
        assert cal[0].header["S_BKDSUB"] == "COMPLETE"
        data = cal["SCI"].data
    both = np.isfinite(data) & np.isfinite(cleaned[0] - cleaned[1])
    assert both.mean() > 0.5
    np.testing.assert_allclose(data[both], (cleaned[0] - cleaned[1])[both], atol=1e-5)
