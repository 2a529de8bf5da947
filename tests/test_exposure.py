"""Tests of nsclean.io.exposure: reading, pairing, masks for exposures, writing cleaned products."""

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nsclean.algorithm import nirspec as dqflags
from nsclean.io import exposure as ex
from nsclean.io.errors import NSCleanInputError
from nsclean.testing import simulate

datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hdu_byte_ranges(path):
    """(header start, data start, data end) of every HDU, from astropy's file layout."""
    with fits.open(path, memmap=False) as hdul:
        return [
            (
                h.fileinfo()["hdrLoc"],
                h.fileinfo()["datLoc"],
                h.fileinfo()["datLoc"] + h.fileinfo()["datSpan"],
            )
            for h in hdul
        ], [h.name for h in hdul]


def files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# -- simulated exposures (module scope: simulating a full frame takes ~1.5 s) -------------

CASES = {
    # name: (kind, detector, readout, subarray)
    "ifu_nrs1_irs2": ("ifu", "NRS1", "IRS2", None),
    "mos_nrs2_traditional": ("mos", "NRS2", "NRS", None),
    "fs_nrs2_allslits": ("fs", "NRS2", "NRS", "ALLSLITS"),
    "fs_nrs1_sub512": ("fs", "NRS1", "NRS", "SUB512"),
    "bots_nrs2_sub2048": ("bots", "NRS2", "NRS", "SUB2048"),
}


@pytest.fixture(scope="module")
def exposures(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sim")
    out = {}
    for number, (name, (kind, detector, readout, subarray)) in enumerate(CASES.items(), 1):
        sim = simulate.simulate_exposure(
            kind, detector, readout=readout, subarray=subarray, seed=number, observation=number
        )
        rate_path, cal_path = simulate.write_exposure(sim, directory)
        out[name] = (sim, rate_path, cal_path)
    return out


@pytest.fixture
def small(exposures, tmp_path):
    """A private copy of the small fixed-slit exposure, for tests that write next to it."""
    _, rate_path, cal_path = exposures["fs_nrs1_sub512"]
    rate = shutil.copy(rate_path, tmp_path / rate_path.name)
    cal = shutil.copy(cal_path, tmp_path / cal_path.name)
    return Path(rate), Path(cal)


# -- reading -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_read_rate_in_every_mode(exposures, case):
    sim, rate_path, _ = exposures[case]
    rate = ex.read_rate(rate_path)
    assert rate.stem == sim.stem
    assert rate.detector == sim.meta["detector"]
    assert rate.subarray == sim.meta["subarray"]
    assert rate.origin == (sim.meta["substrt2"] - 1, sim.meta["substrt1"] - 1)
    np.testing.assert_array_equal(rate.sci, sim.rate)
    # MSA_FAILED_OPEN is a stage-2 flag: in the cal product, never in the rate
    np.testing.assert_array_equal(rate.dq, sim.dq & ~np.uint32(dqflags.MSA_FAILED_OPEN))
    assert rate.dq.dtype == np.uint32
    assert rate.full_frame == (sim.rate.shape == (2048, 2048))


@pytest.mark.parametrize("case", list(CASES))
def test_cal_footprint_matches_the_simulated_truth(exposures, case):
    sim, rate_path, cal_path = exposures[case]
    cal = ex.read_cal(cal_path)
    assert cal.layout == ("ifu" if sim.meta["kind"] == "ifu" else "slits")
    footprint = cal.footprint(sim.rate.shape, "trace")
    # the pipeline leaves DO_NOT_USE pixels NaN inside the footprint
    usable = sim.footprint & ((sim.dq & dqflags.DO_NOT_USE) == 0)
    np.testing.assert_array_equal(footprint, usable)
    if cal.layout == "slits":
        box = cal.footprint(sim.rate.shape, "box")
        assert box.sum() >= footprint.sum() and not (footprint & ~box).any()
        assert len(cal.slits) == len(sim.slits)


def test_exposure_stem_from_name_and_from_header():
    assert ex.exposure_stem("/x/jw01345062001_03101_00001_NRS2_cal.fits") == (
        "jw01345062001_03101_00001_nrs2"
    )
    header = {
        "PROGRAM": "01345",
        "OBSERVTN": "062",
        "VISIT": "001",
        "VISITGRP": "03",
        "SEQ_ID": "1",
        "ACT_ID": "01",
        "EXPOSURE": "1",
        "DETECTOR": "NRS2",
    }
    assert ex.exposure_stem("renamed.fits", header) == "jw01345062001_03101_00001_nrs2"
    with pytest.raises(ValueError, match="stem"):
        ex.exposure_stem("renamed.fits")


def test_pairing_uses_stems_not_list_positions():
    stems = [f"jw01345062001_03101_0000{i}_nrs{d}" for i in (1, 2, 3) for d in (1, 2)]
    rates = [f"in/{s}_rate.fits" for s in stems]
    cals = [f"cal/{s}_cal.fits" for s in reversed(stems)]
    pairs = ex.pair_exposures(rates, cals)
    assert len(pairs) == 6
    for rate, cal in pairs:
        assert ex.exposure_stem(rate) == ex.exposure_stem(cal)
    with pytest.raises(NSCleanInputError, match="no cal file for exposure"):
        ex.pair_exposures(rates, cals[1:])
    assert len(ex.pair_exposures(rates, cals[1:], require_all=False)) == 5
    with pytest.raises(NSCleanInputError, match="given twice"):
        ex.pair_exposures(rates + [f"other/{stems[0]}_rate.fits"], cals)


def test_mismatch_names_every_difference(exposures):
    _, rate_nrs1, _ = exposures["fs_nrs1_sub512"]
    _, _, cal_other = exposures["bots_nrs2_sub2048"]
    rate, cal = ex.read_rate(rate_nrs1), ex.read_cal(cal_other)
    problems = ex.match_problems(rate, cal)
    text = "; ".join(problems)
    assert "DETECTOR: rate NRS1, cal NRS2" in text
    assert "SUBARRAY: rate SUB512, cal SUB2048" in text
    assert "OBSERVTN" in text and "stem" in text
    with pytest.raises(NSCleanInputError) as info:
        ex.check_match(rate, cal)
    message = str(info.value)
    assert message.startswith(str(cal.path)) and "\n" not in message
    same_rate, same_cal = exposures["fs_nrs1_sub512"][1:]
    assert ex.match_problems(ex.read_rate(same_rate), ex.read_cal(same_cal)) == []


def test_real_header_types_compare_as_numbers(small, tmp_path):
    """Real files carry PROGRAM '01345' and EXPOSURE '1' as strings; ints must match too."""
    rate_path, cal_path = small
    with fits.open(cal_path, mode="update") as hdul:
        hdul[0].header["EXPOSURE"] = 1
        hdul[0].header["PROGRAM"] = 9999
    assert ex.match_problems(ex.read_rate(rate_path), ex.read_cal(cal_path)) == []


# -- masks for exposures -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_exposure_mask_excludes_the_footprint(exposures, case):
    sim, rate_path, cal_path = exposures[case]
    rate, cal = ex.read_rate(rate_path), ex.read_cal(cal_path)
    mask, info = ex.build_exposure_mask(rate, cal)
    assert not (mask & sim.footprint).any()
    assert not mask[~np.isfinite(sim.rate)].any()
    assert info["source"] == "auto" and info["n_background"] == mask.sum()
    band = info["steps"][3]
    assert band["step"] == "fixed_slit_band"
    assert band["applied"] == (sim.meta["kind"] in ("ifu", "mos"))
    json.dumps(info)


def test_user_mask_combines_or_replaces(exposures):
    sim, rate_path, cal_path = exposures["fs_nrs1_sub512"]
    rate, cal = ex.read_rate(rate_path), ex.read_cal(cal_path)
    user = np.ones(sim.rate.shape, bool)
    user[:, 100:200] = False
    auto, _ = ex.build_exposure_mask(rate, cal)
    both, info = ex.build_exposure_mask(rate, cal, user_mask=user)
    np.testing.assert_array_equal(both, auto & user)
    assert info["source"] == "auto+user"
    only, info = ex.build_exposure_mask(rate, cal, user_mask=user, user_mask_mode="replace")
    np.testing.assert_array_equal(only, user)
    assert info["source"] == "user"


def test_mask_files_round_trip_and_record_options(small, tmp_path):
    rate_path, cal_path = small
    out = tmp_path / "out" / "mask.fits"
    png = tmp_path / "out" / "mask.png"
    summary = ex.make_mask(cal_path, rate_path, out, png_path=png, options={"dilation_radius": 3})
    with fits.open(out) as hdul:
        # an ImageModel: the mask is SCI, float32 1/0 (stdatamodels opens it with data)
        assert hdul[0].data is None and hdul[0].header["DATAMODL"] == "ImageModel"
        assert hdul["SCI"].data.dtype == np.dtype(">f4")
        assert set(np.unique(hdul["SCI"].data)) <= {0, 1}
        header = hdul[0].header
        assert header["NSCMDIL"] == 3 and header["DETECTOR"] == "NRS1"
        assert header["NSCMNBKG"] == summary["n_background"] == int(hdul["SCI"].data.sum())
        assert any("footprint" in str(h) for h in header["HISTORY"])
        assert hdul["GUARD"].data["N_BACKGROUND"].sum() == summary["n_background"]
    mask, _ = ex.read_mask(out, ex.read_rate(rate_path))
    from_png = ex.read_png_mask(png)
    np.testing.assert_array_equal(from_png, mask)
    # a mask for the other detector is refused
    with fits.open(out, mode="update") as hdul:
        hdul[0].header["DETECTOR"] = "NRS2"
    with pytest.raises(NSCleanInputError, match="made for DETECTOR NRS2"):
        ex.read_mask(out, ex.read_rate(rate_path))


def test_full_frame_ifu_mask_from_cal_within_one_second(exposures):
    """Benchmark of the issue: full-frame IFU mask from a cal file in <= 1 s.

    CPU time (all threads) rather than wall time, so that other jobs on the
    shared 2-core machine do not make the test flaky; see docs/masks.md for the
    wall-clock figures.
    """
    _, rate_path, cal_path = exposures["ifu_nrs1_irs2"]
    rate = ex.read_rate(rate_path)
    timings = []
    for _ in range(3):
        start = time.process_time()
        cal = ex.read_cal(cal_path)
        ex.build_exposure_mask(rate, cal)
        timings.append(time.process_time() - start)
    assert min(timings) < 1.0, timings


# -- writing cleaned products --------------------------------------------------------------


def test_clean_exposure_keeps_everything_but_sci(exposures, tmp_path):
    sim, rate_path, cal_path = exposures["bots_nrs2_sub2048"]
    before = sha256(rate_path), sha256(cal_path)
    out = tmp_path / "clean" / f"{sim.stem}_rate.fits"
    # (without the model's variance, which would also change VAR_RNOISE and ERR:
    # tests/test_readout.py checks that part)
    summary = ex.clean_exposure(rate_path, out, cal_path=cal_path, save_model=True,
                                save_mask=True, add_variance=False)
    assert (sha256(rate_path), sha256(cal_path)) == before  # inputs untouched
    json.dumps(summary)
    assert sorted(summary["outputs"]) == sorted(
        str(p)
        for p in (
            out,
            out.parent / f"{sim.stem}_flicker_noise.fits",
            out.parent / f"{sim.stem}_mask.fits",
        )
    )
    in_layout, in_names = hdu_byte_ranges(rate_path)
    out_layout, out_names = hdu_byte_ranges(out)
    assert in_names == out_names
    raw_in, raw_out = Path(rate_path).read_bytes(), out.read_bytes()
    for name, (h0, d0, d1), (k0, e0, e1) in zip(in_names, in_layout, out_layout, strict=True):
        if name == "PRIMARY":
            continue
        assert raw_in[h0:d0] == raw_out[k0:e0], f"{name} header changed"
        if name != "SCI":
            assert raw_in[d0:d1] == raw_out[e0:e1], f"{name} data changed"
    with (
        fits.open(rate_path) as original,
        fits.open(out) as cleaned,
        fits.open(out.parent / f"{sim.stem}_flicker_noise.fits") as model,
    ):
        primary_in, primary_out = original[0].header, cleaned[0].header
        for card in primary_in.cards:
            assert primary_out[card.keyword] == card.value
        assert primary_out["S_NSCLEN"] == "COMPLETE"
        assert primary_out["NSCVER"] == ex.__version__
        assert primary_out["NSCFMETH"] == summary["fit_options"]["method"]
        assert primary_out["NSCMDIL"] == summary["mask_options"]["dilation_radius"]
        sci_in, sci_out = original["SCI"].data, cleaned["SCI"].data
        np.testing.assert_array_equal(np.isnan(sci_out), np.isnan(sci_in))
        finite = np.isfinite(sci_in)
        np.testing.assert_allclose(
            sci_out[finite], (sci_in - model["SCI"].data)[finite], rtol=0, atol=1e-6
        )
        assert "S_NSCLEN" not in model[0].header and model[0].header["NSCPROD"] == "MODEL"
    with datamodels.open(out) as dm:
        assert type(dm).__name__ == "ImageModel"
        assert dm.meta.exposure.type == "NRS_BRIGHTOBJ"


def test_cleaning_removes_correlated_noise_in_the_background(exposures, tmp_path):
    sim, rate_path, cal_path = exposures["fs_nrs2_allslits"]
    out = tmp_path / "cleaned_rate.fits"
    ex.clean_exposure(rate_path, out, cal_path=cal_path)
    cleaned = fits.getdata(out, "SCI")
    dark = ~sim.illuminated & np.isfinite(sim.rate) & (sim.artifacts == 0)
    dark[:, ~dark.any(axis=0)] = False

    def banding(image):
        # the vertical stripes: column means of what is neither scene nor white noise
        residual = np.where(dark, image - sim.noise_white - sim.signal, 0.0)
        return np.std(residual.sum(axis=0)[dark.any(axis=0)] / dark.sum(axis=0)[dark.any(axis=0)])

    assert banding(cleaned) < 0.5 * banding(sim.rate)


def test_stdatamodels_file_with_asdf_extension(tmp_path):
    """A rate written by stdatamodels (with its ASDF extension) keeps its model type."""
    shape = (32, 512)
    rng = np.random.default_rng(4)
    model = datamodels.ImageModel(shape)
    model.data = (rng.normal(size=shape) + rng.normal(size=shape[1])).astype(np.float32)
    model.data[3, 7] = np.nan
    model.dq = np.zeros(shape, np.uint32)
    model.dq[3, 7] = dqflags.DO_NOT_USE
    meta = model.meta
    meta.instrument.name, meta.instrument.detector = "NIRSPEC", "NRS1"
    meta.exposure.type = "NRS_FIXEDSLIT"
    meta.subarray.name = "SUB512"
    meta.subarray.xstart, meta.subarray.ystart = 1, 997
    meta.subarray.xsize, meta.subarray.ysize = 512, 32
    rate_path = tmp_path / "jw01234001001_03101_00001_nrs1_rate.fits"
    model.save(rate_path)
    mask = np.ones(shape, np.uint8)
    mask[10:20, 100:300] = 0
    mask_path = tmp_path / "mask.fits"
    fits.PrimaryHDU(mask).writeto(mask_path)
    out = tmp_path / "out_rate.fits"
    ex.clean_exposure(rate_path, out, mask_path=mask_path)
    with datamodels.open(out) as dm:
        assert type(dm).__name__ == "ImageModel"
        assert np.isnan(dm.data[3, 7])
        assert dm.meta.subarray.name == "SUB512"
    assert fits.getheader(out)["NSCMSRC"] == "user"


def test_checksums_stay_valid_when_the_input_has_them(small, tmp_path):
    rate_path, cal_path = small
    with fits.open(rate_path) as hdul:
        hdul.writeto(rate_path, overwrite=True, checksum=True)
    out = tmp_path / "cleaned_rate.fits"
    ex.clean_exposure(rate_path, out, cal_path=cal_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy warns on a checksum mismatch
        with fits.open(out, checksum=True) as hdul:
            for hdu in hdul:
                hdu.data  # noqa: B018 (reading the data verifies DATASUM)
            assert "CHECKSUM" in hdul["SCI"].header and hdul[0].header["S_NSCLEN"] == "COMPLETE"
            assert not np.array_equal(hdul["SCI"].data, fits.getdata(rate_path, "SCI"))


def test_existing_output_is_replaced_only_on_purpose(small, tmp_path):
    rate_path, cal_path = small
    out = tmp_path / "out.fits"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        ex.clean_exposure(rate_path, out, cal_path=cal_path)
    assert out.read_bytes() == b"keep me"
    ex.clean_exposure(rate_path, out, cal_path=cal_path, overwrite=True)
    assert fits.getheader(out)["S_NSCLEN"] == "COMPLETE"
    assert not [name for name in files_in(tmp_path) if name.endswith(".tmp")]


def test_output_may_not_be_the_input(small):
    rate_path, cal_path = small
    before = sha256(rate_path)
    with pytest.raises(NSCleanInputError, match="overwrite the input"):
        ex.clean_exposure(rate_path, rate_path, cal_path=cal_path, overwrite=True)
    assert sha256(rate_path) == before


# -- bad input -----------------------------------------------------------------------------


def _truncated(rate, cal, tmp):
    data = rate.read_bytes()
    rate.write_bytes(data[: len(data) - 5000])
    return rate


def _corrupt(rate, cal, tmp):
    rate.write_bytes(b"SIMPLE  = this is not really FITS" + bytes(range(256)) * 20)
    return rate


def _drop(name):
    def edit(rate, cal, tmp):
        with fits.open(rate) as hdul:
            kept = fits.HDUList([hdu.copy() for hdu in hdul if hdu.name != name])
        kept.writeto(rate, overwrite=True)
        return rate

    return edit


def _set_header(**cards):
    def edit(rate, cal, tmp):
        with fits.open(rate, mode="update") as hdul:
            for key, value in cards.items():
                hdul[0].header[key] = value
        return rate

    return edit


def _all_nan(rate, cal, tmp):
    with fits.open(rate, mode="update") as hdul:
        hdul["SCI"].data[...] = np.nan
    return rate


def _mismatched_cal(rate, cal, tmp):
    with fits.open(cal, mode="update") as hdul:
        hdul[0].header["DETECTOR"] = "NRS2"
        hdul[0].header["EXPOSURE"] = "2"
    return cal


BAD_INPUTS = {
    "truncated": (_truncated, "truncated"),
    "corrupt": (_corrupt, "not a readable FITS file"),
    "missing SCI": (_drop("SCI"), "no SCI extension"),
    "missing DQ": (_drop("DQ"), "no DQ extension"),
    "not NIRSpec": (_set_header(INSTRUME="NIRCAM"), "not a NIRSpec exposure"),
    "all NaN": (_all_nan, "no finite pixel"),
    "unknown subarray": (_set_header(SUBARRAY="SUB999"), "unknown NIRSpec subarray"),
    "wrong subarray size": (_set_header(SUBSIZE1=1024), "SUBSIZE"),
    "cal and rate differ": (_mismatched_cal, "DETECTOR: rate NRS1, cal NRS2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_no_output(small, tmp_path, case):
    rate_path, cal_path = small
    edit, expected = BAD_INPUTS[case]
    bad_file = edit(rate_path, cal_path, tmp_path)
    out_dir = tmp_path / "out"
    with pytest.raises(NSCleanInputError) as info:
        ex.clean_exposure(rate_path, out_dir / "cleaned.fits", cal_path=cal_path, save_mask=True)
    message = str(info.value)
    assert message.startswith(str(bad_file)), message
    assert expected in message and "\n" not in message
    assert not out_dir.exists() or files_in(out_dir) == []


def test_bots_calints_with_one_plane_per_integration(exposures, tmp_path):
    sim, rate_path, cal_path = exposures["bots_nrs2_sub2048"]
    # the simulator writes a one-plane calints for a BOTS rate (MAST serves no _cal)
    assert cal_path.name.endswith("_calints.fits")
    calints = tmp_path / f"{sim.stem}_calints.fits"
    with fits.open(cal_path) as hdul:
        assert hdul["SCI"].data.shape[0] == 1
        cube = np.stack([hdul["SCI"].data[0]] * 3)
        cube[1, :, :5] = np.nan  # an integration that lost some pixels
        hdul["SCI"].data = cube
        hdul.writeto(calints)
    cal = ex.read_cal(calints)
    footprint = cal.footprint(sim.rate.shape)
    np.testing.assert_array_equal(footprint, ex.read_cal(cal_path).footprint(sim.rate.shape))


def test_cal_without_slit_placement_is_refused(small):
    rate_path, cal_path = small
    with fits.open(cal_path, mode="update") as hdul:
        del hdul["SCI", 1].header["SLTSTRT2"]
    with pytest.raises(NSCleanInputError, match="lacks SLTSTRT2"):
        ex.read_cal(cal_path)


def test_swapped_rate_and_cal_are_recognised(small):
    rate_path, cal_path = small
    with pytest.raises(NSCleanInputError, match="swapped"):
        ex.read_rate(cal_path)
    with pytest.raises(NSCleanInputError, match="swapped"):
        ex.read_cal(rate_path)


def test_missing_file(tmp_path):
    with pytest.raises(NSCleanInputError, match="file not found"):
        ex.read_rate(tmp_path / "nothing_rate.fits")
    assert os.listdir(tmp_path) == []
