"""Tests of nsclean.testing.simulate: truth decomposition, orientation, spectra and file layout."""

import dataclasses
import re

import numpy as np
import pytest
from astropy.io import fits

from nsclean.algorithm import nirspec as dqflags
from nsclean.algorithm.nirspec import FIXED_SLIT_ROWS
from nsclean.testing import simulate
from nsclean.testing.simulate import (
    DEFAULT_AMPLITUDES,
    SUBARRAYS,
    SimulatedExposure,
    make_demo_program,
    simulate_exposure,
    write_exposure,
)

QUIET = {"pink_correlated": 0.0, "pink_uncorrelated": 0.0, "alternating_column": 0.0,
         "picture_frame": 0.0}


@pytest.fixture(scope="module")
def ifu():
    return simulate_exposure("ifu", "NRS1", seed=11)


@pytest.fixture(scope="module")
def mos():
    return simulate_exposure("mos", "NRS2", seed=12, observation=7, exposure=3)


@pytest.fixture(scope="module")
def fs():
    return simulate_exposure("fs", "NRS1", seed=13, readout="NRS", observation=3)


@pytest.fixture(scope="module")
def bots():
    return simulate_exposure("bots", "NRS1", seed=14, observation=4)


@pytest.fixture(scope="module")
def written(tmp_path_factory, ifu, mos, fs, bots):
    directory = tmp_path_factory.mktemp("sim")
    # stdatamodels reads a cal file without ASDF extension slowly (~0.15 s per slit), so
    # it gets a MOS exposure cut down to its first 6 slits; astropy checks all of them
    few_slits = dataclasses.replace(mos, slits=mos.slits[:6],
                                    meta={**mos.meta, "stem": mos.stem.replace("_000", "_009")})
    sims = {"ifu": ifu, "mos": mos, "fs": fs, "bots": bots, "mos_few": few_slits}
    assert len({sim.stem for sim in sims.values()}) == len(sims)
    return {name: (sim, *write_exposure(sim, directory)) for name, sim in sims.items()}


def _arrays(sim):
    return {f.name: getattr(sim, f.name) for f in dataclasses.fields(sim)
            if isinstance(getattr(sim, f.name), np.ndarray)}


# --- determinism and truth ----------------------------------------------------------------
def test_same_seed_is_bit_identical(ifu):
    again = simulate_exposure("ifu", "NRS1", seed=11)
    for name, array in _arrays(ifu).items():
        other = getattr(again, name)
        assert array.dtype == other.dtype, name
        assert np.array_equal(array, other, equal_nan=array.dtype.kind == "f"), name
    assert again.slits[3]["xstart"] == ifu.slits[3]["xstart"]


def test_seed_and_detector_change_the_realisation(bots):
    other_seed = simulate_exposure("bots", "NRS1", seed=15, observation=4)
    other_detector = simulate_exposure("bots", "NRS2", seed=14)
    assert not np.allclose(bots.noise_total, other_seed.noise_total)
    assert not np.allclose(bots.noise_total, other_detector.noise_total)


def test_changing_one_amplitude_keeps_scene_and_other_components(bots):
    louder = simulate_exposure("bots", "NRS1", seed=14, observation=4,
                               white=2 * DEFAULT_AMPLITUDES["white"])
    assert np.array_equal(louder.signal, bots.signal)
    assert np.array_equal(louder.noise_correlated, bots.noise_correlated)
    assert not np.array_equal(louder.noise_white, bots.noise_white)


@pytest.mark.parametrize("name", ["ifu", "mos", "fs", "bots"])
def test_truth_sums_to_rate(name, request):
    sim = request.getfixturevalue(name)
    assert np.array_equal(sim.noise_total, sim.noise_white + sim.noise_correlated)
    expected = sim.signal + sim.artifacts + sim.noise_total
    usable = (sim.dq & dqflags.DO_NOT_USE) == 0
    assert np.array_equal(sim.rate[usable], expected[usable])
    assert np.isnan(sim.rate[~usable]).all()
    assert np.isfinite(sim.rate[usable]).all()


# --- shapes, dtypes, flags ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ifu", "mos", "fs", "bots"])
def test_dtypes_and_shapes(name, request):
    sim = request.getfixturevalue(name)
    assert isinstance(sim, SimulatedExposure)
    shape = (sim.meta["subsize2"], sim.meta["subsize1"])
    for array_name, array in _arrays(sim).items():
        assert array.shape == shape, array_name
    for array_name in ("rate", "signal", "noise_total", "noise_white", "noise_correlated",
                       "err", "var_poisson", "var_rnoise", "artifacts"):
        assert getattr(sim, array_name).dtype == np.float32, array_name
    assert sim.dq.dtype == np.uint32
    assert sim.footprint.dtype == bool
    assert sim.footprint.any()


@pytest.mark.parametrize("subarray", sorted(set(SUBARRAYS) - {"FULL"}))
def test_subarrays_noise_only(subarray):
    sim = simulate_exposure("dark", "NRS2", subarray=subarray, seed=1)
    xstart, ystart, xsize, ysize = SUBARRAYS[subarray]
    assert sim.rate.shape == (ysize, xsize)
    assert sim.meta["readpatt"] == "NRSRAPID"
    assert not sim.footprint.any()
    assert np.nanstd(sim.noise_correlated) > 0
    # the full-frame reference columns appear only where the subarray reaches them
    ref_cols = np.arange(xstart - 1, xstart - 1 + xsize)
    ref_cols = (ref_cols < 4) | (ref_cols >= 2044)
    flagged = (sim.dq & dqflags.REFERENCE_PIXEL) != 0
    assert np.array_equal(flagged.all(axis=0), ref_cols)


def test_reference_border_and_flags(ifu):
    border = np.zeros(ifu.dq.shape, bool)
    border[:4] = border[-4:] = True
    border[:, :4] = border[:, -4:] = True
    reference = (ifu.dq & dqflags.REFERENCE_PIXEL) != 0
    assert np.array_equal(reference, border)
    assert ((ifu.dq[border] & dqflags.DO_NOT_USE) != 0).all()
    assert not ifu.footprint[border].any()
    jumps = (ifu.dq & dqflags.JUMP_DET) != 0
    assert 500 < jumps.sum() < 20000
    assert ifu.artifacts[jumps].mean() > 0
    interior_bad = ((ifu.dq & dqflags.DO_NOT_USE) != 0) & ~border
    assert 10 < interior_bad.sum() < 1000


def test_meta_and_stem(mos):
    meta = mos.meta
    assert meta["stem"] == "jw09999007001_03101_00003_nrs2"
    assert re.fullmatch(r"jw\d{11}_\d{5}_\d{5}_nrs[12]", meta["stem"])
    assert meta["exp_type"] == "NRS_MSASPEC"
    assert meta["program"] == "09999"
    assert (meta["fastaxis"], meta["slowaxis"]) == (-2, -1)
    assert meta["readpatt"] == "NRSIRS2"


def test_make_stem():
    assert simulate.make_stem("1345", 62, 1, 1, "NRS2") == "jw01345062001_03101_00001_nrs2"
    assert simulate.make_stem(9999, 4, 12, 3, "nrs1", visit_group=2, sequence=1,
                              activity=5) == "jw09999004012_02105_00003_nrs1"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        simulate_exposure("imaging")
    with pytest.raises(ValueError, match="full frame"):
        simulate_exposure("ifu", subarray="SUB2048")
    with pytest.raises(ValueError, match="noise option"):
        simulate_exposure("bots", pink=3.0)
    with pytest.raises(ValueError, match="detector"):
        simulate_exposure("bots", "NRS3")
    with pytest.raises(ValueError, match="readout"):
        simulate_exposure("bots", readout="FAST")


# --- scenes -----------------------------------------------------------------------------------
def test_ifu_has_30_slices_with_narrow_background_runs(ifu):
    assert len(ifu.slits) == 30
    column = ifu.footprint[:, 1000]
    edges = np.flatnonzero(np.diff(column.astype(int)))
    gaps = np.diff(edges)[1::2]  # background runs between consecutive slices
    assert len(gaps) == 29
    assert 5 <= np.median(gaps) <= 15
    background_fraction = 1 - column.mean()
    assert 0.1 < background_fraction < 0.35


def test_mos_slitlets(mos):
    assert 30 <= len(mos.slits) <= 60
    taken = np.zeros(mos.rate.shape, int)
    for slit in mos.slits:
        assert 5 <= slit["ysize"] <= 30
        assert 200 <= slit["xsize"] <= 1500
        ys = slice(slit["ystart"] - 1, slit["ystart"] - 1 + slit["ysize"])
        xs = slice(slit["xstart"] - 1, slit["xstart"] - 1 + slit["xsize"])
        taken[ys, xs] += 1
        assert np.array_equal(slit["footprint"], mos.footprint[ys, xs])
    assert taken.max() == 1  # boxes never overlap


def test_wings_reach_beyond_the_footprint(mos):
    from scipy.ndimage import binary_dilation

    # the second ring around the footprint still sees light: a 1-px dilation is not enough
    second_ring = (binary_dilation(mos.footprint, iterations=2)
                   & ~binary_dilation(mos.footprint, iterations=1))
    far = ~binary_dilation(mos.illuminated, iterations=8)
    assert mos.signal[second_ring].mean() > 3e-3 * mos.signal[mos.footprint].mean()
    assert np.all(mos.signal[far] == 0)
    assert np.all(mos.illuminated[mos.footprint])


@pytest.mark.parametrize("name", ["ifu", "mos"])
def test_failed_open_shutters_are_flagged_and_outside_the_slit_boxes(name, request):
    sim = request.getfixturevalue(name)
    failed_open = (sim.dq & dqflags.MSA_FAILED_OPEN) != 0
    assert failed_open.sum() > 1000
    # they shine (the flagged band is ~1.5 px wider than the 5-row trace on each side)
    assert np.median(sim.signal[failed_open]) > 1e-3
    assert sim.illuminated[failed_open].mean() > 0.95
    if name == "mos":
        assert not (failed_open & sim.footprint).any()
    # 3 px away from every footprint and every flag only faint wings are left
    from scipy.ndimage import binary_dilation

    near = binary_dilation(sim.footprint | failed_open, iterations=3)
    unflagged = ~near & ~_fixed_slit_rows(sim)
    assert np.percentile(sim.signal[unflagged], 99.99) < 2e-3


def _fixed_slit_rows(sim):
    rows = np.zeros(sim.signal.shape, bool)
    rows[FIXED_SLIT_ROWS[0] : FIXED_SLIT_ROWS[1] + 1] = True
    return rows


def test_fixed_slits_sit_in_the_fixed_slit_band(fs):
    assert {slit["name"] for slit in fs.slits} == {"S200A1", "S200A2", "S400A1", "S1600A1",
                                                   "S200B1"}
    rows = np.flatnonzero(fs.footprint.any(axis=1))
    assert rows.min() >= 922 and rows.max() <= 1115


def test_traces_cut_by_a_subarray_keep_their_inside_part():
    full = simulate_exposure("fs", "NRS1", seed=9, readout="NRS")
    sub = simulate_exposure("fs", "NRS1", seed=9, subarray="SUB2048")
    xstart, ystart, xsize, ysize = SUBARRAYS["SUB2048"]
    window = (slice(ystart - 1, ystart - 1 + ysize), slice(xstart - 1, xstart - 1 + xsize))
    assert np.array_equal(sub.footprint, full.footprint[window])
    assert np.array_equal(sub.signal, full.signal[window])
    for slit in sub.slits:
        assert all(isinstance(slit[key], int) for key in ("xstart", "ystart", "xsize", "ysize"))
        box = slit["footprint"]
        assert box.any(axis=0).all() and box.any(axis=1).all()
        assert 1 <= slit["ystart"] and slit["ystart"] + slit["ysize"] - 1 <= ysize


def test_bots_trace(bots):
    assert bots.rate.shape == (32, 2048)
    assert bots.meta["subarray"] == "SUB2048"
    profile = np.nanmedian(bots.signal[:, 200:1800], axis=1)
    assert 10 <= np.argmax(profile) <= 22
    assert profile.max() > 10 * np.nanstd(bots.noise_white)


# --- noise structure ----------------------------------------------------------------------------
def _slope(series, sample_time, f_lo, f_hi):
    power = np.abs(np.fft.rfft(series - series.mean(), axis=-1)) ** 2
    freq = np.fft.rfftfreq(series.shape[-1], sample_time)
    power = power.mean(axis=0) if power.ndim > 1 else power
    keep = (freq > f_lo) & (freq < f_hi)
    return np.polyfit(np.log(freq[keep]), np.log(power[keep]), 1)[0]


def test_pink_series_is_one_over_f():
    rng = np.random.default_rng(5)
    series = simulate._pink_series(rng, 8, 2**16, 1e-5)
    assert abs(np.std(series) - 1) < 0.25
    assert -1.15 < _slope(series, 1e-5, 10.0, 2e4) < -0.85
    white = rng.standard_normal((8, 2**16))
    assert abs(_slope(white, 1e-5, 10.0, 2e4)) < 0.1


@pytest.fixture(scope="module")
def shared_pink_irs2():
    return simulate_exposure("dark", "NRS1", seed=3, **{**QUIET, "pink_correlated": 3.0})


def test_decimated_low_passed_series_keeps_its_power():
    n_samples, low_pass = 712 * 200, 0.5 / (712 * 1e-5)
    fine = simulate._pink_series(np.random.default_rng(1), 32, n_samples, 1e-5, low_pass)
    coarse = simulate._pink_series(np.random.default_rng(2), 32, n_samples, 1e-5, low_pass,
                                   decimate=16)
    assert coarse.shape == fine.shape
    assert np.var(coarse) == pytest.approx(np.var(fine), rel=0.2)
    # smooth at the pixel scale: neighbouring ticks nearly equal
    assert np.std(np.diff(coarse, axis=1)) < 0.05 * np.std(coarse)
    picked = simulate._pink_series(np.random.default_rng(2), 32, n_samples, 1e-5, low_pass,
                                   decimate=16, at=np.array([5, 700, 1400]))
    assert np.array_equal(picked, coarse[:, [5, 700, 1400]])


def test_irs2_stripes_are_smooth_along_columns_traditional_is_not(shared_pink_irs2):
    trad = simulate_exposure("dark", "NRS1", seed=3, readout="NRS",
                             **{**QUIET, "pink_correlated": 3.0})
    for sim, smooth in ((shared_pink_irs2, True), (trad, False)):
        block = sim.noise_correlated[600:1000, 100:1900].astype(float)  # inside output 1
        column_means = block.mean(axis=0)
        along = np.std(block - column_means, axis=0).mean()
        across = column_means.std()
        assert (along < 0.3 * across) == smooth
        # columns are lines in time: neighbours along a column are 1 tick apart, neighbours
        # along a row a whole line (>500 ticks) apart; transposing the noise breaks this
        step_along = np.diff(block, axis=0).std()
        step_across = np.diff(block, axis=1).std()
        assert step_along < 0.5 * step_across
    # the same series is read backwards by odd outputs: output 1 mirrors output 0 exactly
    only_shared = shared_pink_irs2.noise_correlated
    assert np.allclose(only_shared[0:512], only_shared[1023:511:-1], atol=1e-9)
    assert np.allclose(only_shared[1024:1536], only_shared[2047:1535:-1], atol=1e-9)
    assert np.allclose(only_shared[0:512], only_shared[1024:1536], atol=1e-9)


def test_column_means_have_a_pink_spectrum(shared_pink_irs2):
    column_means = shared_pink_irs2.noise_correlated[:, 4:-4].astype(float).mean(axis=0)
    line_time = simulate.IRS2_ROW_TICKS * simulate.PIXEL_TIME
    slope = _slope(column_means[None, :], line_time, 0.5, 90.0)
    assert -1.4 < slope < -0.6


def test_picture_frame_is_strongest_at_the_edges():
    # ALLSLITS spans the full width: left and right edges plus the interior, at 1/8 the cost
    only_frame = {**QUIET, "picture_frame": DEFAULT_AMPLITUDES["picture_frame"]}
    nrs2 = simulate_exposure("dark", "NRS2", seed=6, subarray="ALLSLITS", **only_frame)
    frame = np.abs(nrs2.noise_correlated.astype(float))
    edge = np.concatenate([frame[:, 4:40].ravel(), frame[:, -40:-4].ravel()])
    interior = frame[:, 700:1350]
    assert edge.mean() > 20 * interior.mean()
    nrs1 = simulate_exposure("dark", "NRS1", seed=6, subarray="ALLSLITS", **only_frame)
    assert not np.allclose(nrs1.noise_correlated, nrs2.noise_correlated)
    other = simulate_exposure("dark", "NRS2", seed=7, subarray="ALLSLITS", **only_frame)
    assert not np.allclose(other.noise_correlated, nrs2.noise_correlated)


@pytest.mark.parametrize("detector", ["NRS1", "NRS2"])
def test_picture_frame_lands_where_the_dms_pattern_says(detector):
    # built in the detector frame, it must come out as the DMS pattern of its region
    seed, subarray = 3, "ALLSLITS"
    sim = simulate_exposure("dark", detector, seed=seed, subarray=subarray, **{
        **QUIET, "picture_frame": 1.0})
    stream = np.random.SeedSequence([seed, simulate.KINDS.index("dark"), int(detector[-1])])
    frame_rng = np.random.default_rng(stream.spawn(5)[4])
    xstart, ystart, xsize, ysize = SUBARRAYS[subarray]
    factor = DEFAULT_AMPLITUDES["picture_frame_nrs2_factor"] if detector == "NRS2" else 1.0
    rows, cols = simulate._picture_frame_factors(frame_rng, ysize, xsize, ystart - 1,
                                                 xstart - 1, factor)
    expected = rows @ cols / (simulate.GAIN[detector] * DEFAULT_AMPLITUDES["effective_time"])
    assert np.allclose(sim.noise_correlated, expected, rtol=1e-4, atol=1e-9)


def test_picture_frame_is_worse_on_nrs2():
    rng = np.random.default_rng(8)
    ratios = []
    for _ in range(20):
        rows, cols = simulate._picture_frame_factors(rng, 2048, 2048, 0, 0, 1.0)
        ratios.append(np.sqrt(np.mean((rows @ cols) ** 2)))
    assert np.allclose(ratios, 1.0, rtol=1e-3)  # the rms is the requested one
    frame_only = {**QUIET, "picture_frame": 1.0}
    plain = simulate_exposure("bots", "NRS2", seed=2, picture_frame_nrs2_factor=1.0,
                              **frame_only)
    default = simulate_exposure("bots", "NRS2", seed=2, **frame_only)
    factor = DEFAULT_AMPLITUDES["picture_frame_nrs2_factor"]
    assert factor > 1
    assert np.allclose(default.noise_correlated, factor * plain.noise_correlated, rtol=1e-4,
                       atol=1e-9)
    nrs1 = simulate_exposure("bots", "NRS1", seed=2, **frame_only)
    nrs1_factor = simulate_exposure("bots", "NRS1", seed=2, picture_frame_nrs2_factor=9.0,
                                    **frame_only)
    assert np.array_equal(nrs1.noise_correlated, nrs1_factor.noise_correlated)


def test_amplitudes_scale_the_rate_noise():
    sim = simulate_exposure("dark", "NRS1", seed=21, subarray="SUB2048")
    expected = DEFAULT_AMPLITUDES["white"] / (
        simulate.GAIN["NRS1"] * DEFAULT_AMPLITUDES["effective_time"])
    reference = (sim.dq & dqflags.REFERENCE_PIXEL) != 0
    dark = (sim.var_poisson == 0) & ~reference
    assert np.std(sim.noise_white[dark]) == pytest.approx(expected, rel=0.03)
    assert np.allclose(sim.var_rnoise[dark], expected**2, rtol=1e-5)
    ratio = np.std(sim.noise_white[reference]) / np.std(sim.noise_white[dark])
    assert ratio == pytest.approx(DEFAULT_AMPLITUDES["reference_ratio"], rel=0.15)
    # photon noise is in the white part and in VAR_POISSON
    hot = sim.artifacts > 1.0
    assert np.allclose(sim.var_poisson[hot], sim.artifacts[hot] * expected / 5.2, rtol=1e-4)


# --- files --------------------------------------------------------------------------------------
def test_rate_file_layout(written):
    sim, rate_path, _ = written["mos"]
    assert rate_path.name == f"{sim.meta['stem']}_rate.fits"
    with fits.open(rate_path) as hdul:
        names = [hdu.name for hdu in hdul]
        assert names == ["PRIMARY", "SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"]
        header = hdul[0].header
        assert header["PROGRAM"] == "09999" and isinstance(header["PROGRAM"], str)
        assert header["OBSERVTN"] == "007"
        assert header["EXPOSURE"] == "3"
        assert header["DETECTOR"] == "NRS2"
        assert header["INSTRUME"] == "NIRSPEC"
        assert header["DATAMODL"] == "ImageModel"
        assert header["FILENAME"] == rate_path.name
        assert (header["FASTAXIS"], header["SLOWAXIS"]) == (-2, -1)
        assert (header["SUBSIZE1"], header["SUBSIZE2"]) == (2048, 2048)
        assert hdul["SCI"].header["BUNIT"] == "DN/s"
        assert hdul["SCI"].data.dtype == np.dtype(">f4")
        assert hdul["DQ"].data.dtype == np.uint32
        assert np.array_equal(hdul["SCI"].data, sim.rate, equal_nan=True)
        # MSA_FAILED_OPEN is set by stage 2: in the cal DQ, never in the rate
        assert np.array_equal(hdul["DQ"].data, sim.dq & ~np.uint32(dqflags.MSA_FAILED_OPEN))
    assert not list(rate_path.parent.glob("*.tmp"))


def test_files_open_with_stdatamodels(written):
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    # rate files: one full frame and one subarray suffice
    for kind in ("ifu", "bots"):
        sim, rate_path, _ = written[kind]
        with datamodels.open(rate_path) as model:
            assert type(model).__name__ == "ImageModel"
            assert model.meta.instrument.detector == sim.meta["detector"]
            assert model.meta.exposure.type == sim.meta["exp_type"]
            assert model.meta.subarray.name == sim.meta["subarray"]
            assert model.meta.observation.program_number == "09999"
            model.validate()
    expected = {"ifu": "IFUImageModel", "mos_few": "MultiSlitModel", "fs": "MultiSlitModel",
                "bots": "SlitModel"}
    for kind, model_type in expected.items():
        sim, _, cal_path = written[kind]
        with datamodels.open(cal_path) as model:
            assert type(model).__name__ == model_type
            model.validate()
            if kind == "ifu":
                usable = sim.footprint & ((sim.dq & dqflags.DO_NOT_USE) == 0)
                assert np.array_equal(np.isfinite(model.data), usable)
            elif kind == "bots":
                assert model.name == "S1600A1"
            else:
                assert len(model.slits) == len(sim.slits)


def _check_slit(sim, rate, data, wavelength, xstart, ystart, xsize, ysize):
    ys = slice(ystart - 1, ystart - 1 + ysize)
    xs = slice(xstart - 1, xstart - 1 + xsize)
    region = rate[ys, xs]
    assert data.shape == region.shape == (ysize, xsize)
    on_trace = sim.footprint[ys, xs] & ((sim.dq[ys, xs] & dqflags.DO_NOT_USE) == 0)
    assert np.array_equal(np.isfinite(data), on_trace)
    assert np.array_equal(data[on_trace], region[on_trace])
    assert np.array_equal(np.isfinite(wavelength), sim.footprint[ys, xs])
    # every box row and column holds some trace: the box is the trace's bounding box
    assert sim.footprint[ys, xs].any(axis=0).all() and sim.footprint[ys, xs].any(axis=1).all()
    return on_trace


@pytest.mark.parametrize("kind", ["mos_few", "fs"])
def test_slit_placement_round_trips_through_stdatamodels(written, kind):
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    sim, rate_path, cal_path = written[kind]
    with fits.open(rate_path) as hdul:
        rate = hdul["SCI"].data.astype(np.float32)
    with datamodels.open(cal_path) as model:
        assert [slit.name for slit in model.slits] == [slit["name"] for slit in sim.slits]
        for slit in model.slits:
            _check_slit(sim, rate, slit.data, slit.wavelength, slit.xstart, slit.ystart,
                        slit.xsize, slit.ysize)


def test_slit_placement_round_trips_all_mos_slits(written):
    sim, rate_path, cal_path = written["mos"]
    with fits.open(rate_path) as hdul:
        rate = hdul["SCI"].data.astype(np.float32)
    off_trace_in_boxes = 0
    with fits.open(cal_path) as hdul:
        for slit in sim.slits:
            number = sim.slits.index(slit) + 1
            header = hdul["SCI", number].header
            assert header["SLTNAME"] == slit["name"]
            on_trace = _check_slit(sim, rate, hdul["SCI", number].data,
                                   hdul["WAVELENGTH", number].data, header["SLTSTRT1"],
                                   header["SLTSTRT2"], header["SLTSIZE1"], header["SLTSIZE2"])
            off_trace_in_boxes += np.count_nonzero(~on_trace)
    # tilted traces leave NaN corners inside their boxes
    assert off_trace_in_boxes > 0


def test_cal_headers_match_the_real_layout(written):
    _, _, cal_path = written["mos"]
    with fits.open(cal_path) as hdul:
        sci = [hdu for hdu in hdul if hdu.name == "SCI"]
        assert [hdu.ver for hdu in sci] == list(range(1, len(sci) + 1))
        for key in ("SLTNAME", "SLTSTRT1", "SLTSIZE1", "SLTSTRT2", "SLTSIZE2", "SOURCEID"):
            assert key in sci[0].header
        assert isinstance(sci[0].header["SLTNAME"], str)
        assert {hdu.name for hdu in hdul} >= {"SCI", "ERR", "DQ", "WAVELENGTH"}
        assert hdul[0].header["DATAMODL"] == "MultiSlitModel"


def test_demo_program(tmp_path):
    pairs = make_demo_program(tmp_path, n_exposures=1, seed=1)
    assert len(pairs) == 1
    stems = {rate.name.removesuffix("_rate.fits") for rate, _ in pairs}
    assert stems == {"jw09999001001_03101_00001_nrs1"}
    for rate, cal in pairs:
        assert rate.exists() and cal.exists()
        assert cal.name == rate.name.replace("_rate", "_cal")
    plan = simulate._DEMO_PLAN
    assert len(plan) >= 8
    assert {kind for kind, *_ in plan} == {"ifu", "mos", "fs", "bots"}
    keys = [(obs, exp, det) for _, det, obs, exp, _ in plan]
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match="n_exposures"):
        make_demo_program(tmp_path, n_exposures=0)


def test_write_is_atomic(tmp_path, bots, monkeypatch):
    rate_path, cal_path = write_exposure(bots, tmp_path)
    before = rate_path.read_bytes()

    def broken_writeto(self, fileobj, **kwargs):  # half a file, then the disk is full
        fileobj.write(b"SIMPLE  = half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", broken_writeto)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(bots, tmp_path)
    assert rate_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rate_path.name, cal_path.name])
