"""Readout-aware cleaning: the correlated noise as the detector reads it (pure numpy, no I/O).

A NIRSpec full-frame fast-scan line (one DMS column) is read through four outputs of
512 pixels at the same 512 clock ticks, odd outputs in the opposite direction.  Most of
the 1/f noise is common to the four outputs at the same tick, a smaller part belongs to
one output, and the picture frame and the slowest 1/f change smoothly from line to line
(Rauscher 2015; Rauscher 2024, section 2).  This module estimates the correlated noise at
*every* pixel as its conditional mean given the background pixels, under a Gaussian prior
whose parameters come from the exposure itself:

* **Readout geometry.**  Every line is put on its (output, tick) grid.  The noise of
  output ``o`` at tick ``t`` is ``c(t) + u_o(t)``: a common part shared by the four
  outputs and a per-output part, each a DCT-II series on the 512 ticks (the DCT is close
  to the Karhunen-Loeve basis of a stationary process on an interval, so a stationary
  prior is nearly diagonal in it).  Where one output sits on the science, the other
  three saw the same ticks in the background, so a long gap on one output is not a hole.
* **Empirical prior (empirical Bayes).**  The prior variances of the coefficients (the
  common and per-output spectra) and the white level come from the background of the
  exposure: a first guess from the masked auto- and cross-output second moments, then
  maximum likelihood by expectation-maximisation, which accounts for every line's gaps.
  The number of modes kept is where the prior still carries a useful fraction of the
  noise of a coefficient estimate.  Nothing here is tuned to a simulator.
* **Neighbouring lines.**  The picture frame and the slowest 1/f vary smoothly across
  lines.  After a first pass, every coefficient gets a prior mean from the neighbouring
  lines' estimates (a Gaussian average that leaves the line itself out), with the width
  chosen per coefficient by leave-one-out prediction error (or no sharing at all), and a
  prior variance around it from the law of total variance.  The second pass is the
  conditional mean under that prior.
* **Subarrays** are read through one output, in short lines (32 pixels on the BOTS
  subarrays), and the 1/f of traditional readout reaches up to the pixel rate.  The
  noise is predicted along the read-out time series (10 us per pixel, 12 overhead
  ticks per line) by kriging: the conditional mean at every pixel given the background
  within a line's reach, under a covariance fitted to the background's masked
  autocovariance (a power law of free exponent, an alternating-column term and white
  noise; the background covers too few lags for a free-form spectrum).  The chunked
  DCT model of the slow modes remains the fallback where no covariance can be measured.

The conditional mean cannot do worse than not cleaning in expectation when the prior is
right, and the posterior variance of the prediction is known at every pixel
(``variance=True``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np

from .core import _set_border
from .nirspec import CHANNEL_ROWS, LINE_OVERHEAD_TICKS, N_CHANNELS, REFERENCE_BORDER
from .orientation import detector_to_dms, dms_to_detector, normalize_detector

# A full-frame line is read through N_CHANNELS outputs of CHANNEL_ROWS ticks each.
N_OUTPUTS = N_CHANNELS
OUTPUT_TICKS = CHANNEL_ROWS

# A mode is kept while its prior variance is at least this fraction of the noise
# variance of its coefficient estimate from a typical line: below it the posterior
# shrinks the mode by more than 95 % and it only costs time.
_MIN_SNR = 0.05
# Candidate widths (Gaussian sigma, in lines) of the neighbour prior mean; 0 = none.
_SHARE_WIDTHS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# Fewest lines with background for neighbour sharing.
_SHARE_MIN_LINES = 64
# At most this many lines (evenly spaced) are used to estimate the covariances.
_COVARIANCE_LINES = 256
# The prior variances EM starts from are at least this fraction of the noise of a
# coefficient estimate.
_EM_START = 0.5
# Segments solved at once: the stacked solves, Gram matrices and residuals work on
# blocks of this many segments (small temporaries that stay in cache).  The blocks run
# one after the other: on two threads they were slower (the GIL between the many
# small numpy calls), docs/benchmarks.md.
_SOLVE_BLOCK = 256
# Accelerated expectation-maximisation cycles (three EM steps each) for the prior
# spectra, stopping earlier when no log variance moves by more than the tolerance; the
# longest extrapolation is this many steps.
_EM_CYCLES = 3
_EM_MAX_STEP = 8.0
_EM_TOLERANCE = 0.02
# The mode count stops at the first run of this many modes that are not worth fitting.
_GAP_MODES = 3
# Smallest white-noise variance used (data units squared): a blank image has none.
_WHITE_FLOOR = 1e-30
# Samples further than this many sigma from the level are never used (cosmic rays,
# hot pixels); the outlier pass judges the rest.
_FAR = 10.0


def fit_readout(dms_image, valid, detector, opts, *, full_frame, variance=False):
    """Conditional-mean model of the correlated noise of one image.

    Parameters
    ----------
    dms_image : ndarray
        2-D float image in DMS orientation.
    valid : ndarray of bool
        Background pixels usable for the fit (finite, not reference pixels).
    detector : {"NRS1", "NRS2"}
        Normalised detector name.
    opts : dict
        Validated options of :func:`nsclean.fit` (``max_modes``, ``share_lines``,
        ``outlier_sigma``, ``outlier_iterations``, ``chunk_length``).
    full_frame : bool
        Full frame (four outputs per line) or subarray (one output, time series).
    variance : bool
        Also return the posterior variance of the correlated noise at every pixel.

    Returns
    -------
    model : ndarray of float32 or float64
        The model (level + conditional mean), DMS orientation.
    info : dict
        Diagnostics (see :func:`nsclean.fit`).
    pixel_variance : ndarray or None
        Posterior variance of the noise at every pixel (image units squared), or None.
    """
    dtype = dms_image.dtype if dms_image.dtype in (np.float32, np.float64) else np.float64
    values = dms_image[valid]
    level, sigma = _level_and_sigma(values)
    if values.min() == values.max():
        # A constant background has no noise to model (a blank or synthetic image): the
        # model is its level (zero on a full frame's reference border).
        model = np.full(dms_image.shape, level, dtype=dtype)
        if full_frame:
            _set_border(model, 0)
        info = {"n_lines": int(dms_image.shape[1]), "n_rejected": 0,
                "n_background": valid.sum(axis=0), "n_predicted": 0}
        return model, info, (np.zeros(dms_image.shape, np.float32) if variance else None)
    if not full_frame:
        kriged = _fit_subarray(dms_image, valid, detector, opts, level, sigma, variance,
                               dtype)
        if kriged is not None:
            return kriged
    return _fit_segments(dms_image, valid, detector, opts, level, sigma, variance, dtype,
                         full_frame)


def _fit_segments(dms_image, valid, detector, opts, level, sigma, variance, dtype,
                  full_frame):
    """The DCT-mode model of every line (full frame) or time-series chunk (subarray)."""
    if full_frame:
        layout = _LineLayout(dms_image.shape, detector)
    else:
        layout = _ChunkLayout(dms_image.shape, detector, int(opts["chunk_length"]))
    data, mask = layout.segments(dms_image, valid, level)
    # Far outliers never enter the covariances or the fit (the data are zero off the
    # background, and sigma > 0, so only background samples can be far).
    far = np.abs(data) > _FAR * sigma
    n_far = int(np.count_nonzero(far))
    if n_far:
        mask[far] = False
        data[far] = 0.0

    prior = _empirical_prior(
        layout.pattern_free(data, mask), mask, opts,
        max_modes=getattr(layout, "max_modes", None),
    )
    solver = _Solver(data, mask, prior, keep_factors=variance)
    coef = solver.solve()
    n_rejected = n_far
    if opts["outlier_sigma"] is not None:
        for _ in range(int(opts["outlier_iterations"])):
            rejected = solver.reject_outliers(coef, opts["outlier_sigma"])
            if rejected == 0:
                break
            n_rejected += rejected
            # Same prior: only the segments that lost samples change.
            coef = solver.solve(previous=coef)

    shared = None
    # Which width of neighbours predicts a line best is judged on the lines with
    # background; with few of them (a handful of columns), that choice is noise.
    if full_frame and opts["share_lines"] and \
            np.count_nonzero(mask.any(axis=(0, 1))) >= _SHARE_MIN_LINES:
        shared = solver.share_neighbours(coef)
        coef = solver.solve()

    model = layout.model(solver, coef, dtype, offset=level)
    pixel_variance = None
    if variance:
        pixel_variance = layout.variance(solver)

    n_background = valid.sum(axis=0)
    info = {
        "n_lines": int(layout.n_lines),
        "n_rejected": int(n_rejected),
        "n_background": n_background,
        # Segments without a background pixel: their model is the prior mean alone
        # (the reference lines of a full frame are not cleaned at all).
        "n_predicted": int(np.count_nonzero(~mask.any(axis=(0, 1))))
        - (2 * REFERENCE_BORDER if full_frame else 0),
        "common_modes": int(prior.n_common),
        "output_modes": int(max(prior.n_output - 1, 0)),  # DCT modes (+ alternating)
        "white_sigma": float(math.sqrt(prior.white)),
        "common_fraction": prior.common_fraction(),
        "shared_coefficients": 0 if shared is None else int(np.count_nonzero(shared)),
        "segments": int(data.shape[2]),
    }
    return model, info, pixel_variance


# Covariances measured once for all the planes of a time series (shared_covariance).
_SHARED_COVARIANCE: dict = {}
_SHARED_PLANES = 16


@contextlib.contextmanager
def shared_covariance(planes, valid, detector):
    """Subarray fits in this context use one covariance measured on ``planes``.

    The noise of a detector does not change from one integration to the next: the
    covariance of a time series is measured once, from the background autocovariance
    summed over up to 16 planes spread over ``planes`` (n, ny, nx, DMS), instead of
    on every plane (whose own estimate scatters by 10-25 % where the 1/f is weak).
    The fits are then the same whatever the order of the planes and the number of
    worker processes (forked workers inherit the context), and planes with the same
    mask share their solves.  Full frames and the fft method are unaffected.

    Parameters
    ----------
    planes : ndarray
        The integrations, (n, ny, nx) in DMS orientation.
    valid : ndarray of bool
        Background mask of the exposure, (ny, nx).
    detector : {"NRS1", "NRS2"}
        Normalised detector name.
    """
    detector = normalize_detector(detector)
    shape = planes.shape[1:]
    key = (detector, (shape[1], shape[0]))  # detector frame: (lines, pixels per line)
    params = None
    if shape[0] < N_OUTPUTS * OUTPUT_TICKS and len(planes):
        kriging = _SeriesKriging(*key[1])
        products = pairs = 0.0
        pick = np.unique(np.linspace(0, len(planes) - 1, _SHARED_PLANES).round().astype(int))
        for index in pick:
            plane = planes[index]
            usable = valid & np.isfinite(plane)
            if not usable.any():
                continue
            lines, _, good = _series_samples(plane, usable, detector,
                                             *_level_and_sigma(plane, usable))
            more_products, more_pairs = kriging.autocovariance(lines, good)
            products, pairs = products + more_products, pairs + more_pairs
        if not np.isscalar(pairs) and kriging.fit_autocovariance(products, pairs):
            params = kriging.params
    if params is None:
        yield
        return
    _SHARED_COVARIANCE[key] = params
    try:
        yield
    finally:
        _SHARED_COVARIANCE.pop(key, None)


def _series_samples(dms_image, valid, detector, level, sigma):
    """A subarray as read-out lines (detector frame, ``level`` subtracted): ``(lines,
    given, usable)``, ``given`` the finite background samples and ``usable`` those
    within ``_FAR`` sigma of the level."""
    lines = dms_to_detector(dms_image, detector).astype(np.float64) - level
    given = dms_to_detector(valid, detector) & np.isfinite(lines)
    return lines, given, given & (np.abs(lines) <= _FAR * sigma)


def _fit_subarray(dms_image, valid, detector, opts, level, sigma, variance, dtype):
    """Subarray: kriging along the read-out time series (:class:`_SeriesKriging`).

    Outliers are background pixels whose leave-one-out residual exceeds
    ``outlier_sigma`` of its own predicted sigma.  Blocks with no background within
    reach are predicted from the nearest samples further away.  Returns None when the
    background cannot give a covariance (the chunked DCT model is then used).
    """
    lines, given, usable = _series_samples(dms_image, valid, detector, level, sigma)
    kriging = _SeriesKriging(*lines.shape)
    shared = _SHARED_COVARIANCE.get((detector, lines.shape))
    if shared is not None:
        kriging.use(shared)
    elif not kriging.fit(lines, usable):
        return None
    result = kriging.predict(lines, usable, variance)
    rejected = np.zeros_like(usable)
    if opts["outlier_sigma"] is not None:
        data = lines.copy()
        for _ in range(int(opts["outlier_iterations"])):
            z = result["loo"] / result["loo_sigma"]
            bad = usable & ~rejected & (np.abs(z) > opts["outlier_sigma"])
            if not bad.any():
                break
            rejected |= bad
            # A rejected sample is replaced by its conditional mean given the others:
            # the prediction is then (nearly: windows differ) what it would be without
            # it, and the same solves serve, so outliers add no new background
            # patterns.  Two passes make the replacements agree with one another.
            for _ in range(2):
                data[rejected] -= result["loo"][rejected]
                result = kriging.predict(data, usable, variance)
    model = result["model"] + level
    pixel_variance = result["variance"]
    info = {
        "n_lines": int(lines.shape[0]),
        "n_rejected": int(np.count_nonzero(given & ~usable) + np.count_nonzero(rejected)),
        "n_background": valid.sum(axis=0),
        # Lines with no background within reach: predicted from samples further away.
        "n_predicted": result["n_far"],
        "white_sigma": math.sqrt(kriging.white),
        "spectral_index": kriging.alpha,
        "segments": int(lines.shape[0]),
    }
    model = np.ascontiguousarray(detector_to_dms(model, detector), dtype=dtype)
    if variance:
        pixel_variance = np.ascontiguousarray(detector_to_dms(pixel_variance, detector),
                                              dtype=np.float32)
    return model, info, pixel_variance


# --------------------------------------------------------------------------------------
# Geometry: DMS image <-> segments, pixel arrays (output, tick, segment)
# --------------------------------------------------------------------------------------


class _LineLayout:
    """Full frame: one segment per fast-scan line, arrays (output, tick, line).

    A DMS column is one fast-scan line and the four outputs are 512-row blocks of it,
    so ``dms.reshape(4, 512, 2048)`` is already (output, pixel, line) with no copy.
    Alternate outputs read in opposite directions: flipping blocks 1 and 3 along the
    rows puts every pixel on its clock tick.  The same blocks flip on NRS2, whose
    detector frame is the DMS frame rotated by 180 degrees (the outputs are met in the
    opposite order and the lines read in reverse, neither of which matters here).
    """

    def __init__(self, shape, detector):
        self.shape = shape
        self.n_lines = shape[1]
        self.n_out = N_OUTPUTS
        self.length = shape[0] // N_OUTPUTS

    def _tick_views(self, dms_array):
        grid = dms_array.view()
        grid.shape = (self.n_out, self.length, self.n_lines)  # a view: never a copy
        return [(slice(0, None, 2), grid[0::2]), (slice(1, None, 2), grid[1::2, ::-1])]

    def segments(self, dms_image, valid, level):
        shape = (self.n_out, self.length, self.n_lines)
        data = np.empty(shape, dtype=np.float32)
        mask = np.empty(shape, dtype=bool)
        for (outputs, view), (_, valid_view) in zip(
            self._tick_views(np.ascontiguousarray(dms_image)),
            self._tick_views(np.ascontiguousarray(valid)),
            strict=True,
        ):
            np.subtract(view, np.float32(level), out=data[outputs], casting="unsafe")
            mask[outputs] = valid_view
        np.copyto(data, 0.0, where=~mask)  # NaN pixels too
        return data, mask

    def pattern_free(self, data, mask):
        """The segments for the prior (which removes the mean over lines itself)."""
        return data

    def model(self, solver, coef, dtype, offset=0.0):
        """The solver's model plus ``offset`` as a DMS image (zero on the border)."""
        dms = np.empty(self.shape, dtype=dtype)
        # The outputs are blocks of DMS rows: the model is written there directly,
        # the odd outputs (read in reverse) from the reversed basis.
        grid = dms.reshape(self.n_out, self.length, self.n_lines)
        solver.evaluate(coef, dtype, out=grid, flipped=range(1, self.n_out, 2))
        dms += dms.dtype.type(offset)
        _set_border(dms, 0)
        return dms

    def variance(self, solver):
        """The solver's pixel variance as a float32 DMS image (zero on the border),
        written there directly as :meth:`model` is."""
        dms = np.empty(self.shape, dtype=np.float32)
        grid = dms.reshape(self.n_out, self.length, self.n_lines)
        solver.pixel_variance(out=grid, flipped=range(1, self.n_out, 2))
        _set_border(dms, 0)
        return dms

    def to_dms(self, segments, dtype, offset=0.0):
        dms = np.empty(self.shape, dtype=dtype)
        for outputs, view in self._tick_views(dms):
            np.add(segments[outputs], offset, out=view, casting="unsafe")
        _set_border(dms, 0)
        return dms


class _ChunkLayout:
    """Subarray: the read-out time series (one output), in chunks that overlap by half.

    Pixels sit on the time axis at one tick each, with ``LINE_OVERHEAD_TICKS`` empty
    ticks after every line.  Each chunk is one segment with one output; the chunk
    models are blended with triangular windows that sum to one.
    """

    def __init__(self, shape, detector, chunk_length):
        self.shape = shape
        self.detector = detector
        self.n_fast, self.n_lines = shape
        self.stride = self.n_fast + LINE_OVERHEAD_TICKS
        self.total = self.n_lines * self.stride
        if self.total <= chunk_length:
            self.chunk, self.hop, self.n_chunks = self.total, self.total, 1
            self.window = np.ones(self.chunk)
        else:
            self.chunk, self.hop = chunk_length, chunk_length // 2
            self.n_chunks = math.ceil((self.total - chunk_length) / self.hop) + 1
            ramp = (np.arange(self.chunk) + 0.5) / self.hop
            self.window = np.minimum(np.minimum(ramp, ramp[::-1]), 1.0)
        self.padded = (self.n_chunks - 1) * self.hop + self.chunk
        # Lines per chunk: the sampling of the time series is one cluster of background
        # pixels per line: mode j has j / 2 cycles per chunk, and no mode beyond half a
        # cycle per line (j = lines per chunk) is identifiable.
        self.max_modes = max(1, self.chunk // self.stride)

    def _series(self, lines, fill):
        series = np.full(self.padded, fill, dtype=lines.dtype)
        series[: self.total].reshape(self.n_lines, self.stride)[:, : self.n_fast] = lines
        return series

    def _chunks(self, series):
        # (1, tick, chunk): the segments-last layout of the solver.
        index = np.arange(self.chunk)[:, None] + (np.arange(self.n_chunks) * self.hop)
        return series[index][None]

    def segments(self, dms_image, valid, level):
        lines = dms_to_detector(dms_image, self.detector).astype(np.float32) - np.float32(level)
        line_valid = dms_to_detector(valid, self.detector)
        data = self._chunks(self._series(lines, 0.0))
        mask = self._chunks(self._series(line_valid, False))
        data[~mask] = 0.0
        # What every line has at the same position (the wings of a bright trace past the
        # mask) is not noise: it is left out of the prior's estimate (pattern_free).
        counts = line_valid.sum(axis=0)
        sums = np.where(line_valid, lines, 0.0).sum(axis=0, dtype=np.float64)
        pattern = np.divide(sums, counts, out=np.zeros(counts.shape), where=counts > 0)
        self._pattern = self._chunks(
            self._series(np.broadcast_to(pattern.astype(np.float32), lines.shape), 0.0)
        )
        return data, mask

    def pattern_free(self, data, mask):
        """The segments without the pattern common to all lines (for the prior)."""
        return np.where(mask, data - self._pattern, 0.0).astype(np.float32)

    def model(self, solver, coef, dtype, offset=0.0):
        """The solver's model plus ``offset`` as a DMS image."""
        return self.to_dms(solver.evaluate(coef, dtype), dtype, offset)

    def variance(self, solver):
        """The solver's pixel variance as a float32 DMS image."""
        return self.to_dms(solver.pixel_variance(), np.float32)

    def to_dms(self, segments, dtype, offset=0.0):
        series = np.zeros(self.padded)
        weight = np.zeros(self.padded)
        for i in range(self.n_chunks):
            series[i * self.hop : i * self.hop + self.chunk] += self.window * segments[0, :, i]
            weight[i * self.hop : i * self.hop + self.chunk] += self.window
        # The windows sum to one where chunks overlap; the ends have one chunk only.
        series = series / np.maximum(weight, 1e-12) + float(offset)
        lines = series[: self.total].reshape(self.n_lines, self.stride)[:, : self.n_fast]
        return np.ascontiguousarray(detector_to_dms(lines, self.detector), dtype=dtype)


# --------------------------------------------------------------------------------------
# Empirical prior
# --------------------------------------------------------------------------------------


def _level_and_sigma(image, valid=None):
    """Robust background level and white-noise sigma (median, MAD) from a sample
    (``image[valid]``, or the values ``image`` themselves)."""
    values = image if valid is None else image[valid]
    if values.size > 200_000:
        values = values[:: values.size // 200_000]
    values = values.astype(np.float64)
    level = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - level)))
    if not sigma > 0:
        sigma = float(np.std(values)) or 1.0
    return level, sigma


class _Prior:
    """Prior variances of the DCT coefficients (units of the data squared)."""

    def __init__(self, common, output, white, excluded):
        self.common = common  # (Jc,)
        self.output = output  # (Ju,), empty for one output
        self.white = white  # white + power of the modes left out, per pixel
        self.excluded = excluded  # per-pixel power of the modes left out
        self.n_common = common.size
        self.n_output = output.size
        self.mean = None  # (segments, Jc + outputs * Ju) prior means, set by sharing
        self.pattern = None  # (Jc + outputs * Ju,) the mean over lines, if measured

    def common_fraction(self):
        total = float(self.common.sum() + N_OUTPUTS * self.output.sum())
        # (the alternating-column mode counts as per-output power)
        return float(self.common.sum() / total) if total > 0 and self.n_output else 1.0


def _empirical_prior(data, mask, opts, max_modes=None):
    """Prior variances of the common and per-output DCT modes, from the background.

    Estimated on a sample of lines, in three steps:

    1. The white level, from differences of background pixels two ticks apart on the
       same output (robust: median absolute difference; two ticks, so that noise that
       alternates from pixel to pixel is not taken for white noise).
    2. A first guess of the spectra from the masked second moments of the projections
       ``x_o = D^T (m_o z_o)``: with ``G_o = D^T diag(m_o) D``,
       ``E[x_oj x_o'j] = sum_k G_o,jk G_o',jk lc_k`` across outputs (the common part is
       the same at the same tick of every output) and
       ``E[x_oj^2] = sum_k G_o,jk^2 (lc_k + lu_k) + white G_o,jj``; summed over lines
       these are small least-squares problems (clipped at zero: a start for step 3).
    3. Maximum likelihood by expectation-maximisation from that guess: the posterior of
       every sampled line's coefficients under the current prior gives the new prior
       variance of mode j as the mean of ``(mean_j - pattern_j)^2 + var_j`` over lines,
       and the prior mean (``pattern``: what is the same in every line, such as the
       picture frame's mean shape) as the mean of ``mean_j``.  This accounts exactly for
       the gaps of every line, so the strong low modes (the banding) do not leak into
       the estimates of weak ones.  EM alone creeps towards a weak mode's variance
       (most of each step's posterior is the prior itself), so its steps are
       extrapolated (SQUAREM): a weak mode's variance is no longer left near its start.
    """
    n_out, length, n_seg = data.shape
    used = np.flatnonzero(mask.any(axis=(0, 1)))
    if used.size > _COVARIANCE_LINES:
        used = used[np.round(np.linspace(0, used.size - 1, _COVARIANCE_LINES)).astype(int)]
    # (np.take gathers along the last axis ~8x faster than fancy indexing)
    sample_data, sample_mask = np.take(data, used, axis=2), np.take(mask, used, axis=2)
    # (segment, output, tick) for the sample.
    m = sample_mask.transpose(2, 0, 1)
    z = sample_data.transpose(2, 0, 1).astype(np.float64)
    # What is the same in every line (the picture frame's mean shape, a fixed pattern)
    # is left in the data: the model must follow it.  It becomes the prior's mean (step
    # 3); taking it out of the data made the per-output modes too weak to follow a
    # strong picture frame (docs/algorithm.md).
    white = _white_level(z, m)

    if max_modes is None:
        max_modes = int(opts["max_modes"])
    n_common = int(min(length // 2, max_modes))
    n_output = int(min(length // 2, max(1, max_modes // 2))) if n_out > 1 else 0
    mf = m.astype(np.float64)
    lam_common, lam_output = _first_guess(z, mf, white, n_common, n_output)

    fraction = float(np.median(mf.mean(axis=2).mean(axis=1)))
    fraction = max(fraction, 1.0 / length)
    noise_common = white / (n_out * fraction)
    noise_output = white / fraction
    # A mode is worth fitting where its prior is a useful fraction of the noise of its
    # estimate and clearly above the sampling error of the prior estimate itself
    # (relative error sqrt(2 / samples) of a variance; one sample per line and mode,
    # per line, output and mode for the per-output part).
    error_common = 2.0 * math.sqrt(2.0 / len(used))
    error_output = 2.0 * math.sqrt(2.0 / (len(used) * n_out))

    def worth(lam, noise, error, limit):
        return _modes_worth_fitting(lam - error * (lam + noise), noise, limit, _MIN_SNR)

    n_common = worth(lam_common, noise_common, error_common, n_common)
    floor = 1e-6 * white
    if n_out > 1:
        n_output = worth(lam_output, noise_output, error_output, n_output)
        # The per-output modes are the leading modes of the common basis: the common
        # part gets at least as many (their own prior keeps the extra ones small).
        n_common = max(n_common, n_output)
        # The alternating-column mode: first guess from its masked projections,
        # E[(psi^T m z)^2] = lacn c^2 + white c with c = sum(m) / L.
        psi = (-1.0) ** np.arange(length) / math.sqrt(length)
        x_alt = z @ psi
        c = mf.sum(axis=-1) / length
        lam_alt = (x_alt**2 - white * c).sum() / max((c * c).sum(), 1e-12)
        lam_output = np.append(lam_output[:n_output], lam_alt)
    # Expectation-maximisation cannot bring back a variance that starts at zero (its
    # posterior is then zero too), and the first guess can put a mode's power in
    # another one (of two nearly collinear columns, one may be clipped to zero).  Every mode
    # kept starts at least at a fraction of the noise of its estimate, from where EM
    # moves it up or down.
    start = _EM_START * np.concatenate([np.full(n_common, noise_common),
                                        np.full(lam_output.size, noise_output)])
    lam_start = np.maximum(np.concatenate([lam_common[:n_common], lam_output]), start)
    prior = _Prior(np.maximum(lam_start[:n_common], floor),
                   np.maximum(lam_start[n_common:], floor), white, 0.0)
    solver = _Solver(sample_data, sample_mask, prior, keep_factors=False)
    pattern = _maximum_likelihood(solver, prior, floor)
    n_u = prior.n_output
    lam_common, lam_output = prior.common, prior.output
    keep_common = worth(lam_common, noise_common, error_common, n_common)
    excluded = 0.0
    keep_pattern = np.zeros(pattern.size, dtype=bool)
    if n_u:
        dct_output = lam_output[:-1]
        keep_output = worth(dct_output, noise_output, error_output, n_u - 1) \
            if dct_output.size else 0
        keep_common = max(keep_common, keep_output)
        excluded += float(dct_output[keep_output:].sum()) / length
        lam_output = np.append(dct_output[:keep_output], lam_output[-1])
        per_output = keep_pattern[n_common:].reshape(n_out, n_u)
        per_output[:, :keep_output] = True
        per_output[:, -1] = True
    keep_pattern[:keep_common] = True
    excluded += float(lam_common[keep_common:].sum()) / length
    result = _Prior(lam_common[:keep_common], lam_output, white + excluded, excluded)
    result.pattern = pattern[keep_pattern]
    return result


def _maximum_likelihood(solver, prior, floor):
    """Step 3 of :func:`_empirical_prior`: the prior's variances (set in ``prior``) and
    mean (returned: the pattern common to all lines, such as the picture frame's mean
    shape) by expectation-maximisation over the sampled lines of ``solver``.

    EM moves a weak mode's variance towards its maximum likelihood slowly (each step
    keeps most of the prior where the data say little), so its steps are extrapolated
    (SQUAREM, Varadhan & Roland 2008) in log variance.  Variances stay above ``floor``.
    """
    n_common, n_u, n_out = prior.n_common, prior.n_output, solver.n_out
    n_lines = solver.data.shape[2]
    n_lam = n_common + n_u
    n_pattern = n_common + n_out * n_u if n_u else n_common
    spread = np.zeros(n_pattern)  # of the lines' estimates about the pattern (last step)

    def em_map(state):
        """One EM update of (log variances, pattern)."""
        lam = np.maximum(np.exp(state[:n_lam]), floor)
        prior.common, prior.output = lam[:n_common], lam[n_common:]
        prior.mean = np.broadcast_to(state[n_lam:], (n_lines, n_pattern))
        coef, variances = solver.solve(variances=True)
        pattern = coef.mean(axis=0)
        deviation = coef - pattern
        spread[:] = (deviation * deviation).mean(axis=0)
        second = deviation * deviation + variances
        new = [second[:, :n_common].mean(axis=0)]
        if n_u:
            new.append(second[:, n_common:].reshape(n_lines, n_out, n_u).mean(axis=(0, 1)))
        return np.concatenate([np.log(np.maximum(np.concatenate(new), floor)), pattern])

    state = np.concatenate([np.log(np.concatenate([prior.common, prior.output])),
                            np.zeros(n_pattern)])
    for _ in range(_EM_CYCLES):
        first = em_map(state)
        second = em_map(first)
        # Only the log variances are extrapolated: the pattern is EM's own (a line
        # pattern extrapolated where the data barely constrain it, such as across a
        # wide gap, can run away).
        r = (first - state)[:n_lam]
        v = (second - first)[:n_lam] - r
        alpha = -math.sqrt(float(r @ r) / max(float(v @ v), 1e-300))
        alpha = min(max(alpha, -_EM_MAX_STEP), -1.0)
        jumped = second.copy()
        jumped[:n_lam] = state[:n_lam] - 2.0 * alpha * r + alpha * alpha * v
        if not np.all(np.isfinite(jumped)):
            jumped = second
        new_state = em_map(jumped)
        change = np.max(np.abs(new_state[:n_lam] - state[:n_lam]))
        state = new_state
        if change < _EM_TOLERANCE:
            break
    lam = np.maximum(np.exp(state[:n_lam]), floor)
    prior.common, prior.output = lam[:n_common], lam[n_common:]
    # The pattern is a mean over n lines, uncertain by spread / n: shrunk towards zero
    # where it is not clearly larger than that (positive-part James-Stein), so that a
    # few lines' chance pattern is not imposed on the lines without background.
    pattern = state[n_lam:]
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = 1.0 - spread / (n_lines * pattern * pattern)
    return pattern * np.clip(np.nan_to_num(shrink, nan=0.0, neginf=0.0), 0.0, 1.0)


def _first_guess(z, mf, white, n_common, n_output):
    """First guess of the common and per-output mode variances (step 2 of
    :func:`_empirical_prior`): small least-squares problems, clipped at zero, on the masked
    second moments of the projections.  ``z``, ``mf``: (line, output, tick) data and
    float mask of the sampled lines; returns ``(lam_common, lam_output)``.
    """
    n_out, length = z.shape[1:]
    basis = _dct_basis(length, n_common)
    maker = _GramMaker(length, n_common)
    sums = maker.sums(mf)  # (S, O, 2 Jc - 1)
    x = z @ basis
    # Sums over lines of the Gram matrices' squares, formed 64 lines at a time (all of
    # them at once are megabytes of fresh memory).
    diag = np.arange(n_common)
    auto_lhs = np.zeros((n_common, n_common))
    cross_sq = np.zeros((n_common, n_common))
    white_col = np.zeros(n_common)
    for s0 in range(0, len(sums), 64):
        g = maker.from_sums(sums[s0 : s0 + 64])  # (lines, O, Jc, Jc)
        auto_lhs += (g * g).sum(axis=(0, 1))
        white_col += g[..., diag, diag].sum(axis=(0, 1))
        if n_out > 1:
            g_sum = g.sum(axis=1)
            cross_sq += (g_sum * g_sum).sum(axis=0)
    auto_rhs = (x * x).sum(axis=(0, 1)) - white * white_col
    if n_out > 1:
        cross_lhs = cross_sq - auto_lhs
        cross_rhs = (x.sum(axis=1) ** 2).sum(axis=0) - (x * x).sum(axis=(0, 1))
        lam_common = _clipped_lstsq(cross_lhs, cross_rhs)
        lam_output = _clipped_lstsq(auto_lhs, auto_rhs - auto_lhs @ lam_common)[:n_output]
    else:
        lam_common = _clipped_lstsq(auto_lhs, auto_rhs)
        lam_output = np.zeros(0)
    return lam_common, lam_output


def _white_level(z, m):
    """White-noise variance from background pixels two ticks apart (median-based)."""
    both = m[..., 2:] & m[..., :-2]
    diff = (z[..., 2:] - z[..., :-2])[both]
    if diff.size < 10:
        values = z[m]
        white = float(np.var(values)) if values.size > 1 else 1.0
        return white if white > _WHITE_FLOOR else _WHITE_FLOOR
    if diff.size > 400_000:
        diff = diff[:: diff.size // 400_000]
    # A difference of two independent pixels has twice the variance of one.
    white = float((1.4826 * np.median(np.abs(diff))) ** 2 / 2.0) or float(np.var(diff) / 2)
    if not white > 0:  # the sampled lines are constant (a nearly blank image)
        values = z[m]
        white = float(np.var(values)) if values.size > 1 else 0.0
    # Never zero: the Gram matrices are divided by it.
    return white if white > _WHITE_FLOOR else _WHITE_FLOOR


def _clipped_lstsq(lhs, rhs):
    """Least squares clipped at zero: a first guess of variances, refined by EM."""
    return np.maximum(np.linalg.lstsq(lhs, rhs, rcond=None)[0], 0.0)


@functools.lru_cache(maxsize=8)
def _dct_basis(length, n_modes):
    """Orthonormal DCT-II basis vectors as columns, (length, n_modes)."""
    t = np.arange(length) + 0.5
    j = np.arange(n_modes)
    basis = np.cos(np.pi * np.outer(t, j) / length) * math.sqrt(2.0 / length)
    basis[:, 0] = math.sqrt(1.0 / length)
    basis.setflags(write=False)
    return basis


def _modes_worth_fitting(prior_variance, noise_variance, max_modes, threshold):
    """Number of leading modes worth fitting.

    A mode is useful where its prior variance is at least ``threshold`` times the noise
    variance of its estimate.  The count ends at the first run of ``_GAP_MODES`` modes
    that are not, so that one noisy estimate far up the spectrum does not drag in every
    mode below it.
    """
    useful = prior_variance[:max_modes] >= threshold * noise_variance
    n = useful.size
    for j in range(useful.size):
        if not useful[j : j + _GAP_MODES].any():
            n = j
            break
    return int(max(n, 1))


class _GramMaker:
    """Gram matrices ``D^T diag(m) D`` of the first DCT modes, from masked cosine sums.

    Products of two cosines are cosines of the sum and the difference of their
    frequencies, so the J x J Gram matrix is a Hankel plus a Toeplitz matrix of the
    2J - 1 sums ``c_f = sum_t m(t) cos(pi f (t + 1/2) / L)``:
    ``G_jk = s_j s_k (c_{j+k} + c_{|j-k|}) / 2``.  Both are built as strided views.
    """

    def __init__(self, length, n_modes):
        self.n_modes = n_modes
        t = np.arange(length) + 0.5
        cosines = np.cos(np.pi * np.outer(t, np.arange(2 * n_modes - 1)) / length)
        self.cosines = cosines.astype(np.float32)
        j = np.arange(n_modes)
        scale = np.where(j == 0, math.sqrt(1.0 / length), math.sqrt(2.0 / length))
        self.scale = 0.5 * np.outer(scale, scale)

    def sums(self, mask):
        """Masked cosine sums, (..., 2J - 1), from a 0/1 mask (..., L)."""
        return (mask.astype(np.float32) @ self.cosines).astype(np.float64)

    def sums_along_ticks(self, mask):
        """Masked cosine sums (S, O, 2J - 1) from a 0/1 mask (O, L, S)."""
        return (self.cosines.T @ mask).transpose(2, 0, 1).astype(np.float64)

    def from_sums(self, sums, rows=None, scale=1.0, out=None):
        """Gram matrices (..., rows, J) from cosine sums, times ``scale``; ``rows``
        leading rows only; into ``out`` when given."""
        from numpy.lib.stride_tricks import sliding_window_view

        j = self.n_modes
        rows = j if rows is None else rows
        hankel = sliding_window_view(sums, j, axis=-1)[..., :rows, :]
        mirrored = np.concatenate([sums[..., j - 1 : 0 : -1], sums[..., :j]], axis=-1)
        toeplitz = sliding_window_view(mirrored, j, axis=-1)[..., ::-1, :][..., :rows, :]
        # C order (the sum of the strided views would be laid out like them, with
        # the stack axis innermost, which makes every stacked solve copy it).
        gram = np.add(hankel, toeplitz, out=np.empty(hankel.shape) if out is None else out)
        gram *= self.scale[:rows] * scale
        return gram


# --------------------------------------------------------------------------------------
# The batched conditional mean
# --------------------------------------------------------------------------------------


class _Solver:
    """Posterior of the coefficients of every segment, batched over segments.

    Unknowns per segment: common DCT coefficients ``a`` (Jc) and, per output, ``b_o``
    (Ku = Ju + 1 each): the leading Ju DCT modes and the alternating-column mode
    ``(-1)^t / sqrt(L)`` (even and odd columns of an output drift apart from line to
    line: alternating column noise, Rauscher 2015).  With ``U`` the per-output basis
    and Gram matrices divided by the white variance, the precision is

        [ sum_o D^T M_o D + Lc^-1     D^T M_o U          ]
        [ U^T M_o D                   U^T M_o U + Lu^-1  ]   (block diagonal over o)

    The per-output blocks are eliminated first (a Schur complement), which leaves one
    Jc x Jc system per segment.
    """

    def __init__(self, data, mask, prior, keep_factors=True):
        # The pixel arrays are (output, tick, segment): the DMS layout of a full frame.
        # The small per-segment matrices are (segment, ...).
        self.data = data
        self.mask = mask
        self.prior = prior
        n_out, length, n_seg = data.shape
        self.n_out = n_out
        self.length = length
        self.jc = prior.n_common
        self.ku = prior.n_output if n_out > 1 else 0  # DCT modes + the alternating mode
        self.ju = max(self.ku - 1, 0)
        self.basis = _dct_basis(length, self.jc)
        self._basis32 = self.basis.astype(np.float32)
        self.alternating = ((-1.0) ** np.arange(length)) / math.sqrt(length)
        self.basis_u = np.concatenate(
            [_dct_basis(length, max(self.jc, self.ju))[:, : self.ju],
             self.alternating[:, None]], axis=1) if self.ku else np.zeros((length, 0))
        self._gram_maker = _GramMaker(length, self.jc)
        self.white = prior.white
        if prior.pattern is not None:
            prior.mean = np.broadcast_to(prior.pattern, (n_seg, prior.pattern.size))
        # Keep every segment's eliminated system after a solve (for pixel_variance).
        self.keep_factors = keep_factors
        self._schur = None
        # Segments whose Gram matrices changed since the last solve (outliers).
        self.changed = np.zeros(0, dtype=int)
        self._build()

    def _build(self):
        """Gram matrices and right-hand sides of every segment (white variance units),
        in blocks of segments."""
        jc, ku, n_out = self.jc, self.ku, self.n_out
        n_seg = self.data.shape[2]
        # The common Gram matrices are kept as their 2 Jc - 1 cosine sums, summed over
        # the outputs (each solve forms its block's matrices from them: less memory to
        # fill than the matrices themselves).
        self.cosine_sums = np.empty((n_seg, 2 * jc - 1))
        self.rhs = np.empty((n_seg, n_out, jc))
        self.gram_rows = np.empty((n_seg, n_out, ku, jc))
        self.gram_u = np.empty((n_seg, n_out, ku, ku))
        self.rhs_u = np.empty((n_seg, n_out, ku))
        # One product gives the masked cosine sums (the DCT Gram matrices) and, for the
        # per-output part, the DCT projections of the masked alternating mode.
        left = self._gram_maker.cosines.T
        if ku:
            left = np.concatenate(
                [left, self._basis32.T * self.alternating.astype(np.float32)], axis=0)
        left = np.ascontiguousarray(left)

        for s0 in range(0, n_seg, _SOLVE_BLOCK):
            self._build_block(slice(s0, min(s0 + _SOLVE_BLOCK, n_seg)), left)

    def _build_block(self, segments, left):
        """:meth:`_build` for the segments ``segments`` (a slice)."""
        maker, jc, ju, ku = self._gram_maker, self.jc, self.ju, self.ku
        n_cos = 2 * jc - 1
        mask = self.mask[:, :, segments].astype(np.float32)  # (O, L, S)
        values = self.data[:, :, segments]
        products = (left @ mask).transpose(2, 0, 1).astype(np.float64)  # (S, O, ...)
        sums = products[..., :n_cos]
        sums.sum(axis=1, out=self.cosine_sums[segments])
        projected = (self._basis32.T @ values).transpose(2, 0, 1)  # (S, O, Jc)
        rhs = self.rhs[segments]
        np.divide(projected, self.white, out=rhs)
        if not ku:
            return
        rows = self.gram_rows[segments]
        maker.from_sums(sums, rows=ju, scale=1.0 / self.white, out=rows[..., :ju, :])
        np.divide(products[..., n_cos:], self.white, out=rows[..., ju, :])
        gram_u = self.gram_u[segments]
        gram_u[..., :ju, :ju] = rows[..., :ju, :ju]
        gram_u[..., ju, :ju] = gram_u[..., :ju, ju] = rows[..., ju, :ju]
        gram_u[..., ju, ju] = mask.sum(axis=1).T / (self.length * self.white)
        rhs_u = self.rhs_u[segments]
        rhs_u[..., :ju] = rhs[..., :ju]
        rhs_u[..., ju] = (self.alternating.astype(np.float32) @ values).T / self.white

    def solve(self, variances=False, previous=None):
        """Posterior means of all coefficients, (segments, Jc + outputs * Ku).

        With ``variances``, also their posterior variances, from the same factors.
        With ``previous`` (the coefficients of the last solve, under the same prior),
        only the segments whose Gram matrices changed since (:attr:`changed`) are
        solved again.
        Blocks of ``_SOLVE_BLOCK`` segments are solved at once (small temporaries).
        With ``keep_factors`` (the default), the eliminated systems of every segment
        are kept for :meth:`pixel_variance`.
        """
        n_seg = self.cosine_sums.shape[0]
        n_coef = self.jc + self.n_out * self.ku
        if self.keep_factors and self._schur is None:
            self._schur = np.empty((n_seg, self.jc, self.jc))
            self._h_inv = np.empty(self.gram_u.shape)
            self._coupling = np.empty(self.gram_rows.shape)
        var = np.empty((n_seg, n_coef)) if variances else None
        if previous is None or variances:
            coef = np.empty((n_seg, n_coef))
            segments = None
        else:
            coef = previous.copy()
            segments = self.changed

        for s0 in range(0, n_seg if segments is None else len(segments), _SOLVE_BLOCK):
            if segments is None:
                rows = slice(s0, min(s0 + _SOLVE_BLOCK, n_seg))
            else:
                rows = segments[s0 : s0 + _SOLVE_BLOCK]
            self._solve_block(rows, coef, var)
        self.changed = np.zeros(0, dtype=int)
        return (coef, var) if variances else coef

    def _eliminated(self, rows, keep=False):
        """The per-output blocks eliminated for the segments ``rows`` (a slice or an
        index array) under the current prior.

        Returns ``(schur, rhs_c, h_inv, coupling, h_inv_r)``: the Schur complements
        (S, Jc, Jc) and their right-hand sides, the inverses of the per-output blocks
        ``H_o``, ``K_o = H_o^-1 U^T M_o D`` and ``H_o^-1 r_u`` (None without per-output
        modes).  With ``keep``, also stored in the kept arrays.
        """
        jc, ku, n_out = self.jc, self.ku, self.n_out
        # The Gram matrices are divided by the white variance, so the coefficients and
        # the prior precisions are in data units.
        inv_c = 1.0 / self.prior.common
        mean = self.prior.mean
        schur = self._gram_maker.from_sums(self.cosine_sums[rows], scale=1.0 / self.white)
        schur[:, np.arange(jc), np.arange(jc)] += inv_c
        rhs_c = self.rhs[rows].sum(axis=1)
        if mean is not None:
            rhs_c += inv_c * mean[rows, :jc]
        if not ku:
            if keep:
                self._schur[rows] = schur
            return schur, rhs_c, None, None, None
        inv_u = 1.0 / self.prior.output
        gram_rows = self.gram_rows[rows]  # (S, O, Ku, Jc)
        h = self.gram_u[rows].copy()
        h[..., np.arange(ku), np.arange(ku)] += inv_u
        rhs_u = self.rhs_u[rows]
        if mean is not None:
            rhs_u = rhs_u + inv_u * mean[rows, jc:].reshape(-1, n_out, ku)
        # H_o^-1 [U^T M_o D | r_u]: the coupling and the eliminated rhs, from the
        # explicit inverses of these small blocks (their inverse Cholesky factors
        # squared: cheaper than any solve).
        h_inv = _inverse_small_spd(h)
        coupling = h_inv @ gram_rows
        h_inv_r = (h_inv @ rhs_u[..., None])[..., 0]
        # Sums over the outputs as one product per segment: (Jc, O Ku) x (O Ku, Jc).
        n_seg = len(schur)
        rows_flat = gram_rows.reshape(n_seg, n_out * ku, jc)
        schur -= np.swapaxes(rows_flat, 1, 2) @ coupling.reshape(n_seg, n_out * ku, jc)
        rhs_c -= (h_inv_r.reshape(n_seg, 1, n_out * ku) @ rows_flat)[:, 0, :]
        if keep:
            self._schur[rows], self._h_inv[rows] = schur, h_inv
            self._coupling[rows] = coupling
        return schur, rhs_c, h_inv, coupling, h_inv_r

    def _solve_block(self, rows, coef, var):
        """:meth:`solve` for the segments ``rows`` (a slice or an index array); writes
        ``coef`` (and ``var``) there."""
        jc, ku, n_out = self.jc, self.ku, self.n_out
        schur, rhs_c, h_inv, coupling, h_inv_r = self._eliminated(rows, self.keep_factors)
        if var is not None:
            # One inverse Cholesky factor of every Schur complement serves the means
            # and the variances (an LU solve plus an inverse cost three times more).
            factor = _spd_factor(schur)
            a = _factor_solve(factor, rhs_c[..., None])[..., 0]
            var[rows] = self._variances(factor, h_inv, coupling)
        else:
            a = _cholesky_solve(schur, rhs_c)
        coef[rows, :jc] = a
        if ku:
            n_seg = len(a)
            coef[rows, jc:] = h_inv_r.reshape(n_seg, -1) - (
                coupling.reshape(n_seg, n_out * ku, jc) @ a[:, :, None])[..., 0]

    def _variances(self, factor, h_inv, coupling):
        """Posterior variances from the inverse factors of the Schur complements
        (:func:`_spd_factor`), the inverses of the per-output blocks and the coupling
        ``K_o`` of some segments."""
        # S^-1 = F^T F: its diagonal is the column sums of F squared.
        var_a = np.einsum("pim,pim->mi", factor, factor)
        if not self.ku:
            return var_a
        # Var(b_o) = H_o^-1 + K_o S^-1 K_o^T, whose diagonal is that of H_o^-1 plus
        # the column sums of (F K_o^T) squared.
        n_seg = var_a.shape[0]
        k = coupling.reshape(n_seg, self.n_out * self.ku, self.jc)
        fk = np.ascontiguousarray(np.moveaxis(factor, -1, 0)) @ np.swapaxes(k, 1, 2)
        var_b = np.einsum("mpr,mpr->mr", fk, fk)
        var_b += np.diagonal(h_inv, axis1=-2, axis2=-1).reshape(n_seg, -1)
        return np.concatenate([var_a, var_b], axis=1)

    def evaluate(self, coef, dtype=np.float64, segments=slice(None), out=None,
                 flipped=()):
        """Model of the ``segments`` (a slice), (outputs, length, segments).

        The common part is evaluated once (one product) and added to every output's
        own modes, written into ``out`` (outputs, length, segments) when given; the
        outputs in ``flipped`` are written in reverse tick order (as a full frame's
        odd outputs sit in the DMS image).
        """
        jc, ku = self.jc, self.ku
        basis = self._basis32 if dtype == np.float32 else self.basis
        coef = coef[segments].astype(basis.dtype)
        if out is None:
            out = np.empty((self.n_out, self.length, len(coef)), dtype=dtype)
        common = basis @ np.ascontiguousarray(coef[:, :jc].T)  # (L, S)
        basis_u = self.basis_u.astype(basis.dtype)
        reverse_u = np.ascontiguousarray(basis_u[::-1])
        for o in range(self.n_out):
            flip = o in flipped
            shared = common[::-1] if flip else common
            if ku:
                own = np.ascontiguousarray(coef[:, jc + o * ku : jc + (o + 1) * ku].T)
                np.matmul(reverse_u if flip else basis_u, own, out=out[o])
                out[o] += shared
            else:
                out[o] = shared
        return out

    def reject_outliers(self, coef, threshold):
        """Drop background pixels whose residual exceeds ``threshold`` sigma; count them.

        The sigma is the white level of the exposure.  The dropped pixels' terms are
        subtracted from the Gram matrices and right-hand sides (no rebuild): their
        cosine sums, summed per segment and output, give the Gram terms as in
        :meth:`_build`.  The residuals are formed in blocks of segments.
        """
        n_seg = self.data.shape[2]
        limit = np.float32(threshold * math.sqrt(self.prior.white))

        def find(s0):
            rows = slice(s0, min(s0 + _SOLVE_BLOCK, n_seg))
            residual = self.evaluate(coef, np.float32, rows)
            residual -= self.data[:, :, rows]
            np.abs(residual, out=residual)
            bad = residual > limit
            bad &= self.mask[:, :, rows]
            out, tick, seg = np.unravel_index(np.flatnonzero(bad), bad.shape)
            return out, tick, seg + s0

        found = [find(s0) for s0 in range(0, n_seg, _SOLVE_BLOCK)]
        out, tick, seg = (np.concatenate(part) for part in zip(*found, strict=True))
        if seg.size == 0:
            return 0
        flat = np.ravel_multi_index((out, tick, seg), self.data.shape)
        jc, ju, ku, n_out = self.jc, self.ju, self.ku, self.n_out
        values = np.take(self.data, flat).astype(np.float64)
        d = self.basis[tick]  # (n, Jc)
        # Per bad pixel: cosine sums, then (with per-output modes) the alternating
        # mode's DCT row and right-hand side, and its own square.
        parts = [self._gram_maker.cosines[tick].astype(np.float64), d * values[:, None]]
        if ku:
            psi = self.alternating[tick]
            parts += [d * psi[:, None], (psi * values)[:, None], (psi * psi)[:, None]]
        terms = np.concatenate(parts, axis=1)
        # Sums per (segment, output), in segment order.
        key = seg * n_out + out
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        raw = np.add.reduceat(terms[order], starts, axis=0)
        sums = raw / self.white
        s_seg, s_out = np.divmod(key[starts], n_out)
        self.changed = np.union1d(self.changed, s_seg)
        n_cos = 2 * jc - 1
        cos_sums = sums[:, :n_cos]
        self.rhs[s_seg, s_out] -= sums[:, n_cos : n_cos + jc]
        # Per segment: the outputs summed.
        seg_starts = np.flatnonzero(np.r_[True, s_seg[1:] != s_seg[:-1]])
        per_segment = np.add.reduceat(raw[:, :n_cos], seg_starts, axis=0)
        self.cosine_sums[s_seg[seg_starts]] -= per_segment
        if ku:
            rows = np.empty((len(s_seg), ku, jc))
            rows[:, :ju] = self._gram_maker.from_sums(cos_sums, rows=ju)
            rows[:, ju] = sums[:, n_cos + jc : n_cos + 2 * jc]
            self.gram_rows[s_seg, s_out] -= rows
            gram_u = np.empty((len(s_seg), ku, ku))
            gram_u[:, :ju, :ju] = rows[:, :ju, :ju]
            gram_u[:, ju, :ju] = gram_u[:, :ju, ju] = rows[:, ju, :ju]
            gram_u[:, ju, ju] = sums[:, -1]
            self.gram_u[s_seg, s_out] -= gram_u
            self.rhs_u[s_seg, s_out, :ju] -= sums[:, n_cos : n_cos + ju]
            self.rhs_u[s_seg, s_out, ju] -= sums[:, -2]
        np.put(self.mask, flat, False)
        np.put(self.data, flat, 0.0)
        return int(flat.size)

    def coefficient_variances(self, rows=slice(None)):
        """Posterior variances of the coefficients of these segments, under the
        current prior and Gram matrices (those of the last solve)."""
        schur, _, h_inv, coupling, _ = self._eliminated(rows)
        return self._variances(_spd_factor(schur), h_inv, coupling)

    def share_neighbours(self, coef):
        """Prior means from the neighbouring segments (leave-one-out), chosen per coefficient.

        For every coefficient, the prior mean of a line is a Gaussian-weighted mean of
        the other lines' estimates; the width (or no sharing at all) is the one that
        predicts the lines' own estimates best.  The prior variance about that mean is,
        by the law of total variance, the mean squared prediction error plus the mean
        posterior variance of the estimates.  Returns the coefficients that share.
        """
        has_data = self.mask.any(axis=(0, 1)).astype(np.float64)
        n_seg = coef.shape[0]
        # (coefficient, segment): the transforms run along contiguous rows.
        values = np.ascontiguousarray(coef.T)
        weighted = values * has_data
        # Without sharing, the prior mean is the pattern common to all lines (or zero).
        best_mean = np.zeros_like(values)
        if self.prior.pattern is not None:
            best_mean[:] = self.prior.pattern[:, None]
        best_error = (((values - best_mean) ** 2) * has_data).sum(axis=1)
        best_width = np.zeros(coef.shape[1])
        nfft = 2 * n_seg
        f_val = np.fft.rfft(weighted, n=nfft, axis=1)
        f_has = np.fft.rfft(has_data, n=nfft)
        lags = np.arange(nfft)
        lags = np.minimum(lags, nfft - lags)
        for width in _SHARE_WIDTHS[1:]:
            kernel = np.exp(-0.5 * (lags / width) ** 2)
            kernel[0] = 0.0  # leave the line itself out
            f_kernel = np.fft.rfft(kernel)
            num = np.fft.irfft(f_val * f_kernel, n=nfft, axis=1)[:, :n_seg]
            den = np.fft.irfft(f_has * f_kernel, n=nfft)[:n_seg]
            mean = num / np.maximum(den, 1e-12)
            mean[:, den < 1e-6] = 0.0
            error = (((values - mean) ** 2) * has_data).sum(axis=1)
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_mean[better] = mean[better]
            best_width[better] = width
        best_mean = np.ascontiguousarray(best_mean.T)
        shared = best_width > 0
        n_data = max(has_data.sum(), 1.0)
        sample = np.flatnonzero(has_data)[:: max(1, int(n_data) // 256)]
        mean_post_var = self.coefficient_variances(sample).mean(axis=0)
        spread = best_error / n_data + mean_post_var
        prior = self.prior
        jc = self.jc
        lam = np.concatenate([prior.common, np.tile(prior.output, self.n_out)])
        new_lam = np.where(shared, np.maximum(spread, 1e-6 * prior.white), lam)
        prior.common = new_lam[:jc]
        if self.ku:
            # One variance per output mode (pooled over the outputs).
            prior.output = new_lam[jc:].reshape(self.n_out, self.ku).mean(axis=0)
        prior.mean = best_mean
        return shared

    def pixel_variance(self, out=None, flipped=()):
        """Posterior variance of the noise at every pixel, (outputs, length, segments).

        With the per-output modes eliminated, ``v = xi^T S^-1 xi + u^T H_o^-1 u`` where
        ``u(t)`` is the per-output basis at tick t and ``xi = phi - K_o^T u``.  Splitting
        ``u`` into its DCT part and the alternating mode ``psi(t) = (-1)^t / sqrt(L)``,
        ``v(t) = phi^T P phi + 2 psi q^T phi + r psi^2``, where ``P`` is ``S^-1`` (the
        same for the four outputs) plus terms in the rows and columns of the Ju
        per-output DCT modes only.  A quadratic form ``phi^T P phi`` is a cosine series
        of twice the highest mode (products of cosines: sums along P's diagonals and
        anti-diagonals), so every output's variance is one series in ``cos`` and
        ``psi cos``, evaluated with one product per output on half the ticks (the
        other half mirrors them).  The power of the modes left out of the model is
        added: it stays in the data.  Blocks of ``_SOLVE_BLOCK`` segments.

        Written into ``out`` (float32, outputs x length x segments) when given, the
        outputs in ``flipped`` in reverse tick order (as in :meth:`evaluate`).
        """
        jc, ju, ku, n_out = self.jc, self.ju, self.ku, self.n_out
        n_seg = self._schur.shape[0]
        if out is None:
            out = np.empty(self.data.shape, dtype=np.float32)
        # Every output's ticks in the order it is written.
        ticks = [out[o, ::-1] if o in flipped else out[o] for o in range(n_out)]
        halves = _mirrored_series(self.length, jc, ku > 0)
        # Weights of a quadratic form's entries in its cosine series: phi_j phi_k =
        # s_j s_k (cos((j + k) x) + cos((j - k) x)) / 2.
        weight = self._gram_maker.scale
        for s0 in range(0, n_seg, _SOLVE_BLOCK):
            rows = slice(s0, min(s0 + _SOLVE_BLOCK, n_seg))
            s_inv = _inverse_spd(self._schur[rows])  # (S, Jc, Jc)
            series = _diagonal_sums(s_inv * weight)  # (S, 2 Jc - 1)
            series[:, 0] += self.prior.excluded
            if not ku:
                _evaluate_mirrored(halves, series, ticks[0][:, rows])
                for o in range(1, n_out):
                    ticks[o][:, rows] = ticks[0][:, rows]
                continue
            n_blk = series.shape[0]
            k = self._coupling[rows]  # (S, O, Ku, Jc): K_o, its last row the alternating
            h_inv = self._h_inv[rows]
            ks = (k.reshape(n_blk, n_out * ku, jc) @ s_inv).reshape(k.shape)  # K_o S^-1
            ksk = ks @ np.swapaxes(k, -1, -2)  # K_o S^-1 K_o^T, (S, O, Ku, Ku)
            w = ks[..., :ju, :]
            # P - S^-1, rows of the per-output DCT modes (symmetric): -W - W^T + W K_d^T
            # + H^-1 in the leading Ju x Ju block, -W beyond it, counted twice there
            # (for the columns' mirror image).
            band = -2.0 * w
            band[..., :ju] = ksk[..., :ju, :ju] + h_inv[..., :ju, :ju] - w[..., :ju]
            band[..., :ju] -= np.swapaxes(w[..., :ju], -1, -2)
            # Coefficients of every output: the series of P, then those of psi phi
            # (q, with the constant r psi^2 = r / L in the series' constant term).
            coef = np.empty((n_out, n_blk, 3 * jc - 1))
            coef[..., : 2 * jc - 1] = series[None]
            band_sums = _diagonal_sums(band * weight[:ju]).transpose(1, 0, 2)
            coef[..., : jc + ju - 1] += band_sums
            coef[..., 0] += ((ksk[..., ju, ju] + h_inv[..., ju, ju]) / self.length).T
            q = -ks[..., ju, :]
            q[..., :ju] += ksk[..., :ju, ju] + h_inv[..., ju, :ju]
            coef[..., 2 * jc - 1 :] = q.transpose(1, 0, 2)
            for o in range(n_out):
                _evaluate_mirrored(halves, coef[o], ticks[o][:, rows])
        return out


def _inverse_spd(matrices):
    """Inverses of a stack (S, k, k) of symmetric positive definite matrices.

    Recursive 2 x 2 block elimination (the Schur complement of the leading block),
    each level a few stacked products: about twice as fast as LAPACK's LU inverse one
    small matrix at a time.  Any matrix whose inverse comes out non-finite (not
    numerically positive definite) is inverted by LU instead.
    """
    inverse = _block_inverse(matrices)
    bad = ~np.isfinite(inverse).all(axis=(-2, -1))
    if bad.any():
        inverse[bad] = np.linalg.inv(matrices[bad])
    return inverse


def _block_inverse(matrices):
    """:func:`_inverse_spd` without the check."""
    k = matrices.shape[-1]
    if k == 0:
        return np.empty(matrices.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if k == 1:
            return 1.0 / matrices
        if k == 2:
            a, b, c = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 1]
            scale = 1.0 / (a * c - b * b)
            inverse = np.empty(matrices.shape)
            np.multiply(c, scale, out=inverse[:, 0, 0])
            np.multiply(a, scale, out=inverse[:, 1, 1])
            np.multiply(-b, scale, out=inverse[:, 0, 1])
            inverse[:, 1, 0] = inverse[:, 0, 1]
            return inverse
        h = k // 2
        a, b, c = matrices[:, :h, :h], matrices[:, :h, h:], matrices[:, h:, h:]
        a_inv = _block_inverse(a)
        x = a_inv @ b
        z_inv = _block_inverse(c - np.swapaxes(b, -1, -2) @ x)
        xz = x @ z_inv
        inverse = np.empty(matrices.shape)
        np.add(a_inv, xz @ np.swapaxes(x, -1, -2), out=inverse[:, :h, :h])
    np.negative(xz, out=inverse[:, :h, h:])
    inverse[:, h:, :h] = np.swapaxes(inverse[:, :h, h:], -1, -2)
    inverse[:, h:, h:] = z_inv
    return inverse


def _diagonal_sums(m):
    """Cosine series of the quadratic forms ``phi^T M phi`` given ``M`` times the weights.

    ``m`` is (..., r, k) with r <= k (the leading r rows of a matrix, already
    weighted); entry (j, l) goes to frequencies ``j + l`` and ``|j - l|``.  Returns
    (..., k + r - 1).  One pass per row (a loop over modes, not over segments).
    """
    r, k = m.shape[-2:]
    sums = np.zeros(m.shape[:-2] + (k + r - 1,))
    for j in range(r):
        row = m[..., j, :]
        sums[..., j : j + k] += row  # j + l
        sums[..., : k - j] += row[..., j:]  # l - j for l >= j
        if j:
            sums[..., j:0:-1] += row[..., :j]  # j - l for l < j
    return sums


@functools.lru_cache(maxsize=8)
def _mirrored_series(length, n_modes, alternating):
    """The functions of :meth:`_Solver.pixel_variance`'s series on the first half of
    the ticks, split by their symmetry about the middle of the line.

    The columns are ``cos(pi f (t + 1/2) / L)`` for f < 2 J - 1 and, with
    ``alternating``, ``2 psi(t) phi_j(t)`` for j < J.  At tick ``L - 1 - t`` a column
    is its value at t times ``(-1)^f`` (the cosines) or ``(-1)^(L - 1 + j)``
    (``psi phi_j``).  Returns ``(even, odd, even_columns, odd_columns)``: the values of
    the columns of each symmetry at ticks ``t < ceil(L / 2)``, and which columns.
    """
    t = np.arange(length) + 0.5
    freq = np.arange(2 * n_modes - 1)
    columns = [np.cos(np.pi * np.outer(t, freq) / length)]
    sign = [(-1.0) ** freq]
    if alternating:
        psi = (-1.0) ** np.arange(length) / math.sqrt(length)
        columns.append(2.0 * psi[:, None] * _dct_basis(length, n_modes))
        sign.append((-1.0) ** (length - 1 + np.arange(n_modes)))
    columns = np.concatenate(columns, axis=1)[: (length + 1) // 2]
    sign = np.concatenate(sign)
    even, odd = np.flatnonzero(sign > 0), np.flatnonzero(sign < 0)
    return (np.ascontiguousarray(columns[:, even]), np.ascontiguousarray(columns[:, odd]),
            even, odd)


def _evaluate_mirrored(halves, coef, out):
    """Write the series with coefficients ``coef`` (S, F) at every tick into ``out``
    (L, S): the even and odd parts on the first half of the ticks, their sum there
    and their difference at the mirrored ticks."""
    even, odd, even_columns, odd_columns = halves
    length = out.shape[0]
    sym = even @ np.ascontiguousarray(coef[:, even_columns].T)
    anti = odd @ np.ascontiguousarray(coef[:, odd_columns].T)
    np.add(sym, anti, out=out[: sym.shape[0]])
    np.subtract(sym[: length // 2], anti[: length // 2], out=out[::-1][: length // 2])


def _spd_factor(matrices):
    """Inverse Cholesky factors ``F`` (``A^-1 = F^T F``) of a stack of SPD matrices.

    ``matrices`` is (..., k, k); the factors are (k, k, N) with the stack flattened
    last, as :func:`nsclean.algorithm.core._inverse_factor` (the fft method's line
    fits) builds them, vectorised over the stack: LAPACK's per-matrix overhead
    dominates for these small matrices (the 2 x 2 to 8 x 8 per-output blocks, tens of
    thousands of them, and the Schur complements, whose means and variances one
    factor gives).  The matrices here are posterior precisions (a prior precision is
    added to every diagonal), so every pivot is positive.
    """
    from .core import _inverse_factor

    k = matrices.shape[-1]
    stack = np.ascontiguousarray(np.moveaxis(matrices.reshape(-1, k, k), 0, -1))
    return _inverse_factor(stack)[0]


def _factor_solve(factor, rhs):
    """``A^-1 rhs`` from the inverse factors of :func:`_spd_factor`; ``rhs`` (..., k, n)."""
    k = factor.shape[0]
    stacked = rhs.reshape(-1, k, rhs.shape[-1])
    # x = A^-1 b = F^T (F b)
    half = np.einsum("pqm,mqr->mpr", factor, stacked)
    return np.einsum("qpm,mqr->mpr", factor, half).reshape(rhs.shape)


def _inverse_small_spd(matrices):
    """Inverses ``F^T F`` of a stack of small SPD matrices (..., k, k), from their
    inverse Cholesky factors (:func:`_spd_factor`)."""
    factor = _spd_factor(matrices)
    return np.einsum("pqm,prm->mqr", factor, factor).reshape(matrices.shape)


def _cholesky_solve(matrices, rhs):
    """``solve(matrices, rhs)`` for a stack of SPD matrices (S, k, k), rhs (S, k).

    LAPACK's Cholesky factorisation of every matrix, then the two triangular solves
    vectorised over the stack (k steps each; numpy has no stacked triangular solve).
    """
    try:
        lower = np.linalg.cholesky(matrices)
    except np.linalg.LinAlgError:  # not numerically positive definite: LU
        return np.linalg.solve(matrices, rhs[..., None])[..., 0]
    k = matrices.shape[-1]
    y = np.empty_like(rhs)
    for i in range(k):
        y[:, i] = (rhs[:, i] - np.einsum("sj,sj->s", lower[:, i, :i], y[:, :i])) \
            / lower[:, i, i]
    x = np.empty_like(rhs)
    for i in range(k - 1, -1, -1):
        x[:, i] = (y[:, i] - np.einsum("sj,sj->s", lower[:, i + 1 :, i], x[:, i + 1 :])) \
            / lower[:, i, i]
    return x


# --------------------------------------------------------------------------------------
# Subarrays: kriging along the read-out time series
# --------------------------------------------------------------------------------------

# Exponents tried for the power-law spectrum of the subarray noise.
_ALPHAS = np.round(np.arange(0.2, 2.51, 0.05), 2)


@functools.lru_cache(maxsize=4)
def _power_law_covariances(n_samples, n_lags):
    """Autocovariance shapes of power-law spectra on a series of ``n_samples`` ticks.

    Row ``i`` is the autocovariance at lags ``0 .. n_lags - 1`` of noise whose power
    spectral density is ``f^-alpha`` (``alpha = _ALPHAS[i]``) from the lowest
    frequency of the series up to the Nyquist frequency, scaled to unit variance.
    """
    shapes = np.stack([_power_law_covariance(n_samples, alpha)[:n_lags]
                       for alpha in _ALPHAS])
    shapes.setflags(write=False)
    return shapes


# Kriging operators of recent covariances, least recently used first: the planes of a
# time series, which share one covariance (shared_covariance), share their solves.
_OPERATORS: dict = {}
_OPERATORS_LOCK = threading.Lock()
_OPERATOR_SETS = 4
_OPERATOR_BYTES = 48 * 2**20  # per set


@functools.lru_cache(maxsize=4)
def _power_law_covariance(n_samples, alpha):
    """Autocovariance shape of a power-law spectrum ``f^-alpha`` on a series of
    ``n_samples`` ticks (lowest frequency of the series to Nyquist), unit variance, at
    every lag."""
    k = np.arange(n_samples // 2 + 1, dtype=np.float64)
    spectrum = np.zeros(k.size)
    spectrum[1:] = k[1:] ** -alpha
    shape = np.fft.irfft(spectrum, n_samples)[: n_samples // 2 + 1]
    shape /= shape[0]
    shape.setflags(write=False)
    return shape


class _SeriesKriging:
    """Conditional mean of a subarray's noise along the read-out time series.

    A subarray line is short (32 pixels on the BOTS and fixed-slit subarrays), and
    the 1/f noise of traditional readout reaches up to the pixel rate: a trace sits
    between background pixels that are only tens of ticks away, on the same line and
    on the neighbouring lines.  The noise is a stationary process along the time axis
    (10 us per pixel, ``LINE_OVERHEAD_TICKS`` empty ticks between lines), so its
    conditional mean at every pixel given the background within ``reach`` ticks is a
    kriging prediction, and its conditional variance is known.

    The covariance comes from the exposure.  The background of a subarray covers only
    a few lags (within a cluster of background pixels, and one or two line periods
    apart), so a free-form spectrum cannot say what happens between them; a power law
    can, and it is the physics of this noise (1/f, Rauscher 2015; Rauscher 2024, section
    2).  The exponent, the amplitude and the white level are fitted to the masked
    autocovariance of the background, with an alternating-column term (a slow process
    times ``(-1)^t``); what they do not describe stays in the residual.  Blocks with no
    background in reach (the reference lines, a band a user masked) are predicted from
    the nearest samples further away.  Blocks whose windows have the same background
    pattern share one solve, so a trace at a fixed place costs a handful of solves.
    """

    _BLOCK = 64  # at most this many target pixels per block
    _REACH = 64  # background within this many ticks of the block (at most a line)
    _FAR_SAMPLES = 16  # blocks with nothing in reach: nearest samples on either side
    _MIN_PAIRS = 20
    _BATCH_BYTES = 16 * 2**20  # the Gram matrices and right-hand sides solved at once

    def __init__(self, n_lines, n_fast):
        self.n_lines, self.n_fast = n_lines, n_fast
        self.stride = n_fast + LINE_OVERHEAD_TICKS
        per_line = math.ceil(n_fast / self._BLOCK)
        self.block = math.ceil(n_fast / per_line)
        self.margin = min(self.stride, self._REACH)  # padding of the series, both sides
        line_starts = np.arange(n_lines) * self.stride
        starts = (line_starts[:, None] + np.arange(per_line) * self.block).ravel()
        self.starts = starts + self.margin  # in the padded series
        self.padded = n_lines * self.stride + 2 * self.margin + self.block
        self.params = None
        self._cache = {}  # (reach, window pattern) -> (weights, explained, loo, seen)

    def _series(self, lines, dtype):
        series = np.zeros(self.padded, dtype=dtype)
        body = series[self.margin : self.margin + self.n_lines * self.stride]
        body.reshape(self.n_lines, self.stride)[:, : self.n_fast] = lines
        return series

    def _lines(self, series):
        body = series[self.margin : self.margin + self.n_lines * self.stride]
        return body.reshape(self.n_lines, self.stride)[:, : self.n_fast]

    def _correlated(self, lags):
        """The fitted covariance of the correlated noise at lags ``0 .. lags - 1``."""
        amplitude, alternating, index, _ = self.params
        shape = _power_law_covariance(self.n_lines * self.stride, _ALPHAS[index])[:lags]
        if shape.size < lags:  # beyond the series: the covariance at its longest lag
            shape = np.concatenate([shape, np.full(lags - shape.size, shape[-1])])
        return (amplitude + alternating * (-1.0) ** np.arange(lags)) * shape

    def autocovariance(self, data, valid):
        """Sums of products and counts of background pairs at lags ``0 .. lags - 1``."""
        from scipy.fft import next_fast_len

        series = self._series(np.where(valid, data, 0.0), np.float64)
        lags = self.block + 2 * min(self.stride, self._REACH)
        n = next_fast_len(series.size + lags, real=True)
        f_data = np.fft.rfft(series, n)
        f_valid = np.fft.rfft(self._series(valid, np.float64), n)
        products = np.fft.irfft(f_data * np.conj(f_data), n)[:lags]
        pairs = np.rint(np.fft.irfft(f_valid * np.conj(f_valid), n)[:lags])
        return products, pairs

    def fit(self, data, valid):
        """Fit the covariance to the background's autocovariance; False if impossible."""
        return self.fit_autocovariance(*self.autocovariance(data, valid))

    def fit_autocovariance(self, products, pairs):
        """Fit the covariance to summed products and pair counts; False if impossible."""
        from scipy.optimize import nnls

        lags = products.size
        tau = np.flatnonzero(pairs >= self._MIN_PAIRS)
        if tau.size < 4 or tau[0] != 0:
            return False
        # The error of an autocovariance estimate falls as the square root of its pairs.
        weight = np.sqrt(pairs[tau])
        target = products[tau] / pairs[tau] * weight
        shapes = _power_law_covariances(self.n_lines * self.stride, lags)
        # Alternating column noise: even and odd pixels drift apart from line to line,
        # a slow process times (-1)^t (Rauscher 2015); its covariance alternates in sign.
        sign = (-1.0) ** tau
        white = (tau == 0) * weight
        best = None
        for index, shape in enumerate(shapes):
            design = np.stack([shape[tau] * weight, sign * shape[tau] * weight, white],
                              axis=1)
            coef, misfit = nnls(design, target)
            if coef[0] > 0 and (best is None or misfit < best[0]):
                best = (misfit, coef, index)
        if best is None:
            return False
        coef, index = best[1], best[2]
        alternating = float(coef[1]) if coef[1] > 1e-3 * coef[0] else 0.0
        white = max(float(coef[2]), 1e-6 * float(coef[0] + coef[1]))
        self.use((float(coef[0]), alternating, index, white))
        return True

    def use(self, params):
        """Use these covariance parameters (amplitude, alternating, alpha index, white)."""
        self.params = params
        # The solves depend only on the covariance and the background patterns: planes
        # of one time series (one mask, one shared covariance) share them.
        key = (self.n_lines, self.n_fast, self.params)
        with _OPERATORS_LOCK:
            self._cache = _OPERATORS.pop(key, None) or {}
            _OPERATORS[key] = self._cache
            while len(_OPERATORS) > _OPERATOR_SETS:
                _OPERATORS.pop(next(iter(_OPERATORS)))

    @property
    def alpha(self):
        """The fitted spectral index (power spectral density ~ f^-alpha)."""
        return float(_ALPHAS[self.params[2]])

    @property
    def white(self):
        """The fitted white-noise variance."""
        return self.params[3]

    def _batch(self, width):
        """Patterns solved at once for windows of ``width`` pixels."""
        return int(min(128, max(8, self._BATCH_BYTES // (8 * width * (width + 2 * self.block)))))

    def _operators(self, reach, patterns):
        """Kriging weights, explained variance and leave-one-out columns per pattern."""
        width = self.block + 2 * reach
        offsets = np.arange(width) - reach
        correlated = self._correlated(width)
        lag = np.abs(offsets[:, None] - offsets[None, :])
        k_all = correlated[np.abs(offsets[:, None] - np.arange(self.block)[None, :])]
        own = reach + np.arange(self.block)  # the block's own pixels in its window
        diagonal = np.arange(width)
        missing = [key for key in patterns if (reach, key) not in self._cache]
        # Each pattern keeps two (width, block) float64 arrays; past the budget (new
        # outlier patterns of every plane of a long time series) the set starts over.
        per_pattern = 2 * 8 * width * self.block
        if (len(self._cache) + len(missing)) * per_pattern > _OPERATOR_BYTES:
            self._cache.clear()
            missing = list(dict.fromkeys(patterns))
        batch = self._batch(width)
        for b0 in range(0, len(missing), batch):
            keys = missing[b0 : b0 + batch]
            use = np.unpackbits(np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1),
                                axis=1, count=width).astype(bool)
            gram = np.where(use[:, :, None] & use[:, None, :], correlated[lag], 0.0)
            gram[:, diagonal, diagonal] = np.where(use, correlated[0] + self.white, 1.0)
            rhs = np.zeros((len(keys), width, 2 * self.block))
            rhs[:, :, : self.block] = np.where(use[:, :, None], k_all, 0.0)
            rhs[:, own, self.block + np.arange(self.block)] = 1.0
            solved = np.linalg.solve(gram, rhs)
            weights = solved[..., : self.block]  # (patterns, width, block)
            explained = (weights * rhs[..., : self.block]).sum(axis=1)
            # Leave-one-out: the residual of sample i given all others is
            # (K^-1 y)_i / (K^-1)_ii, with variance 1 / (K^-1)_ii.
            columns = solved[..., self.block :]  # K^-1 at the block's own pixels
            diagonal_inverse = columns[:, own, np.arange(self.block)]  # (K^-1)_ii
            loo = columns / diagonal_inverse[:, None, :]
            loo_sigma = 1.0 / np.sqrt(np.where(diagonal_inverse > 0, diagonal_inverse, 1.0))
            for i, key in enumerate(keys):
                self._cache[(reach, key)] = (weights[i], explained[i], loo[i], loo_sigma[i],
                                             bool(use[i].any()))
        return correlated[0]

    def predict(self, data, valid, want_variance):
        """Conditional mean of the correlated noise at every pixel, (n_lines, n_fast).

        Returns a dict:
        ``model`` (the prediction), ``variance`` (its conditional variance, or None),
        ``empty`` (pixels whose window held no background: prediction 0 there) and
        ``loo`` and ``loo_sigma`` (leave-one-out residual of every background pixel and
        its predicted sigma; 0 and 1 elsewhere) and ``n_far`` (lines with no background in reach,
        predicted from the nearest samples further away).
        """
        reach = min(self.stride, self._REACH)
        starts = self.starts
        series = self._series(np.where(valid, data, 0.0), np.float64)
        have = self._series(valid, bool)
        window = starts[:, None] + (np.arange(self.block + 2 * reach) - reach)
        packed = np.packbits(have[window], axis=1)
        # One opaque item per row: np.unique sorts them as bytes, ~50x faster than
        # unique rows (axis=0) on the 2-D array.
        rows = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
        keys, which = np.unique(rows, return_inverse=True)
        keys = [key.tobytes() for key in keys]
        which = which.ravel()
        members = np.argsort(which, kind="stable")  # the blocks of every pattern
        bounds = np.searchsorted(which[members], np.arange(len(keys) + 1))
        targets = np.arange(self.block)
        batch = self._batch(self.block + 2 * reach)
        out = {name: np.zeros(self.padded)
               for name in ("model", "variance", "loo", "loo_sigma")}
        empty = np.zeros(self.padded, dtype=bool)
        for u, key in enumerate(keys):
            if u % batch == 0:  # the operators of the next batch of patterns
                prior = self._operators(reach, keys[u : u + batch])
            weights, explained, loo, loo_sigma, seen = self._cache[(reach, key)]
            blocks = members[bounds[u] : bounds[u + 1]]
            positions = starts[blocks][:, None] + targets
            window_data = series[window[blocks]]
            out["model"][positions] = window_data @ weights
            out["loo"][positions] = window_data @ loo
            out["loo_sigma"][positions] = loo_sigma
            out["variance"][positions] = prior - explained
            empty[positions] = not seen
        if empty.any():
            self._predict_far(series, have, empty, out)
        return {
            "model": self._lines(out["model"]),
            "variance": np.maximum(self._lines(out["variance"]), 0.0) if want_variance
            else None,
            "n_far": int(np.count_nonzero(self._lines(empty).all(axis=1))),
            "loo": np.where(valid, self._lines(out["loo"]), 0.0),
            "loo_sigma": np.where(valid, self._lines(out["loo_sigma"]), 1.0),
        }

    def _predict_far(self, series, have, empty, out):
        """Blocks with no background in reach: kriging from the nearest samples.

        Each such block (reference lines at the ends, a band of lines a user masked)
        is predicted from the ``_FAR_SAMPLES`` background samples nearest in time on
        either side, under the same covariance.
        """
        samples = np.flatnonzero(have)
        starts = self.starts[empty[self.starts]]
        targets = starts[:, None] + np.arange(self.block)  # (blocks, block)
        n = self._FAR_SAMPLES
        left = np.searchsorted(samples, starts)
        picks = left[:, None] + np.arange(-n, n)  # n before the block, n after it
        usable = (picks >= 0) & (picks < samples.size)
        where = samples[np.clip(picks, 0, samples.size - 1)]
        span = int(max(np.abs(where[:, :, None] - where[:, None, :]).max(),
                       np.abs(targets[:, :, None] - where[:, None, :]).max())) + 1
        correlated = self._correlated(span)
        gram = np.where(usable[:, :, None] & usable[:, None, :],
                        correlated[np.abs(where[:, :, None] - where[:, None, :])], 0.0)
        diagonal = np.arange(2 * n)
        gram[:, diagonal, diagonal] = np.where(usable, correlated[0] + self.white, 1.0)
        rhs = np.where(usable[:, :, None],
                       correlated[np.abs(where[:, :, None] - targets[:, None, :])], 0.0)
        weights = np.linalg.solve(gram, rhs)  # (blocks, 2n, block)
        values = np.where(usable, series[where], 0.0)
        out["model"][targets] = np.einsum("bs,bst->bt", values, weights)
        out["variance"][targets] = correlated[0] - (weights * rhs).sum(axis=1)
