"""Tests of the core cleaner against known truth (pure numpy, no files)."""

import hashlib

import numpy as np
import pytest

import nsclean
from nsclean.algorithm import core
from nsclean.algorithm.orientation import detector_to_dms, dms_to_detector

N = 2048


def in_band_lines(n_lines, rng, n=N, kmax=7):
    """Noiseless lines containing only frequencies 0..kmax (gain 1 in the apodizer)."""
    x = np.arange(n)
    out = np.zeros((n, n_lines))
    for k in range(kmax + 1):
        out += rng.normal(size=n_lines) * np.cos(2 * np.pi * k * x / n)[:, None]
        if k:
            out += rng.normal(size=n_lines) * np.sin(2 * np.pi * k * x / n)[:, None]
    return out


def ifu_like_mask(shape, period=50, run=10, offset=0):
    rows = np.arange(shape[0])
    return np.repeat((((rows + offset) % period) < run)[:, None], shape[1], axis=1)


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("detector", ["NRS1", "nrs2"])
def test_in_band_signal_is_reproduced_exactly_on_gapped_lines(detector):
    rng = np.random.default_rng(1)
    signal = in_band_lines(96, rng)
    mask = ifu_like_mask(signal.shape)
    # Irregular gaps of up to 60 px on top of the slice pattern, different per line.
    for j in range(signal.shape[1]):
        start = rng.integers(100, 1800)
        mask[start : start + rng.integers(20, 60), j] = False
    result = nsclean.fit(signal, mask, detector)
    assert result.info["n_guarded"] == 0 and result.info["n_uncleaned"] == 0
    error = np.abs(result.model - signal).max() / np.abs(signal).max()
    assert error < 1e-6


def test_out_of_band_frequencies_are_apodized():
    n = N
    x = np.arange(n)
    mask = np.ones((n, 4), bool)
    k8 = np.repeat(np.cos(2 * np.pi * 8 * x / n)[:, None], 4, axis=1)
    k12 = np.repeat(np.cos(2 * np.pi * 12 * x / n)[:, None], 4, axis=1)
    opts = dict(outlier_sigma=None)
    # k = 8 sits in the middle of the cosine roll-off (gain 0.5), k = 12 is outside.
    np.testing.assert_allclose(nsclean.fit_background(k8, mask, **opts), 0.5 * k8, atol=1e-9)
    np.testing.assert_allclose(nsclean.fit_background(k12, mask, **opts), 0, atol=1e-9)


def test_apodizer_gains_match_paper_defaults():
    gains = nsclean.apodizer(np.arange(12) / 2048)
    np.testing.assert_allclose(gains[:8], 1.0)
    assert gains[8] == pytest.approx(0.5)
    np.testing.assert_allclose(gains[9:], 0.0)


# ------------------------------------------------------------------- quality against truth


def test_removes_column_stripes_and_picture_frame_against_truth():
    rng = np.random.default_rng(2)
    shape = (N, N)
    white = rng.normal(size=shape)
    stripes = 0.8 * rng.normal(size=N)[None, :]
    rows = np.arange(N)[:, None]
    # A smooth picture-frame-like term: strong near the top and bottom, varying per column.
    frame = (np.exp(-rows / 150.0) + np.exp(-(N - 1 - rows) / 150.0)) * rng.normal(size=N)
    correlated = stripes + frame
    mask = ifu_like_mask(shape)
    cleaned = nsclean.clean(white + correlated, mask, "NRS1")
    interior = (slice(4, -4), slice(4, -4))
    residual = (cleaned - white)[interior]
    before = correlated[interior]
    # What is left is the fit's own noise, about sigma^2 K / n' = 17 / 410 = 0.04: the
    # correlated variance (0.76 here) is removed down to that floor.
    assert before.var() > 0.5
    assert residual.var() < 0.06
    # Banding: rms of column means is down by more than 5x.
    assert residual.mean(axis=0).std() < 0.2 * before.mean(axis=0).std()


def test_outliers_do_not_pull_the_model():
    rng = np.random.default_rng(3)
    shape = (N, 64)
    stripes = rng.normal(size=64)[None, :]
    image = rng.normal(size=shape) + stripes
    mask = ifu_like_mask(shape)
    clean_model = nsclean.fit_background(image, mask)
    hot = image.copy()
    bg_rows = np.flatnonzero(mask[:, 0])
    for j in range(64):
        rows = rng.choice(bg_rows, 5, replace=False)
        hot[rows, j] += 1e4  # hot pixels / snowball residue in the background
    hot_model = nsclean.fit_background(hot, mask)
    # Dropping 5 of ~400 samples moves the model by a fraction of its own noise.
    assert np.abs(hot_model - clean_model).mean() < 0.02
    assert np.abs(hot_model - clean_model).max() < 0.3
    no_rejection = nsclean.fit_background(hot, mask, outlier_sigma=None)
    assert np.abs(no_rejection - clean_model).max() > 10  # the rejection is what helps


# ------------------------------------------------------------------------------- guard


def test_guard_bounds_model_noise_in_long_gaps():
    rng = np.random.default_rng(4)
    shape = (N, 400)
    mask = np.ones(shape, bool)
    mask[600:1400] = False  # an 800-px gap: unguarded, the model variance is ~1e6 sigma^2
    white = rng.normal(size=shape)
    result = nsclean.fit(white, mask, "NRS1", max_model_variance=0.25)
    assert result.info["n_guarded"] == shape[1]
    assert np.isfinite(result.model).all()
    # Measured against truth: the model of pure white noise is the fit's own noise.
    model_variance = result.model.var(axis=1)
    assert model_variance.max() < 0.25 * 1.5
    unguarded = nsclean.fit(white, mask, "NRS1", max_model_variance=None)
    assert unguarded.model.var(axis=1).max() > 100


def test_sparse_and_empty_lines_never_give_wild_values():
    rng = np.random.default_rng(5)
    shape = (N, 32)
    image = rng.normal(size=shape)
    mask = ifu_like_mask(shape)
    mask[:, 0] = False
    mask[[100, 900, 1700], 0] = True  # 3 background pixels
    mask[:, 1] = False  # no background at all
    image[:, 2] = np.nan  # all-NaN line
    result = nsclean.fit(image, mask, "NRS1")
    assert np.isfinite(result.model).all()
    assert result.info["frequencies"][1] == -1 and result.info["frequencies"][2] == -1
    assert np.all(result.model[:, 1] == 0)
    assert result.info["n_uncleaned"] >= 2
    # Three samples: at most a mean is fitted, never more than the data support.
    assert result.info["frequencies"][0] <= 0
    assert np.abs(result.model[:, 0]).max() < 3
    cleaned = nsclean.clean(image, mask)
    assert np.isnan(cleaned[:, 2]).all()


# ---------------------------------------------------------------------- orientation


@pytest.mark.parametrize("shape", [(N, 256), (32, 2048)])
def test_nrs2_is_nrs1_rotated_by_180_degrees(shape):
    rng = np.random.default_rng(6)
    image = rng.normal(size=shape) + rng.normal(size=shape[1])[None, :]
    mask = ifu_like_mask(shape, period=8, run=4)
    m1 = nsclean.fit_background(image, mask, "NRS1")
    m2 = nsclean.fit_background(image[::-1, ::-1], mask[::-1, ::-1], "NRS2")
    np.testing.assert_allclose(m2[::-1, ::-1], m1, rtol=0, atol=1e-5)


def test_timeseries_mode_removes_drift_that_is_smooth_in_read_order():
    """NRS2 read order: lines run right to left, pixels top to bottom in DMS."""
    rng = np.random.default_rng(7)
    shape = (32, 2048)
    n_lines, n = shape[1], shape[0]
    stride = n + core.LINE_OVERHEAD_TICKS
    t = np.arange(n_lines * stride).reshape(n_lines, stride)[:, :n]
    drift = np.zeros(t.shape)
    for period in (40000.0, 9000.0, 3000.0):
        drift += np.sin(2 * np.pi * t / period + rng.uniform(0, 6))
    dms_noise = detector_to_dms(drift, "NRS2")
    white = 0.1 * rng.normal(size=shape)
    mask = np.ones(shape, bool)
    mask[12:20] = False  # a trace across the subarray
    residual = nsclean.clean(white + dms_noise, mask, "NRS2") - white
    assert residual.std() < 0.1 * dms_noise.std()


def test_orientation_views_round_trip():
    a = np.arange(12.0).reshape(3, 4)
    for det in ("NRS1", "NRS2"):
        np.testing.assert_array_equal(detector_to_dms(dms_to_detector(a, det), det), a)
    # NRS2: the first line read is the last DMS column, read from the top.
    np.testing.assert_array_equal(dms_to_detector(a, "NRS2")[0], a[::-1, -1])


# ---------------------------------------------------------------------------- subarray


def test_subarray_timeseries_removes_one_over_f_like_noise():
    rng = np.random.default_rng(8)
    shape = (32, 2048)
    n_lines, n = shape[1], shape[0]
    stride = n + core.LINE_OVERHEAD_TICKS
    total = n_lines * stride
    # 1/f noise on the time axis, sampled at the pixels.
    freqs = np.fft.rfftfreq(total)
    amp = np.zeros_like(freqs)
    amp[1:] = 1 / np.sqrt(freqs[1:])
    series = np.fft.irfft(amp * np.exp(2j * np.pi * rng.random(freqs.size)), n=total)
    series /= series.std()
    timeline = series.reshape(n_lines, stride)[:, :n]
    correlated = detector_to_dms(timeline, "NRS1")
    white = rng.normal(size=shape)
    mask = np.ones(shape, bool)
    mask[10:22] = False
    result = nsclean.fit(white + correlated, mask, "NRS1")
    assert result.info["mode"] == "timeseries"
    residual = correlated - result.model
    assert residual.var() < 0.5 * correlated.var()
    assert np.isfinite(result.model).all()


# ------------------------------------------------------------------------------- API


def test_input_is_never_modified_and_nans_stay_nan():
    rng = np.random.default_rng(9)
    image = rng.normal(size=(N, N)).astype(np.float32)
    image[500, 700] = np.nan
    mask = ifu_like_mask(image.shape)
    before_img, before_mask = digest(image), digest(mask)
    cleaned = nsclean.clean(image, mask, "NRS1")
    assert digest(image) == before_img and digest(mask) == before_mask
    assert cleaned.dtype == np.float32 and cleaned is not image
    assert np.isnan(cleaned[500, 700])
    assert np.isfinite(np.delete(cleaned.ravel(), 500 * N + 700)).all()


def test_reference_pixels_are_left_unchanged():
    rng = np.random.default_rng(10)
    image = rng.normal(size=(N, N)) + rng.normal(size=N)[None, :]
    mask = np.ones(image.shape, bool)  # even if the mask claims them as background
    cleaned = nsclean.clean(image, mask)
    border = core._reference_border(image.shape)
    np.testing.assert_array_equal(cleaned[border], image[border])
    assert not np.allclose(cleaned[~border], image[~border])


def test_nan_pixels_are_not_used_in_the_fit():
    rng = np.random.default_rng(11)
    image = rng.normal(size=(N, 16))
    mask = ifu_like_mask(image.shape)
    with_nan = image.copy()
    with_nan[::7] = np.nan
    reduced_mask = mask.copy()
    reduced_mask[::7] = False
    np.testing.assert_allclose(
        nsclean.fit_background(with_nan, mask), nsclean.fit_background(image, reduced_mask)
    )


@pytest.mark.parametrize(
    "image, mask, exc, words",
    [
        (np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), ValueError, "2-D"),
        (np.zeros((8, 8)), np.ones((8, 9), bool), ValueError, "shape"),
        (np.zeros((8, 8)), np.ones((8, 8), int), TypeError, "boolean"),
        (np.zeros((8, 8), int), np.ones((8, 8), bool), TypeError, "floating"),
        (np.zeros((8, 8)), np.zeros((8, 8), bool), ValueError, "empty"),
    ],
)
def test_bad_input_gets_a_clear_error(image, mask, exc, words):
    with pytest.raises(exc, match=words):
        nsclean.clean(image, mask)


def test_bad_detector_and_options_are_rejected():
    image, mask = np.zeros((64, 64)), np.ones((64, 64), bool)
    with pytest.raises(ValueError, match="NRS1, NRS2"):
        nsclean.clean(image, mask, "NRC1")
    with pytest.raises(TypeError, match="unknown option"):
        nsclean.clean(image, mask, frequencies=3)
    with pytest.raises(ValueError, match="weight_sigma"):
        nsclean.clean(image, mask, weight_sigma=-1)
    with pytest.raises(ValueError, match="method"):
        nsclean.clean(image, mask, method="magic")


def test_median_method_subtracts_column_median_per_channel():
    rng = np.random.default_rng(12)
    image = rng.normal(size=(N, 8)) * 0.01
    offsets = rng.normal(size=(4, 8))
    image += np.repeat(offsets, 512, axis=0)
    mask = ifu_like_mask(image.shape)
    model = nsclean.fit_background(image, mask, method="median", per_channel=True)
    np.testing.assert_allclose(model[::512], offsets, atol=0.05)
    whole = nsclean.fit_background(image, mask, method="median")
    np.testing.assert_allclose(whole[0], np.median(image[mask[:, 0]], axis=0))


def test_options_are_reported_for_headers():
    result = nsclean.fit(np.zeros((64, 64)), np.ones((64, 64), bool), cutoff=1 / 128)
    assert result.options["cutoff"] == 1 / 128
    assert result.options["weight_sigma"] == 32.0
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in result.options.values())


def test_nsclean_compatibility_class():
    rng = np.random.default_rng(13)
    image = rng.normal(size=(N, 64)) + rng.normal(size=64)[None, :]
    mask = ifu_like_mask(image.shape)
    cleaner = nsclean.NSClean("NRS2", mask)
    original = image.copy()
    out = cleaner.clean(image)
    np.testing.assert_array_equal(image, original)
    np.testing.assert_allclose(out, nsclean.clean(image, mask, "NRS2"))
    np.testing.assert_allclose(cleaner.fit(image), image - out)
    buffed = cleaner.clean(image, buff=True)
    assert not np.allclose(buffed, out)


def test_density_weights_are_centred_and_symmetric():
    density = core._DensityFilter(N, 32.0)
    mask = np.zeros((N, 1), bool)
    mask[300:340] = True
    mask[1000] = True
    w = density.weights(mask)
    w_reversed = density.weights(mask[::-1])
    np.testing.assert_allclose(w_reversed[::-1], w, rtol=1e-5)
    # The isolated pixel is in a sparse neighbourhood: it weighs more than the run.
    assert w[1000, 0] > w[320, 0]


def test_density_filter_is_the_direct_convolution_in_single_precision():
    rng = np.random.default_rng(22)
    valid = rng.random((N, 6)) < 0.4
    valid[300:900, 1] = False
    valid[:, 2] = True
    for sigma in (32.0, 8.0):  # binned by 4, and not binned
        density = core._DensityFilter(N, sigma)
        binned = valid.reshape(density.n_bins, density.bin, -1).sum(axis=1).astype(float)
        s = sigma / density.bin
        offsets = np.arange(-int(np.ceil(4 * s)), int(np.ceil(4 * s)) + 1)
        kernel = np.exp(-0.5 * (offsets / s) ** 2)
        kernel /= kernel.sum()

        rho = np.stack([np.convolve(c, kernel, mode="same") for c in binned.T], axis=1)
        rho /= np.convolve(np.full(density.n_bins, float(density.bin)), kernel, mode="same")[
            :, None
        ]
        weights = density.binned_weights(valid)
        assert weights.dtype == np.float32
        # Single-precision FFTs: an error of a few 1e-8 in rho (which is at most 1).
        dense = rho > 1e-3
        np.testing.assert_allclose(weights[dense] ** -0.5, rho[dense], rtol=0, atol=5e-7)


def test_density_filter_does_not_depend_on_how_many_lines_go_together():
    # The FFTs run on groups of lines at once (SIMD lanes, and a remainder line by line):
    # every line must come out the same bits whatever the group, or block size and
    # thread count would change the result.
    rng = np.random.default_rng(23)
    valid = rng.random((N, 45)) < 0.3
    valid[200:1100, ::4] = False
    for sigma in (32.0, 8.0):
        density = core._DensityFilter(N, sigma)
        whole = density.binned_weights(valid)
        for width in (1, 3, 8, 13):
            parts = [density.binned_weights(valid[:, j : j + width]) for j in range(0, 45, width)]
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_result_does_not_depend_on_block_size(monkeypatch):
    rng = np.random.default_rng(14)
    image = rng.normal(size=(N, 300)).astype(np.float32)
    mask = ifu_like_mask(image.shape)
    a = nsclean.fit_background(image, mask, adaptive=False)
    monkeypatch.setattr(core, "_BLOCK_LINES", 37)
    np.testing.assert_array_equal(nsclean.fit_background(image, mask, adaptive=False), a)
    # The adaptive gains use single-precision residual statistics, whose last bits may
    # depend on the matrix shapes BLAS sees.
    b = nsclean.fit_background(image, mask)
    monkeypatch.setattr(core, "_BLOCK_LINES", 128)
    np.testing.assert_allclose(b, nsclean.fit_background(image, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["readout", "fft"])
def test_bit_identical_whatever_the_number_of_threads(tmp_path, method):
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, nsclean, hashlib;"
        "rng = np.random.default_rng(0);"
        "img = rng.normal(size=(2048, 2048)).astype(np.float32) + rng.normal(size=2048);"
        "mask = np.repeat(((np.arange(2048) % 50) < 10)[:, None], 2048, axis=1);"
        f"r = nsclean.fit(img, mask, method={method!r});"
        "h = hashlib.sha256(r.model.tobytes());"
        # the posterior variance too (readout; what the workflow's clean step asks for)
        "h.update(b'' if r.variance is None else r.variance.tobytes());"
        "print(h.hexdigest(), r.variance is None)"
    )
    digests = set()
    for threads in ("1", "2", "3"):
        env = dict(
            os.environ,
            OPENBLAS_NUM_THREADS=threads,
            OMP_NUM_THREADS=threads,
            NSCLEAN_THREADS=threads,
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_adaptive_gains_damp_frequencies_without_correlated_power():
    rng = np.random.default_rng(15)
    shape = (N, 512)
    white = rng.normal(size=shape)
    stripes = rng.normal(size=shape[1])[None, :]  # power at k = 0 only
    mask = ifu_like_mask(shape)
    plain = nsclean.fit_background(white + stripes, mask, adaptive=False)
    adaptive = nsclean.fit_background(white + stripes, mask)
    err_plain = np.mean((plain - stripes) ** 2)
    err_adaptive = np.mean((adaptive - stripes) ** 2)
    # Measured against the truth: the damped fit is much closer to the injected noise.
    assert err_adaptive < 0.5 * err_plain


@pytest.mark.parametrize("adaptive", [True, False])
def test_background_only_at_the_line_ends_never_explodes(adaptive):
    """A dilated IFU footprint can leave background only at both ends of a column.

    With 76 pixels at each end and a 1700-px masked run, every fit with a frequency is
    numerically singular; the model must stay at the noise level (found with the
    simulator: before the condition check, 3 frequencies were fitted and the model
    reached 2e4 sigma).
    """
    rng = np.random.default_rng(16)
    shape = (N, 64)
    x = np.arange(N)[:, None]
    image = rng.normal(size=shape) + 0.5 * np.sin(2 * np.pi * 3 * x / N + rng.uniform(0, 6, 64))
    mask = np.zeros(shape, bool)
    mask[4:80] = mask[-80:-4] = True
    mask[1000, ::3] = True  # an isolated background pixel in some columns
    result = nsclean.fit(image, mask, "NRS1", adaptive=adaptive)
    assert np.isfinite(result.model).all()
    assert np.abs(result.model).max() < 5
    assert np.all(result.info["frequencies"] <= 1)


def test_simulated_ifu_with_wide_dilation_stays_at_noise_level():
    """Regression: IFU footprint dilated by 6 px leaves columns with background only at
    both ends; the model once reached 140 DN/s there (white noise 0.007 DN/s)."""
    from nsclean.algorithm import masks
    from nsclean.testing import simulate

    sim = simulate.simulate_exposure("ifu", "NRS1", seed=11, observation=11)
    mask, _ = masks.build_background_mask(
        sim.rate, sim.dq, sim.footprint, exp_type="NRS_IFU", dilation_radius=6
    )
    noise = sim.rate - sim.signal
    result = nsclean.fit(noise, mask, "NRS1")
    white = float(np.std(sim.noise_white))
    assert np.abs(result.model).max() < 10 * white


def _guard_by_brute_force(valid, limit=0.25, step=16):
    """Highest k of every line by trying every k from the top with explicit matrices."""
    n, n_lines = valid.shape
    basis = core._fourier_basis(n, 8)
    gains = core.apodizer(np.arange(9) / n)
    gain_per_par = np.concatenate([[gains[0]], np.repeat(gains[1:9], 2)])
    weights = core._DensityFilter(n, 32.0).weights(valid).astype(np.float64)
    evaluated = (basis * gain_per_par)[::step]
    chosen = np.full(n_lines, -1)
    for line in range(n_lines):
        w = weights[:, line]
        for k in range(8, -1, -1):
            p = 2 * k + 1
            b = basis[:, :p]
            if valid[:, line].sum() < 2 * p:
                continue
            a = b.T @ (w[:, None] * b)
            c = b.T @ ((w * w)[:, None] * b)
            a_inv = np.linalg.inv(a)
            noise = a_inv @ c @ a_inv
            g = evaluated[:, :p]
            variance = np.einsum("ip,pq,iq->i", g, noise, g)
            d = np.sqrt(np.diag(a))
            condition = np.linalg.cond(a / d[:, None] / d[None, :], 1)
            if variance.max() <= limit and condition <= 1e10:
                chosen[line] = k
                break
    return chosen


def test_guard_choice_equals_trying_every_frequency_count_from_the_top():
    # The guard prunes frequency counts with variances at probe samples and grouped
    # k x k checks; its choice must be exactly that of the plain definition.
    rng = np.random.default_rng(21)
    n_lines = 48
    valid = np.ones((N, n_lines), bool)
    for line in range(n_lines):
        # Gaps from 0 to ~1100 px at random places, plus a sprinkling of masked pixels.
        length = int(rng.integers(0, 1100)) if line % 6 else 0
        start = int(rng.integers(0, N - length)) if length else 0
        valid[start : start + length, line] = False
        valid[rng.random(N) < 0.3, line] = False
    valid[:, 5] = False
    valid[::300, 5] = True  # 7 samples: not enough for any k > 1
    image = np.zeros((N, n_lines))
    fit = nsclean.fit(image, valid, outlier_sigma=None, adaptive=False)
    expected = _guard_by_brute_force(valid)
    assert len(set(expected)) >= 4  # the lines really need different frequency counts
    np.testing.assert_array_equal(fit.info["frequencies"], expected)
