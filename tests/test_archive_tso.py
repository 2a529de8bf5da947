"""Time-series products in the archive layer: segmented _rateints/_calints in the local
scan, the manifest, the loopback MAST server and the real astroquery client."""

from __future__ import annotations

from pathlib import Path

import pytest
from archive_helpers import FAST_SHORT_READ, make_program, run_child

from nsclean.archive import archive
from nsclean.testing import simulate
from nsclean.testing.mastserver import MastServer, build_catalogue

pytestmark = pytest.mark.usefixtures("loopback_only")

TSO = "jw02222004001_03101_00001_nrs1"
BROKEN = "jw02222005001_03101_00001_nrs2"
FAST = FAST_SHORT_READ


@pytest.fixture(scope="module")
def program_dir(tmp_path_factory):
    """One IFU rate/cal pair (program 1345), a 3-segment time series, a time series whose
    second segment the archive lacks (program 2222), and a BOTS rate with its calints."""
    directory = tmp_path_factory.mktemp("tso_program")
    make_program(directory, exposures=[
        ("jw01345062001_03101_00001_nrs1", "NRS_IFU", "PRISM", "CLEAR", "FULL")])
    good = simulate.simulate_timeseries("NRS1", 6, seed=1, subarray="SUB32", program="02222",
                                        observation=4)
    simulate.write_timeseries(good, directory, segments=3)
    broken = simulate.simulate_timeseries("NRS2", 6, seed=2, subarray="SUB32",
                                          program="02222", observation=5)
    rates, cals = simulate.write_timeseries(broken, directory, segments=3)
    rates[1].unlink()
    cals[1].unlink()
    bots = simulate.simulate_exposure("bots", "NRS2", subarray="SUB32", seed=3,
                                      program="02222", observation=6)
    simulate.write_exposure(bots, directory)
    return directory


def segment_names(stem, kind, numbers):
    base, detector = stem.rsplit("_", 1)
    return [f"{base}-seg{n:03d}_{detector}_{kind}.fits" for n in numbers]


def test_stem_of_segments_and_ints_products():
    assert archive.stem_of(f"x/{segment_names(TSO, 'rateints', [2])[0]}") == TSO
    assert archive.stem_of(f"{TSO}_calints.fits") == TSO


def check_manifest(rows, program_dir: Path):
    by_stem = {row.stem: row for row in rows}
    tso = by_stem[TSO]
    assert tso.status == "ok" and tso.time_series and tso.exp_type == "NRS_BRIGHTOBJ"
    assert tso.rate_files == segment_names(TSO, "rateints", [1, 2, 3])
    assert tso.cal_files == segment_names(TSO, "calints", [1, 2, 3])
    assert [size for _, _, size in tso.files()] == [
        (program_dir / name).stat().st_size for name, _, _ in tso.files()]
    broken = by_stem[BROKEN]
    assert broken.status == "skipped"
    assert "seg002 is not in the archive" in broken.reason
    bots = by_stem["jw02222006001_03101_00001_nrs2"]  # a BOTS rate pairs with its calints
    assert (bots.status, bots.time_series, bots.cal_file) == (
        "ok", False, "jw02222006001_03101_00001_nrs2_calints.fits")
    ifu = by_stem["jw01345062001_03101_00001_nrs1"]
    assert (ifu.status, ifu.time_series, len(ifu.files())) == ("ok", False, 2)


def test_local_scan_lists_a_segmented_exposure_as_one_row(program_dir, tmp_path):
    manifest = archive.fetch_manifest(["1345", "2222"], source="local", local_dir=program_dir)
    check_manifest(manifest.rows, program_dir)
    path = archive.write_manifest(manifest, tmp_path / "manifest.csv")
    assert archive.read_manifest(path) == manifest.rows  # sizes of segments survive


def test_loopback_server_serves_a_segmented_exposure_as_one_observation(program_dir):
    catalogue = build_catalogue(program_dir)
    level2 = [row for row in catalogue.observations if row["calib_level"] == 2]
    tso = [row for row in level2 if row["obs_id"] == TSO]
    assert len(tso) == 1 and tso[0]["dataproduct_type"] == "timeseries"
    products = catalogue.products_by_obsid[tso[0]["obsid"]]
    assert sorted(p["productSubGroupDescription"] for p in products) == \
        ["CALINTS"] * 3 + ["RATEINTS"] * 3
    assert not any("-seg" in row["obs_id"] for row in level2)


def test_astroquery_finds_and_downloads_every_segment(program_dir, tmp_path):
    with MastServer(program_dir) as server:
        child = run_child(f"""
from nsclean.archive import archive
archive.configure_mast_server({server.url!r})
manifest = archive.fetch_manifest(["1345", "2222"], archive_url={server.url!r}, backoff=0.01)
archive.write_manifest(manifest, {str(tmp_path / "manifest.csv")!r})
result = [r.stem for r in manifest.rows]
""", timeout=60)
        assert child["rc"] == 0, child["stderr"][-3000:]
        rows = archive.read_manifest(tmp_path / "manifest.csv")
        check_manifest(rows, program_dir)
        tso = next(row for row in rows if row.stem == TSO)
        assert tso.rate_uri.split() == [f"mast:JWST/product/{n}" for n in tso.rate_files]
        paths = archive.download_exposure(tso, tmp_path / "cache", archive_url=server.url,
                                          token="", **FAST)
        assert [p.name for p in paths["rate"]] == tso.rate_files
        assert [p.name for p in paths["cal"]] == tso.cal_files
        for path in paths["rate"] + paths["cal"]:
            assert path.read_bytes() == (program_dir / path.name).read_bytes()
