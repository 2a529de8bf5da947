"""Subarray cleaning by kriging along the read-out time series, against known truth.

The noise here is drawn by the test itself (not by ``nsclean.testing.simulate``): a
power-law series along the read-out time axis with an exponent other than the
simulator's, white noise, and alternating column noise, on a 32 x 2048 subarray.
"""

import math

import numpy as np
import pytest

import nsclean
from nsclean.algorithm.nirspec import LINE_OVERHEAD_TICKS
from nsclean.algorithm.orientation import detector_to_dms

N_FAST, N_LINES = 32, 2048
STRIDE = N_FAST + LINE_OVERHEAD_TICKS


def power_law_subarray(rng, alpha, amplitude, alternating=0.0, detector="NRS1"):
    """Correlated noise of a (32, 2048) DMS subarray: PSD ~ f^-alpha along read-out time.

    ``amplitude`` is the rms of the power-law part; ``alternating`` that of the
    alternating-column noise (even and odd pixels of a line get opposite offsets that
    drift from line to line).
    """
    n = N_LINES * STRIDE
    spectrum = np.fft.rfft(rng.normal(size=n))
    k = np.arange(spectrum.size, dtype=float)
    gain = np.zeros(k.size)
    gain[1:] = k[1:] ** (-alpha / 2)
    series = np.fft.irfft(spectrum * gain, n)
    series *= amplitude / series.std()
    lines = series.reshape(N_LINES, STRIDE)[:, :N_FAST].copy()
    if alternating:
        drift = np.cumsum(rng.normal(size=N_LINES))
        drift *= alternating / drift.std()
        lines += drift[:, None] * (-1.0) ** np.arange(N_FAST)
    return detector_to_dms(lines, detector)


def trace_mask(rows=(8, 24), border=2):
    """Background everywhere but a trace (rows ``rows``) and a ``border`` around it."""
    mask = np.ones((N_FAST, N_LINES), bool)
    mask[rows[0] - border : rows[1] + border] = False
    science = np.zeros_like(mask)
    science[rows[0] : rows[1]] = True
    return mask, science


@pytest.fixture(scope="module")
def drawn():
    rng = np.random.default_rng(42)
    correlated = power_law_subarray(rng, alpha=1.3, amplitude=3.0, alternating=0.3)
    white = rng.normal(size=correlated.shape)
    return correlated, white


def excess(truth, model, where):
    return float(np.mean((truth - model)[where] ** 2))


def test_trace_noise_is_predicted_better_than_the_chunked_fit(drawn):
    correlated, white = drawn
    mask, science = trace_mask()
    image = (correlated + white).astype(np.float32)
    result = nsclean.fit(image, mask, "NRS1", method="readout")
    fft = nsclean.fit(image, mask, "NRS1", method="fft").model
    before = float(np.mean(correlated[science] ** 2))
    left = excess(correlated, result.model, science)
    assert left < 0.5 * before
    assert left < 0.9 * excess(correlated, fft, science)
    # The predicted variance of the model describes what it leaves in the trace.
    ratio = float(np.mean(result.variance[science])) / left
    assert 0.7 < ratio < 1.4, ratio


@pytest.mark.parametrize("alpha", [0.7, 1.5])
def test_spectral_index_is_measured_from_the_background(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    correlated = power_law_subarray(rng, alpha=alpha, amplitude=3.0)
    image = correlated + rng.normal(size=correlated.shape)
    mask, _ = trace_mask()
    info = nsclean.fit(image, mask, "NRS1", method="readout", variance=False).info
    assert abs(info["spectral_index"] - alpha) < 0.2, info["spectral_index"]
    if alpha > 1:
        # (a flat spectrum puts as much power at the pixel rate as white noise does: the
        # split between the two is then not identifiable, the prediction does not need it)
        assert info["white_sigma"] == pytest.approx(1.0, rel=0.25)


def test_lines_without_background_are_predicted_from_samples_further_away(drawn):
    correlated, white = drawn
    mask, _ = trace_mask()
    mask[:, 1000:1040] = False  # 40 lines with no background at all
    image = correlated + white
    result = nsclean.fit(image, mask, "NRS1", method="readout")
    assert np.isfinite(result.model).all()
    assert result.info["n_predicted"] >= 38  # the lines out of reach of any sample
    band = np.zeros_like(mask)
    band[:, 1010:1030] = True
    # Far from any sample the model is less certain than where it sees the background.
    assert result.variance[band].mean() > 2 * result.variance[mask].mean()


def test_background_outliers_do_not_pull_the_model(drawn):
    correlated, white = drawn
    mask, _ = trace_mask()
    image = correlated + white
    clean_model = nsclean.fit(image, mask, "NRS1", method="readout", variance=False)
    rng = np.random.default_rng(3)
    rows = rng.choice(np.flatnonzero(mask[:, 0]), 40)
    cols = rng.choice(np.arange(10, N_LINES - 10), 40, replace=False)
    hit = image.copy()
    hit[rows, cols] += 8.0  # cosmic-ray residuals the DQ did not flag (8 sigma)
    result = nsclean.fit(hit, mask, "NRS1", method="readout", variance=False)
    unprotected = nsclean.fit(hit, mask, "NRS1", method="readout", variance=False,
                              outlier_sigma=None)
    # At the hits: rejected, the model is a prediction from the other pixels; kept, it
    # follows a good part of the hit (what the noise shares with the neighbours).
    followed = np.median((result.model - clean_model.model)[rows, cols])
    followed_unprotected = np.median((unprotected.model - clean_model.model)[rows, cols])
    assert followed_unprotected > 1.0, followed_unprotected
    assert abs(followed) < 0.2 * followed_unprotected, followed
    # Where the science is, the hits leave the model alone, on average (a background
    # pixel near 3 sigma rejected in one run and kept in the other moves its neighbours).
    shift = float(np.abs(result.model - clean_model.model)[~mask].mean())
    shift_unprotected = float(np.abs(unprotected.model - clean_model.model)[~mask].mean())
    assert shift < 0.05, shift
    assert shift_unprotected > 2 * shift, (shift_unprotected, shift)


def test_nan_pixels_stay_nan_and_the_input_is_untouched(drawn):
    correlated, white = drawn
    mask, _ = trace_mask()
    image = (correlated + white).astype(np.float32)
    image[5, 100:110] = np.nan
    before = image.copy()
    cleaned = nsclean.clean(image, mask, "NRS1", method="readout")
    np.testing.assert_array_equal(np.isnan(cleaned), np.isnan(image))
    np.testing.assert_array_equal(image, before)
    assert math.isfinite(float(np.nanmean(cleaned)))


def test_cleaned_bots_file_records_the_model_and_its_variance(tmp_path):
    from astropy.io import fits

    from nsclean.io.exposure import clean_exposure
    from nsclean.testing import simulate

    sim = simulate.simulate_exposure("bots", "NRS2", seed=8, pink_correlated=12.0)
    rate_path, cal_path = simulate.write_exposure(sim, tmp_path / "in")
    out = tmp_path / "cleaned_rate.fits"
    clean_exposure(rate_path, out, cal_path=cal_path)
    with fits.open(rate_path) as before, fits.open(out) as after:
        header = after[0].header
        assert header["NSCFMETH"] == "readout"  # the default on a 32-row subarray
        assert 0.5 < header["NSCALPHA"] < 1.5  # the simulator's 1/f has alpha = 1
        assert header["NSCVAR"] is True
        added = after["VAR_RNOISE"].data.astype(float) - before["VAR_RNOISE"].data
        finite = np.isfinite(added)
        assert (added[finite] >= 0).all() and added[finite].mean() > 0


def test_planes_of_a_time_series_share_one_covariance():
    from nsclean.algorithm import readout

    rng = np.random.default_rng(11)
    alpha = 1.2
    planes = np.stack([power_law_subarray(rng, alpha=alpha, amplitude=1.0)
                       + rng.normal(size=(N_FAST, N_LINES)) for _ in range(8)])
    mask, _ = trace_mask()
    alone = [nsclean.fit(p, mask, "NRS1", method="readout", variance=False)
             .info["spectral_index"] for p in planes]
    with readout.shared_covariance(planes, mask, "nrs1"):
        shared = [nsclean.fit(p, mask, "NRS1", method="readout", variance=False)
                  .info["spectral_index"] for p in planes]
    assert len(set(shared)) == 1  # one covariance for every plane
    # pooled over the planes, the estimate is at least as close as a typical plane's
    assert abs(shared[0] - alpha) <= max(0.1, float(np.median(np.abs(np.subtract(alone, alpha)))))
    # and the context leaves nothing behind
    after = nsclean.fit(planes[0], mask, "NRS1", method="readout", variance=False)
    assert after.info["spectral_index"] == alone[0]
