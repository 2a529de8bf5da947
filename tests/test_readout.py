"""Tests of the readout-aware conditional-mean model against known truth."""

import math

import numpy as np
import pytest
from astropy.io import fits

import nsclean
from nsclean.algorithm import masks, readout
from nsclean.testing import simulate

FULL = 2048


def readout_noise(rng, common, per_output, alternating=0.0, detector="NRS1"):
    """Correlated noise drawn from the model itself: DCT modes of known prior variance.

    ``common`` and ``per_output`` are the prior variances of the leading DCT modes of
    the common and per-output parts; ``alternating`` that of the alternating-column
    mode.  Returned in DMS orientation (the reference border is zero).
    """
    common, per_output = np.asarray(common), np.asarray(per_output)
    layout = readout._LineLayout((FULL, FULL), detector)
    length = readout.OUTPUT_TICKS
    basis_c = readout._dct_basis(length, common.size)
    basis_u = readout._dct_basis(length, per_output.size)
    a = rng.normal(size=(FULL, common.size)) * np.sqrt(common)
    b = rng.normal(size=(FULL, 4, per_output.size)) * np.sqrt(per_output)
    segments = (a @ basis_c.T)[:, None, :] + b @ basis_u.T  # (line, output, tick)
    if alternating:
        psi = (-1.0) ** np.arange(length) / math.sqrt(length)
        segments += rng.normal(size=(FULL, 4, 1)) * math.sqrt(alternating) * psi
    return layout.to_dms(segments.transpose(1, 2, 0), np.float64)


def usable_region():
    region = np.ones((FULL, FULL), bool)
    region[:4] = region[-4:] = False
    region[:, :4] = region[:, -4:] = False
    return region


@pytest.fixture(scope="module")
def model_drawn():
    """A frame whose noise follows the model: prior spectra known exactly.

    Per-pixel correlated variance ~0.13 of the white noise, as in IRS2 rate files.
    """
    rng = np.random.default_rng(5)
    common = [40.0, 10.0, 3.0, 1.0]
    per_output = [10.0, 2.0]
    correlated = readout_noise(rng, common, per_output, alternating=0.5)
    white = rng.normal(size=(FULL, FULL))
    return correlated, white, common, per_output


def test_prior_spectra_are_measured_from_the_exposure(model_drawn):
    correlated, white, common, per_output = model_drawn
    mask = usable_region() & (np.random.default_rng(1).random((FULL, FULL)) < 0.3)
    layout = readout._LineLayout((FULL, FULL), "NRS1")
    data, seg_mask = layout.segments(correlated + white, mask, 0.0)
    prior = readout._empirical_prior(data, seg_mask, {"max_modes": 32})
    # Prior variances are per orthonormal DCT coefficient over 512 ticks.  The strong
    # modes are measured; weak ones (near the noise of their estimate) may not be.
    assert prior.white == pytest.approx(1.0, rel=0.05)
    assert prior.common[:2] == pytest.approx(common[:2], rel=0.3)
    assert prior.output[0] == pytest.approx(per_output[0], rel=0.3)
    # Modes with no power are not fitted (the last per-output entry is the
    # alternating-column mode).
    assert prior.n_common <= len(common) and prior.n_output - 1 <= len(per_output)


def test_a_pattern_common_to_all_lines_is_the_prior_mean_not_its_variance():
    # A picture-frame-like fixed shape: per-output mode 1 of every line has mean +-4
    # (alternating over the outputs; its variance about that mean is 2), and the
    # common mode 2 has mean -3.
    rng = np.random.default_rng(7)
    common, per_output = [40.0, 10.0, 3.0], [10.0, 2.0]
    correlated = readout_noise(rng, common, per_output)
    layout = readout._LineLayout((FULL, FULL), "NRS1")
    length = readout.OUTPUT_TICKS
    basis = readout._dct_basis(length, 3)
    signs = np.array([1.0, -1.0, 1.0, -1.0])[:, None]
    shape = (4.0 * signs * basis[:, 1] - 3.0 * basis[:, 2])[:, :, None]  # (output, tick, line)
    fixed = layout.to_dms(np.broadcast_to(shape, (4, length, FULL)).copy(), np.float64)
    white = rng.normal(size=(FULL, FULL))
    mask = usable_region() & (np.random.default_rng(2).random((FULL, FULL)) < 0.3)
    data, seg_mask = layout.segments(correlated + fixed + white, mask, 0.0)
    prior = readout._empirical_prior(data, seg_mask, {"max_modes": 32})
    assert prior.pattern[2] == pytest.approx(-3.0, abs=0.5)
    ku = prior.n_output
    per_output_means = prior.pattern[prior.n_common:].reshape(4, ku)[:, 1]
    assert per_output_means == pytest.approx(4.0 * signs[:, 0], abs=0.6)
    # Variances about the mean: a mean of 4 would add 16 to a variance of 2.
    assert prior.output[1] == pytest.approx(per_output[1], rel=0.5)
    assert prior.common[2] == pytest.approx(common[2], rel=0.5)
    # The posterior variance stays honest with the fixed pattern in the data.
    result = nsclean.fit(correlated + fixed + white, mask, "NRS1", method="readout")
    residual = correlated + fixed - result.model
    for where in (usable_region() & mask, usable_region() & ~mask):
        ratio = result.variance[where].mean() / np.mean(residual[where] ** 2)
        assert 0.8 < ratio < 1.25


def test_long_gap_on_one_output_is_predicted_from_the_other_outputs(model_drawn):
    correlated, white, _, _ = model_drawn
    image = correlated + white
    mask = usable_region()
    # A 450-row source on output 1 of every line (DMS rows 560-1010).
    mask[560:1010] = False
    result = nsclean.fit(image, mask, "NRS1", method="readout")
    gap = usable_region() & ~mask
    residual = correlated - result.model
    before = np.mean(correlated[gap] ** 2)
    after = np.mean(residual[gap] ** 2)
    # The common part is seen by the three other outputs at the same ticks.
    assert after < 0.3 * before
    # The paper's per-line Fourier fit has a 450-px hole there.
    fft = correlated - nsclean.fit(image, mask, "NRS1", method="fft").model
    assert after < np.mean(fft[gap] ** 2)


def test_posterior_variance_matches_the_measured_residual(model_drawn):
    correlated, white, _, _ = model_drawn
    rng = np.random.default_rng(3)
    mask = usable_region() & (rng.random((FULL, FULL)) < 0.2)
    mask[1200:1700] = False
    result = nsclean.fit(correlated + white, mask, "NRS1", method="readout")
    residual = correlated - result.model
    for where in (usable_region() & mask, usable_region() & ~mask):
        ratio = result.variance[where].mean() / np.mean(residual[where] ** 2)
        assert 0.8 < ratio < 1.25


def test_readout_never_worse_than_no_cleaning_with_an_extended_source():
    sim = simulate.simulate_exposure("mos", "NRS1", seed=3)
    mask, _ = masks.build_background_mask(
        sim.rate, sim.dq, sim.footprint, exp_type=sim.meta["exp_type"], full_frame=True
    )
    mask[790:1250] = False  # a 460-row extended source in every column
    usable = usable_region() & np.isfinite(sim.rate) & (sim.artifacts == 0)
    residual = sim.noise_correlated - nsclean.fit_background(sim.rate, mask, "NRS1")
    fft = sim.noise_correlated - nsclean.fit_background(sim.rate, mask, "NRS1", method="fft")
    for where in (usable & ~mask, usable & mask):
        before = np.mean(sim.noise_correlated[where].astype(float) ** 2)
        after = np.mean(residual[where].astype(float) ** 2)
        assert after < 0.3 * before
        assert after < np.mean(fft[where].astype(float) ** 2)


@pytest.fixture(scope="module")
def dark_nrs2():
    return simulate.simulate_exposure("dark", "NRS2", seed=4)


@pytest.mark.parametrize("kind", ["rows 0-40", "10 columns", "1 % of pixels"])
def test_hostile_masks_never_make_the_rest_worse(dark_nrs2, kind):
    """Background in a 40-row band only, in 10 columns only, or on 1 % of the pixels:
    where there is none, the model may predict little, but never add noise."""
    sim = dark_nrs2
    usable = usable_region()
    if kind == "rows 0-40":
        mask = usable & (np.arange(FULL)[:, None] < 40)
    elif kind == "10 columns":
        mask = usable & (np.arange(FULL)[None, :] % 200 == 0)
    else:
        mask = usable & (np.random.default_rng(0).random((FULL, FULL)) < 0.01)
    result = nsclean.fit(sim.rate, mask, "NRS2", method="readout")
    rest = usable & ~mask
    before = np.mean(sim.noise_correlated[rest].astype(float) ** 2)
    after = np.mean((sim.noise_correlated - result.model)[rest].astype(float) ** 2)
    assert np.isfinite(result.model[usable]).all() and np.isfinite(result.variance).all()
    assert after < 1.02 * before


def test_default_is_readout_on_full_frames_and_short_subarrays_fft_on_tall_ones():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(FULL, FULL)).astype(np.float32)
    sub = rng.normal(size=(32, 2048)).astype(np.float32)
    tall = rng.normal(size=(256, 2048)).astype(np.float32)
    assert nsclean.fit(full, np.ones(full.shape, bool), variance=False).info["method"] == "readout"
    result = nsclean.fit(sub, np.ones(sub.shape, bool))
    assert result.info["method"] == "readout" and result.info["mode"] == "timeseries"
    assert nsclean.fit(tall, np.ones(tall.shape, bool)).info["method"] == "fft"
    assert nsclean.fit(sub, np.ones(sub.shape, bool), method="fft").info["method"] == "fft"


def test_nan_reference_pixels_and_input_are_respected(model_drawn):
    correlated, white, _, _ = model_drawn
    image = (correlated + white).astype(np.float32)
    image[100:110, 300:310] = np.nan
    original = image.copy()
    mask = usable_region() & (np.random.default_rng(2).random(image.shape) < 0.5)
    cleaned = nsclean.clean(image, mask, "NRS2", method="readout")
    np.testing.assert_array_equal(image, original)
    assert cleaned.dtype == np.float32
    assert np.isnan(cleaned[100:110, 300:310]).all()
    border = ~usable_region()
    np.testing.assert_array_equal(cleaned[border], image[border])
    # NRS2 reads the frame rotated by 180 degrees: the same model up to the sampling of
    # the prior (other lines are sampled); an orientation error would be of order one.
    nrs1 = nsclean.fit_background(image[::-1, ::-1], mask[::-1, ::-1], "NRS1", method="readout")
    nrs2 = nsclean.fit_background(image, mask, "NRS2", method="readout")
    difference = np.std(nrs2 - nrs1[::-1, ::-1])
    assert difference < 0.05 * np.std(nrs2)
    assert np.std(nrs2 - nrs1) > 0.5 * np.std(nrs2)


def test_outliers_in_the_background_do_not_pull_the_model(model_drawn):
    correlated, white, _, _ = model_drawn
    image = correlated + white
    mask = usable_region()
    clean_model = nsclean.fit_background(image, mask, "NRS1", method="readout")
    hit = image.copy()
    rng = np.random.default_rng(9)
    rows, cols = rng.integers(4, FULL - 4, 3000), rng.integers(4, FULL - 4, 3000)
    hit[rows, cols] += 8.0  # 8-sigma cosmic-ray residuals
    result = nsclean.fit(hit, mask, "NRS1", method="readout", variance=False)
    assert result.info["n_rejected"] >= 2900
    assert np.abs(result.model - clean_model).max() < 0.2


# Shapes: the default (even length), an odd length (the mirrored half of the ticks has
# a middle tick), only the alternating mode per output, as many per-output DCT modes as
# common ones, and one output (no per-output modes, as a subarray's chunks).
@pytest.mark.parametrize("length, jc, ku, n_out", [
    (64, 6, 3, 4), (63, 5, 3, 4), (64, 5, 1, 4), (64, 4, 5, 4), (65, 7, 0, 1),
])
def test_solver_equals_the_dense_posterior(length, jc, ku, n_out):
    rng = np.random.default_rng(0)
    mask = rng.random((n_out, length, 3)) > 0.4  # (output, tick, segment)
    data = (rng.normal(size=(n_out, length, 3)) * mask).astype(np.float32)
    prior = readout._Prior(np.linspace(2, 0.5, jc), np.linspace(1, 0.3, ku), 1.3, 0.01)
    solver = readout._Solver(data.copy(), mask.copy(), prior)
    dct = readout._dct_basis(length, jc)
    per_output = np.concatenate(
        [dct[:, : ku - 1], ((-1.0) ** np.arange(length) / math.sqrt(length))[:, None]], axis=1
    ) if ku else np.zeros((length, 0))
    design = np.zeros((n_out * length, jc + n_out * ku))
    for o in range(n_out):
        design[o * length : (o + 1) * length, :jc] = dct
        design[o * length : (o + 1) * length, jc + o * ku : jc + (o + 1) * ku] = per_output
    coef = solver.solve()
    pixel_variance = solver.pixel_variance()
    for seg in range(3):
        used = mask[..., seg].ravel()
        lam = np.concatenate([prior.common, np.tile(prior.output, n_out)])
        precision = design[used].T @ design[used] / 1.3 + np.diag(1 / lam)
        covariance = np.linalg.inv(precision)
        mean = covariance @ design[used].T @ data[..., seg].ravel()[used] / 1.3
        np.testing.assert_allclose(coef[seg], mean, atol=1e-5)
        np.testing.assert_allclose(solver.coefficient_variances()[seg], np.diag(covariance),
                                   rtol=1e-5)
        # (plus the power of the modes left out of the model: prior.excluded)
        pixel = np.einsum("ij,jk,ik->i", design, covariance, design) + 0.01
        np.testing.assert_allclose(pixel_variance[..., seg].ravel(), pixel, rtol=1e-6)


def test_pixel_variance_lands_on_the_dms_pixels_of_its_ticks():
    # The variance image is written straight into the DMS layout (odd outputs read in
    # reverse): it must be the solver's (output, tick, line) variance put through the
    # same mapping as the data, which differs from tick to tick and line to line.
    rng = np.random.default_rng(3)
    layout = readout._LineLayout((FULL, FULL), "NRS2")
    valid = usable_region() & (rng.random((FULL, FULL)) < 0.2)
    valid[:, 100:140] = False  # lines without background
    data, mask = layout.segments(rng.normal(size=(FULL, FULL)).astype(np.float32), valid, 0.0)
    prior = readout._Prior(np.array([3.0, 1.0, 0.5]), np.array([1.0, 0.4, 0.2]), 1.0, 0.0)
    solver = readout._Solver(data, mask, prior)
    solver.solve()
    expected = layout.to_dms(solver.pixel_variance(), np.float32)
    np.testing.assert_array_equal(layout.variance(solver), expected)
    assert np.ptp(expected[4:-4, 4:-4]) > 0


def test_small_inverses_fall_back_to_lu_where_elimination_fails():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 5, 5))
    stack = a @ np.swapaxes(a, 1, 2) + 5 * np.eye(5)
    # Nonsingular but not positive definite, with a singular leading 2 x 2 block:
    # block elimination divides by zero there.
    stack[2] = np.eye(5)
    stack[2, :3, :3] = [[1, 1, 1], [1, 1, 0], [1, 0, 1]]
    np.testing.assert_allclose(readout._inverse_spd(stack), np.linalg.inv(stack),
                               rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def written_exposure(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readout")
    sim = simulate.simulate_exposure("ifu", "NRS2", seed=4)
    return simulate.write_exposure(sim, directory)


@pytest.mark.parametrize("add_variance", [True, False])
def test_cleaned_file_carries_the_model_variance(written_exposure, tmp_path, add_variance):
    from nsclean.io.exposure import clean_exposure

    rate_path, cal_path = written_exposure
    out = tmp_path / "cleaned_rate.fits"
    clean_exposure(rate_path, out, cal_path=cal_path, add_variance=add_variance)
    with fits.open(rate_path) as before, fits.open(out) as after:
        assert after[0].header["NSCVAR"] is add_variance
        assert after[0].header["NSCFMETH"] == "readout"
        added = after["VAR_RNOISE"].data.astype(float) - before["VAR_RNOISE"].data
        err2 = after["ERR"].data.astype(float) ** 2 - before["ERR"].data.astype(float) ** 2
        finite = np.isfinite(added) & np.isfinite(err2)
        if add_variance:
            assert (added[finite] >= 0).all() and added[finite].mean() > 0
            # ERR is float32: its square carries ~1e-7 relative rounding.
            err_in2 = before["ERR"].data.astype(float)[finite] ** 2
            assert np.all(np.abs(err2[finite] - added[finite])
                          <= 1e-3 * added[finite] + 5e-7 * err_in2)
        else:
            assert np.all(added[finite] == 0)
        # Every other HDU is unchanged.
        for hdu in before:
            if hdu.name not in ("PRIMARY", "SCI", "VAR_RNOISE", "ERR"):
                assert after[hdu.name].header == hdu.header
    stdatamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    with stdatamodels.open(out) as model:
        assert model.meta.exposure.type == "NRS_IFU"


def test_qa_reports_what_the_readout_model_did():
    from nsclean.algorithm import qa

    rng = np.random.default_rng(0)
    image = rng.normal(size=(FULL, FULL)).astype(np.float32)
    mask = usable_region()
    mask[:, 100:400] = False  # 300 lines without any background pixel
    result = nsclean.fit(image, mask, "NRS1", variance=False)
    metrics = qa.exposure_metrics(image, image - result.model, result.model, mask,
                                  fit_info=result.info)
    guard = metrics["guard"]
    assert guard["n_predicted"] == 300 and guard["common_modes"] >= 1
    assert guard["n_guarded"] == 0
    assert any("prediction from the neighbouring lines (300 of 2048)" in f
               for f in metrics["flags"])


def test_the_cli_switch_leaves_var_rnoise_and_err_alone(written_exposure, tmp_path):
    from nsclean import cli

    rate_path, cal_path = written_exposure
    out = tmp_path / "cleaned_rate.fits"
    assert cli.main(["clean", str(rate_path), "--cal", str(cal_path), "-o", str(out),
                     "--no-variance"]) == 0
    with fits.open(rate_path) as before, fits.open(out) as after:
        assert after[0].header["NSCVAR"] is False and after[0].header["NSCFVAR"] is False
        for name in ("VAR_RNOISE", "ERR"):
            np.testing.assert_array_equal(after[name].data, before[name].data)


@pytest.mark.parametrize("shape", [(FULL, FULL), (32, 2048), (64, 64)])
def test_a_constant_image_gives_its_level_and_no_nan(shape):
    image = np.full(shape, 5.0, dtype=np.float32)
    result = nsclean.fit(image, np.ones(shape, bool), method="readout")
    assert np.isfinite(result.model).all() and np.isfinite(result.variance).all()
    inner = result.model[4:-4, 4:-4] if shape == (FULL, FULL) else result.model
    assert np.all(inner == 5.0)
    assert np.all(nsclean.clean(image, np.ones(shape, bool))[4:-4, 4:-4] == 0.0)


@pytest.mark.parametrize("shape", [(FULL, FULL), (32, 2048)])
def test_a_nearly_blank_image_gives_a_finite_model(shape):
    # One hot pixel in zeros: the sampled lines are constant, the white level is zero.
    image = np.zeros(shape, dtype=np.float32)
    image[10, 30] = 1.0
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        result = nsclean.fit(image, np.ones(shape, bool), method="readout")
    assert np.isfinite(result.model).all() and np.isfinite(result.variance).all()
    assert np.abs(result.model).max() < 1e-3
