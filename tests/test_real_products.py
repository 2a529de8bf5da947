"""Flags and products as the real pipeline writes them: MSA_FAILED_OPEN in the cal DQ
(never in the rate), the jwst status keyword S_CLNFNS, and masks that stdatamodels opens
with their data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nsclean.algorithm import nirspec as dqflags
from nsclean.io import exposure as ex
from nsclean.testing import simulate

datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")


@pytest.fixture(scope="module")
def ifu(tmp_path_factory):
    sim = simulate.simulate_exposure("ifu", "NRS1", seed=21)
    rate, cal = simulate.write_exposure(sim, tmp_path_factory.mktemp("ifu"))
    return sim, rate, cal


@pytest.fixture(scope="module")
def mos(tmp_path_factory):
    sim = simulate.simulate_exposure("mos", "NRS2", seed=22)
    rate, cal = simulate.write_exposure(sim, tmp_path_factory.mktemp("mos"))
    return sim, rate, cal


def test_failed_open_flags_are_in_the_cal_not_the_rate(ifu):
    sim, rate, cal = ifu
    truth = (sim.dq & dqflags.MSA_FAILED_OPEN) != 0
    assert truth.sum() > 1000
    assert not (fits.getdata(rate, "DQ") & dqflags.MSA_FAILED_OPEN).any()
    cal_flags = (fits.getdata(cal, "DQ") & dqflags.MSA_FAILED_OPEN) != 0
    assert np.array_equal(cal_flags, truth)


def test_ifu_mask_removes_failed_open_light_read_from_the_cal(ifu):
    sim, rate_path, cal_path = ifu
    rate, cal = ex.read_rate(rate_path), ex.read_cal(cal_path)
    flagged = (sim.dq & dqflags.MSA_FAILED_OPEN) != 0
    mask, info = ex.build_exposure_mask(rate, cal)
    assert not mask[flagged].any()
    kept, _ = ex.build_exposure_mask(rate, cal, mask_failed_open=False)
    assert kept[flagged].sum() > 100  # the flag, not something else, removed them
    step = next(s for s in info["steps"] if s["step"] == "failed_open_from_cal")
    assert step["n_flagged"] == int(flagged.sum())


def test_mos_flags_are_read_per_slit_and_placed_by_sltstrt(mos, tmp_path):
    sim, rate_path, cal_path = mos
    assert ex.read_cal(cal_path).failed_open == []  # no stuck-open light crosses a slit
    # Flag one pixel in the DQ cutout of two slits (SCI/DQ pairs told apart by EXTVER).
    flagged_cal = Path(shutil.copy(cal_path, tmp_path / cal_path.name))
    expected = []
    with fits.open(flagged_cal, mode="update") as hdul:
        for ver, (row, column) in ((2, (1, 7)), (5, (3, 0))):
            sci = hdul["SCI", ver]
            hdul["DQ", ver].data[row, column] |= dqflags.MSA_FAILED_OPEN
            expected.append((sci.header["SLTSTRT2"] - 1 + row,
                             sci.header["SLTSTRT1"] - 1 + column))
    cal = ex.read_cal(flagged_cal)
    flagged = cal.failed_open_pixels(sim.rate.shape)
    assert sorted(zip(*np.nonzero(flagged), strict=True)) == sorted(expected)
    mask, info = ex.build_exposure_mask(ex.read_rate(rate_path), cal)
    assert not mask[flagged].any()
    assert {"step": "failed_open_from_cal", "applied": True, "n_flagged": 2} in info["steps"]


def test_rate_flags_are_still_honoured(mos, tmp_path):
    """A rate whose DQ does carry the flag (an older or custom pipeline) is respected."""
    sim, rate_path, cal_path = mos
    copy = Path(shutil.copy(rate_path, tmp_path / rate_path.name))
    rate = ex.read_rate(copy)
    before, _ = ex.build_exposure_mask(rate, ex.read_cal(cal_path))
    y, x = np.argwhere(before)[len(np.argwhere(before)) // 2]
    rate.dq[y, x] |= dqflags.MSA_FAILED_OPEN
    after, _ = ex.build_exposure_mask(rate, ex.read_cal(cal_path))
    assert before[y, x] and not after[y, x]


def test_cleaned_file_has_the_jwst_status_keyword(mos, tmp_path):
    sim, rate_path, cal_path = mos
    out = tmp_path / "cleaned_rate.fits"
    summary = ex.clean_exposure(rate_path, out, cal_path=cal_path, save_model=True)
    header = fits.getheader(out)
    assert header["S_CLNFNS"] == "COMPLETE" and header["S_NSCLEN"] == "COMPLETE"
    model = next(p for p in summary["outputs"] if p.endswith("_flicker_noise.fits"))
    assert "S_CLNFNS" not in fits.getheader(model)
    with datamodels.open(out) as model:
        assert model.meta.cal_step.clean_flicker_noise == "COMPLETE"


def test_mask_file_opens_in_stdatamodels_with_its_data(mos, tmp_path):
    sim, rate_path, cal_path = mos
    path = tmp_path / "mask.fits"
    ex.make_mask(cal_path, rate_path, path)
    mask, header = ex.read_mask(path, ex.read_rate(rate_path))
    assert header["NSCMSRC"] == "auto" and "NSCMDIL" in header  # how it was built
    with datamodels.open(path) as model:
        assert type(model).__name__ == "ImageModel"
        assert model.data.shape == sim.rate.shape
        assert np.array_equal(model.data != 0, mask)
        assert model.meta.instrument.detector == "NRS2"
