"""The NSClean algorithm: fit and subtract correlated read noise (pure numpy, no I/O).

For every detector fast-scan line (a DMS column) a few low Fourier frequencies are
fitted to the background pixels by weighted least squares, apodized, transformed back
and subtracted (Rauscher 2024, PASP, sections 3.2-3.3).

This implementation differs from a per-line loop in three ways that matter:

* **Exact real least squares.**  The model is the real Fourier series
  ``a0 + sum_k a_k cos(2 pi k x / n) + b_k sin(2 pi k x / n)`` and the weighted
  normal equations are solved exactly, so an in-band signal is reproduced to
  rounding error on any gapped line.
* **Batched.**  The normal equations of all lines are built with one matrix product
  ``weights @ (B_i B_j)`` over pixels and solved as a stack of small systems.
* **Guarded.**  The variance the fit adds to every pixel is computed from the mask
  alone (``sigma^2 * b_i^T G A^-1 C A^-1 G b_i`` with ``A = B^T W B``,
  ``C = B^T W^2 B`` and ``G`` the apodizer); where it exceeds ``max_model_variance``
  (in units of the per-pixel white-noise variance) the line is refitted with fewer
  frequencies, down to a weighted mean, and left uncleaned if even that fails.  Long
  masked gaps and sparse masks therefore never produce wild models.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .nirspec import CHANNEL_ROWS, FULL_FRAME, LINE_OVERHEAD_TICKS, REFERENCE_BORDER
from .options import CLEAN_OPTIONS, defaults
from .orientation import detector_to_dms, dms_to_detector, normalize_detector

# Every option of fit(), its default and help: nsclean.algorithm.options.CLEAN_OPTIONS.
_DEFAULTS = defaults(CLEAN_OPTIONS)

_METHODS = next(o.choices for o in CLEAN_OPTIONS if o.name == "method")
# method="auto" uses the readout model on subarrays whose lines are at most this long.
AUTO_READOUT_MAX_LINE = 64
# Largest condition number of a (diagonally scaled) normal matrix that is solved.
_MAX_CONDITION = 1e10
# Median of a chi-square variable with one degree of freedom.
_MEDIAN_CHI2_1 = 0.454936
# Samples further than this many sigma from the image-wide background level are
# left out of the first fit (they are judged again by the outlier pass).
_FAR = 10.0
# Lines are processed in blocks of this many to bound memory (a block of
# 256 lines x 2048 pixels in float64 is 4 MB).
_BLOCK_LINES = 128
# After the normal equations, lines go through the outlier passes and the guard in
# groups of about this many (one per thread).
_GROUP_LINES = 1024
# Tiny ridge added to every normal matrix so that solving never raises on a
# singular system; 1e-12 of the mean diagonal changes a well-posed solution by
# far less than the 1e-6 required for exactness.
_RIDGE = 1e-12
# The guard evaluates the model variance on every ``_GUARD_STEP``-th pixel: the
# variance profile is a trigonometric polynomial of twice the highest fitted
# frequency (period >= 128 px for the defaults), so 8 samples per period find its
# maximum to within a few per cent.
_GUARD_STEP = 16


@dataclass
class FitResult:
    """Result of :func:`fit`.

    Attributes
    ----------
    model : ndarray
        The fitted noise model, same shape and orientation as the input image.
    info : dict
        Diagnostics: ``n_lines`` (number of fitted lines or chunks), ``n_guarded``
        (lines fitted with fewer frequencies than requested), ``n_uncleaned`` (lines
        left uncleaned), ``n_rejected`` (background pixels rejected as outliers),
        ``frequencies`` (per-line highest frequency used, -1 = uncleaned; one entry
        per DMS column in line mode, per chunk in time-series mode), ``n_background``
        (per-line number of background pixels
        used), ``method`` and ``mode``.
    options : dict
        The effective options (defaults filled in), JSON-serialisable.
    """

    model: np.ndarray
    info: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    variance: np.ndarray | None = None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def fit(image, background_mask, detector="NRS1", **options) -> FitResult:
    """Fit the correlated-noise model of a NIRSpec count-rate image.

    Parameters
    ----------
    image : ndarray
        2-D floating-point image in DMS orientation (as stored in ``_rate.fits``
        SCI): full frame 2048 x 2048 or any subarray.  NaN pixels are never used.
    background_mask : ndarray of bool
        Same shape; True marks a dark (background) pixel usable for the fit.
    detector : {"NRS1", "NRS2"}
        Detector, case-insensitive; sets the read-out direction.
    method : {"auto", "readout", "fft", "median"}
        "readout" is the conditional mean of the correlated noise at every pixel given
        the background, with each line put on its (output, clock tick) grid and a
        prior measured on the exposure (:mod:`nsclean.algorithm.readout`; it also
        returns the posterior variance); on subarrays, kriging along the read-out
        time series with a power-law covariance fitted to the background (its
        exponent is ``info["spectral_index"]``).  "fft" is the paper's Fourier model.
        "median" subtracts the median of the background pixels of each DMS column
        (for comparison; it cannot follow structure along the column).  "auto"
        (default) is "readout" on full frames and on subarrays whose lines are at
        most 64 pixels long (the 32-row BOTS and fixed-slit subarrays), "fft" on
        taller subarrays.
    max_modes : int
        Readout method: most common DCT modes per line (default 32; the per-output
        part gets half).  The data choose fewer where the prior has no useful power.
    share_lines : bool
        Readout method: give every line a prior mean from its neighbouring lines
        (default True).
    variance : bool
        Return the posterior variance of the noise model in ``FitResult.variance``
        (readout method; default True).  :func:`clean` and :func:`fit_background` do
        not compute it.
    cutoff : float
        Apodizer cut-off in cycles per pixel along a line (default 1/256: gain 1 up to
        frequency 7 of a 2048-pixel line, 0.5 at 8, 0 from 9, i.e. 9 frequencies and
        17 real parameters are fitted).
    rolloff : float
        Width of the cosine roll-off of the apodizer, cycles per pixel (default 1/1024).
    weight_sigma : float
        Sigma in pixels of the Gaussian that measures the local background density
        along a line; weights are density^-2 (paper section 3.3; default 32).
    outlier_sigma : float or None
        Background pixels whose residual from the fit exceeds this many robust sigma
        (readout on subarrays: whose leave-one-out residual exceeds this many of its
        own predicted sigma) are dropped and the line refitted (default 3).  None
        disables rejection.
    outlier_iterations : int
        Number of reject-and-refit passes (default 1).
    max_model_variance : float or None
        Guard: largest variance the fit may add to any pixel of a line, in units of
        the per-pixel white-noise variance (default 0.25).  Lines above it are
        refitted with fewer frequencies.  None disables the guard.
    smooth_sigma : float
        Gaussian sigma (in lines) for smoothing the model across lines; 0 (default)
        disables it.  The jwst port uses 1.5, which leaves column-to-column stripes.
    per_channel : bool
        For ``method="median"``: one median per 512-row output channel.
    mode : {"auto", "line", "timeseries"}
        "line" fits every fast-scan line on its own (full frames).  "timeseries"
        places all pixels of a subarray on the read-out time axis (10 us per pixel,
        12 ticks of overhead per line) and fits overlapping chunks of
        ``chunk_length`` ticks.  "auto" (default) uses "line" for lines of 1024
        pixels or more and "timeseries" otherwise.
    chunk_length : int
        Chunk length in ticks for the time-series mode (default 2048).
    adaptive : bool
        Scale each fitted frequency by a Wiener gain from the correlated power this
        exposure has there, so that poorly constrained terms are shrunk instead of
        subtracted (default True); False gives the paper's plain apodizer.

    Returns
    -------
    FitResult
        The model (same shape as ``image``), diagnostics and effective options.

    Raises
    ------
    TypeError
        If the image is not a floating-point array, the mask is not boolean, or an
        unknown option is given.
    ValueError
        If shapes differ, the image is not 2-D, the mask has no usable background
        pixel, or an option is out of range.

    Notes
    -----
    Reference pixels (the 4-pixel border of a full frame) are never background and
    the model is zero there, so they are left unchanged.

    Examples
    --------
    >>> import numpy as np, nsclean
    >>> rng = np.random.default_rng(1)
    >>> image = rng.normal(size=(2048, 2048)) + rng.normal(size=2048)  # column stripes
    >>> mask = np.ones(image.shape, bool)
    >>> result = nsclean.fit(image, mask, "NRS1")
    >>> result.model.shape
    (2048, 2048)
    """
    dms_image, dms_mask, det, opts = _validate(image, background_mask, detector, options)
    # The products here are small: BLAS threads cost more than they bring (measured 2-3x
    # slower with two OpenBLAS threads on a 2-core machine), so BLAS runs on one thread
    # and the blocks of lines are spread over threads instead (_map_blocks).
    with _blas_single_thread():
        return _fit(dms_image, dms_mask, det, opts, want_variance=opts["variance"])


def _blas_single_thread():
    """Context manager limiting BLAS to one thread (no-op without threadpoolctl)."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


_BLAS_CONTROLLER = None


def _fit(dms_image, dms_mask, det, opts, want_variance=False):
    """:func:`fit` after validation."""
    valid = dms_mask & np.isfinite(dms_image)
    full_frame = dms_image.shape == (FULL_FRAME, FULL_FRAME)
    if full_frame:
        _set_border(valid, False)
    if not valid.any():
        raise ValueError(
            "background_mask leaves no usable background pixel (all are masked, NaN or "
            "reference pixels)"
        )

    mode = opts["mode"]
    if mode == "auto":
        mode = "line" if dms_image.shape[0] >= 1024 else "timeseries"
    pixel_variance = None
    opts["method"] = resolved_method(opts["method"], dms_image.shape)
    if opts["method"] == "readout":
        from .readout import fit_readout

        model, info, pixel_variance = fit_readout(
            dms_image, valid, det, opts, full_frame=full_frame, variance=want_variance
        )
        mode = "line" if full_frame else "timeseries"
    elif opts["method"] == "median":
        mode = "line"
        model, info = _median_model(dms_image, valid, opts)
    elif mode == "line":
        model, info = _fit_columns(dms_image, valid, opts)
    else:
        model_lines, info = _fit_timeseries(
            dms_to_detector(dms_image, det), dms_to_detector(valid, det), opts
        )
        model = detector_to_dms(model_lines, det)

    if opts["smooth_sigma"] > 0:
        from scipy.ndimage import gaussian_filter1d

        # Across lines = across DMS columns (axis 1), centred, no shift.
        model = gaussian_filter1d(model, opts["smooth_sigma"], axis=1, mode="nearest")
    # Usually the fit's own array already (no copy); never a view of the input.
    model = np.ascontiguousarray(model, dtype=_result_dtype(dms_image))
    if full_frame:
        _set_border(model, 0.0)
    info["mode"] = mode
    info["method"] = opts["method"]
    return FitResult(
        model=model, info=info, options=_json_options(opts), variance=pixel_variance
    )


def resolved_method(method, shape):
    """The fit method ``method`` means for an image of ``shape`` (DMS): "auto" resolved.

    The readout-aware model wins every full-frame case of the quality benchmark and the
    BOTS subarrays, whose short lines put the trace between background pixels tens of
    ticks apart; on tall subarrays (ALLSLITS, 256-pixel lines) it ties with fft at 20-30
    times the cost (docs/benchmarks.md), so "auto" is fft there.
    """
    if method != "auto":
        return method
    full_frame = tuple(shape) == (FULL_FRAME, FULL_FRAME)
    return "readout" if full_frame or shape[0] <= AUTO_READOUT_MAX_LINE else "fft"


def fit_background(image, background_mask, detector="NRS1", **options) -> np.ndarray:
    """Return the fitted correlated-noise model (same shape as ``image``).

    Parameters and options are those of :func:`fit`.

    Returns
    -------
    ndarray
        The model; subtract it from the image to clean it.
    """
    return fit(image, background_mask, detector, **{**options, "variance": False}).model


def clean(image, background_mask, detector="NRS1", **options) -> np.ndarray:
    """Return a cleaned copy of a NIRSpec count-rate image; the input is not modified.

    Parameters and options are those of :func:`fit`.

    Returns
    -------
    ndarray
        ``image - model`` in the image's dtype; NaN pixels stay NaN and reference
        pixels are unchanged.

    Examples
    --------
    >>> import numpy as np, nsclean
    >>> rng = np.random.default_rng(0)
    >>> stripes = rng.normal(size=2048)
    >>> image = rng.normal(size=(2048, 2048)) + stripes
    >>> cleaned = nsclean.clean(image, np.ones(image.shape, bool))
    >>> bool(cleaned[100:-100].mean(axis=0).std() < 0.1 * stripes.std())
    True
    """
    result = fit(image, background_mask, detector, **{**options, "variance": False})
    source = np.asarray(image)
    return (source - result.model).astype(source.dtype, copy=False)


class NSClean:
    """Compatibility wrapper with the interface of the original NSClean package.

    Parameters
    ----------
    detector : {"NRS1", "NRS2"}
        Detector name.
    mask : ndarray of bool
        Background mask in DMS orientation (True = background).
    weights_kernel_sigma : float, optional
        Sigma of the density-weight Gaussian (default 32 px).
    **options
        Any option of :func:`fit`.

    Notes
    -----
    Differences from the original package: arrays are in DMS orientation both in and
    out (the original transposed internally too); the apodizer is set by ``cutoff``
    and ``rolloff`` in cycles per pixel instead of ``fc`` in Hz; the fit is the exact
    real least-squares solution; ``clean`` never modifies its input and does not
    smooth the model across columns unless ``buff=True`` is passed (then with the
    original 1.5-line Gaussian); outliers are dropped rather than replaced by the
    median; lines with too little background are guarded instead of fitted wildly.
    """

    def __init__(self, detector, mask, weights_kernel_sigma=None, **options):
        self.detector = normalize_detector(detector)
        self.mask = np.asarray(mask)
        if weights_kernel_sigma is not None:
            options["weight_sigma"] = weights_kernel_sigma
        self.options = options
        self.last_result = None

    def fit(self, data):
        """Fit the background model of ``data`` and return it (same shape)."""
        self.last_result = fit(data, self.mask, self.detector, **self.options)
        return self.last_result.model

    def clean(self, data, buff=False):
        """Return ``data`` minus its background model.

        Parameters
        ----------
        data : ndarray
            Image in DMS orientation.
        buff : bool
            Smooth the model across lines with a 1.5-line Gaussian, as the original did.
        """
        options = dict(self.options)
        if buff:
            options["smooth_sigma"] = 1.5
        self.last_result = fit(data, self.mask, self.detector, **options)
        source = np.asarray(data)
        return (source - self.last_result.model).astype(source.dtype, copy=False)


def apodizer(frequency, cutoff=_DEFAULTS["cutoff"], rolloff=_DEFAULTS["rolloff"]):
    """Gain of the low-pass apodizer at a frequency (cycles per pixel).

    Unity below ``cutoff - rolloff/2``, half a cosine down to zero at
    ``cutoff + rolloff/2`` (paper, footnote 3).

    Parameters
    ----------
    frequency : array_like
        Frequencies in cycles per pixel.
    cutoff, rolloff : float
        Centre and width of the roll-off.

    Returns
    -------
    ndarray
        Gains in [0, 1].
    """
    f = np.abs(np.asarray(frequency, dtype=float))
    lo = cutoff - rolloff / 2.0
    if rolloff <= 0:
        return (f <= cutoff).astype(float)
    gain = 0.5 * (1.0 + np.cos(np.pi * np.clip((f - lo) / rolloff, 0.0, 1.0)))
    return np.where(f <= lo, 1.0, gain)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _validate(image, background_mask, detector, options):
    det = normalize_detector(detector)
    unknown = set(options) - set(_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; accepted options are {sorted(_DEFAULTS)}"
        )
    opts = {**_DEFAULTS, **options}

    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D array; got {image.ndim} dimension(s)")
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(
            f"image must be a floating-point array (count rates); got dtype {image.dtype}"
        )
    mask = np.asarray(background_mask)
    if mask.dtype != bool:
        raise TypeError(
            f"background_mask must be a boolean array (True = background); got dtype "
            f"{mask.dtype}"
        )
    if mask.shape != image.shape:
        raise ValueError(
            f"background_mask shape {mask.shape} does not match image shape {image.shape}"
        )
    if min(image.shape) < 1:
        raise ValueError(f"image is empty (shape {image.shape})")
    if not mask.any():
        raise ValueError("background_mask is empty: it marks no background pixel")

    if opts["method"] not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {opts['method']!r}")
    modes = opts["max_modes"]
    if isinstance(modes, bool) or not isinstance(modes, (int, np.integer)) or modes < 1:
        raise ValueError(f"max_modes must be an integer >= 1; got {modes!r}")
    opts["share_lines"] = bool(opts["share_lines"])
    opts["variance"] = bool(opts["variance"])
    if opts["mode"] not in ("auto", "line", "timeseries"):
        raise ValueError(f"mode must be 'auto', 'line' or 'timeseries'; got {opts['mode']!r}")
    _check_positive(opts, "cutoff")
    _check_positive(opts, "weight_sigma")
    _check_positive(opts, "rolloff", allow_zero=True)
    _check_positive(opts, "smooth_sigma", allow_zero=True)
    if opts["rolloff"] / 2 >= opts["cutoff"]:
        raise ValueError("rolloff/2 must be smaller than cutoff so that frequency 0 has gain 1")
    for name in ("outlier_sigma", "max_model_variance"):
        if opts[name] is not None:
            _check_positive(opts, name)
    iterations = opts["outlier_iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise TypeError(f"outlier_iterations must be an integer; got {iterations!r}")
    if iterations < 0:
        raise ValueError(f"outlier_iterations must be >= 0; got {iterations}")
    chunk = opts["chunk_length"]
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 64:
        raise ValueError(f"chunk_length must be an integer >= 64; got {chunk!r}")
    opts["per_channel"] = bool(opts["per_channel"])
    opts["adaptive"] = bool(opts["adaptive"])
    return image, mask, det, opts


def _check_positive(opts, name, allow_zero=False):
    value = opts[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"option {name} must be a number; got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"option {name} must be finite and {bound}; got {value!r}")
    opts[name] = number


def _json_options(opts):
    return {key: (value.item() if isinstance(value, np.generic) else value)
            for key, value in opts.items()}


def _result_dtype(image):
    return image.dtype if image.dtype in (np.float32, np.float64) else np.float64


def _set_border(array, value):
    """Set the 4-pixel reference border of a full frame, in place."""
    b = REFERENCE_BORDER
    array[:b] = array[-b:] = value
    array[:, :b] = array[:, -b:] = value


def _reference_border(shape):
    """Reference pixels of a full frame: the 4-pixel border (same in DMS and detector frames)."""
    ref = np.zeros(shape, dtype=bool)
    b = REFERENCE_BORDER
    ref[:b] = ref[-b:] = True
    ref[:, :b] = ref[:, -b:] = True
    return ref


# --------------------------------------------------------------------------------------
# The batched weighted least-squares fitter
#
# Internal convention: samples run along axis 0 and fitted lines along axis 1, so a
# DMS image is fitted in place (each DMS column is a fast-scan line).  The per-line
# model is the same function whichever way the line is read (the span of a Fourier
# basis and the Gaussian density are symmetric under x -> n-1-x), so line mode needs
# no reorientation for NRS2; the time-series mode does use the read order.
# --------------------------------------------------------------------------------------


def _fit_columns(image, valid, opts):
    """Per-line Fourier fit of every DMS column."""
    n = image.shape[0]
    evaluate = np.zeros(n, dtype=bool)
    evaluate[::_GUARD_STEP] = True
    if image.shape == (FULL_FRAME, FULL_FRAME):
        evaluate[:REFERENCE_BORDER] = evaluate[-REFERENCE_BORDER:] = False
    return _batched_fit(
        image, valid, opts, period=n, evaluate=evaluate, dtype=_result_dtype(image)
    )


def _fit_timeseries(lines, valid_lines, opts):
    """Fit overlapping chunks of the read-out time series of a (sub)array.

    ``lines`` is in the detector frame (rows = fast-scan lines in read order).  Pixels
    are placed on the time axis at 10 us per pixel with ``LINE_OVERHEAD_TICKS`` empty
    ticks between lines; chunks of ``chunk_length`` ticks overlap by half and their
    models are blended with triangular windows that sum to one.
    """
    n_lines, n = lines.shape
    stride = n + LINE_OVERHEAD_TICKS
    total = n_lines * stride
    chunk = int(opts["chunk_length"])
    if total <= chunk:
        chunk = hop = total
        n_chunks = 1
    else:
        hop = chunk // 2
        n_chunks = math.ceil((total - chunk) / hop) + 1
    padded = (n_chunks - 1) * hop + chunk

    series = np.zeros(padded, dtype=np.float64)
    series_valid = np.zeros(padded, dtype=bool)
    timeline = np.zeros((n_lines, stride), dtype=np.float64)
    timeline[:, :n] = np.where(valid_lines, lines, 0.0)
    series[:total] = timeline.ravel()
    valid_time = np.zeros((n_lines, stride), dtype=bool)
    valid_time[:, :n] = valid_lines
    series_valid[:total] = valid_time.ravel()

    index = np.arange(chunk)[:, None] + (np.arange(n_chunks) * hop)[None, :]
    evaluate = np.zeros(chunk, dtype=bool)
    evaluate[::_GUARD_STEP] = True
    model_chunks, info = _batched_fit(
        series[index], series_valid[index], opts, period=chunk, evaluate=evaluate
    )

    if n_chunks == 1:
        window = np.ones((chunk, 1))
    else:
        ramp = np.arange(chunk, dtype=float)
        window = np.repeat((1.0 - np.abs(ramp - hop) / hop)[:, None], n_chunks, axis=1)
        window[:hop, 0] = 1.0
        window[hop:, -1] = 1.0
    # A chunk left uncleaned contributes nothing; the others are renormalised.
    window = window * (info["frequencies"] >= 0)[None, :]
    model_series = np.bincount(index.ravel(), (model_chunks * window).ravel(), minlength=padded)
    norm = np.bincount(index.ravel(), window.ravel(), minlength=padded)
    model_series = np.divide(
        model_series, norm, out=np.zeros_like(model_series), where=norm > 0
    )
    model_lines = model_series[:total].reshape(n_lines, stride)[:, :n]
    return np.ascontiguousarray(model_lines), info


@functools.lru_cache(maxsize=8)
def _fourier_basis(period, n_freq):
    """Real Fourier basis (P x K): 1, cos(2 pi k x/P), sin(2 pi k x/P) for k = 1..n_freq.

    Cached: the returned array is read-only.
    """
    x = np.arange(period, dtype=np.float64)
    columns = [np.ones(period)]
    for k in range(1, n_freq + 1):
        phase = 2.0 * np.pi * k * x / period
        columns.append(np.cos(phase))
        columns.append(np.sin(phase))
    basis = np.stack(columns, axis=1)
    basis.flags.writeable = False
    return basis


class _DensityFilter:
    """Local fraction of background samples, Gaussian-weighted along axis 0.

    The Gaussian (sigma = ``weight_sigma``) is applied by FFT as a zero-padded linear
    convolution and normalised by the convolution of an all-ones line, so the density
    is a fraction in [0, 1] that does not drop at the ends of a line.  For speed the
    mask is first summed in bins of ``bin`` samples (sigma >= 8 bins, so the smooth
    density changes by well under 1 % across a bin) and the weights are repeated back.
    Weights are computed in single precision: any weights give an exact fit as long as
    the same ones enter both sides of the normal equations.
    """

    def __init__(self, n, sigma):
        self.bin = 4 if (n % 4 == 0 and sigma >= 8 * 4) else 1
        self.n_bins = n // self.bin
        s = sigma / self.bin
        radius = int(math.ceil(4.0 * s))
        from scipy.fft import next_fast_len

        self.size = next_fast_len(self.n_bins + 2 * radius, real=True)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / s) ** 2)
        kernel /= kernel.sum() * self.bin  # bin sums -> fractions
        circular = np.zeros(self.size)
        circular[offsets % self.size] = kernel  # centred on sample 0: no shift
        # Times ``size``: the forward transform below is scaled by 1/size (see _convolve).
        self.spectrum = (np.fft.rfft(circular) * self.size).astype(np.complex64)[:, None]
        edge = self._convolve(np.full((self.n_bins, 1), self.bin, dtype=np.float32))
        self.edge_sq = (edge * edge).astype(np.float32)
        self.inverse_edge = (1.0 / edge).astype(np.float32)

    def _convolve(self, binned):
        # Single precision throughout: numpy >= 2.0 transforms float32 as float32
        # (complex64 spectrum, float32 result).  The zero padding is explicit and the
        # forward transform is scaled by 1/size (norm="forward", undone in
        # ``self.spectrum``): so numpy transforms groups of lines in SIMD lanes, as
        # scipy.fft did.  With ``n=`` padding (a loop line by line) or the default norm
        # (an unscaled forward transform, whose scale, the Python int 1, numpy must cast
        # to float32) numpy 2.4 was 2-5x slower here.  Lines never mix: the result does
        # not depend on how many lines are transformed together (tested).
        padded = np.zeros((self.size, binned.shape[1]), dtype=np.float32)
        padded[: self.n_bins] = binned
        spectrum = np.fft.rfft(padded, axis=0, norm="forward")
        spectrum *= self.spectrum
        return np.fft.irfft(spectrum, n=self.size, axis=0)[: self.n_bins]

    def binned_weights(self, valid, sparsest=None):
        """Density weights rho^-2 of every bin (n_bins, M), float32; 0 where rho = 0.

        The weight of a sample is the value of its bin (``sample // self.bin``) if the
        sample is valid, 0 otherwise (see :meth:`weights`).  If ``sparsest`` (M,) is
        given, the centre sample of the bin of lowest density of every line is stored
        in it (the middle of the longest gap, where the fit's variance peaks).
        """
        n, m = valid.shape
        counts = valid.view(np.uint8)
        binned = counts[0 :: self.bin].copy()  # at most 255 samples per bin
        for offset in range(1, self.bin):
            binned += counts[offset :: self.bin]
        density = self._convolve(binned)  # bin counts, exact in float32
        if sparsest is not None:
            # Relative to the ends' normalisation, so the line ends are not favoured.
            sparsest[:] = np.argmin(density * self.inverse_edge, axis=0) * self.bin
            sparsest += self.bin // 2
        density *= density
        # 1/rho^2 with rho = density / edge; bins with no background get weight 0.
        return np.divide(self.edge_sq, density, out=np.zeros_like(density), where=density > 1e-12)

    def weights(self, valid):
        """Density weights rho^-2 on valid samples, 0 elsewhere (N, M), float32."""
        inverse_sq = self.binned_weights(valid)
        if self.bin > 1:
            inverse_sq = np.repeat(inverse_sq, self.bin, axis=0)
        inverse_sq *= valid
        return inverse_sq


def _batched_fit(data, valid, opts, period, evaluate, dtype=np.float64):
    """Weighted real-Fourier least squares of every column of ``data``.

    Parameters
    ----------
    data : ndarray (P, M)
        Samples along axis 0, one fitted line (or time-series chunk) per column;
        values where ``valid`` is False are ignored (may be NaN).
    valid : ndarray of bool (P, M)
        Background samples.
    period : int
        Basis period in samples.
    evaluate : ndarray of bool (P,)
        Positions where the guard evaluates the model variance.
    dtype : numpy dtype
        Type of the returned model (the fit is in double precision).

    Returns
    -------
    model : ndarray (P, M) of ``dtype``
    info : dict
    """
    state = _LineFits(data, valid, opts, period, evaluate)
    state.far = _map_blocks(state.accumulate, state.n_lines)  # gross outliers of every block
    # Every line is fitted on its own: fixed groups of whole blocks of lines go through
    # the rest of the fit on the threads, and the results do not depend on their number.
    groups = _map_blocks(state.fit_group, state.n_lines, state.group)
    return state.model(groups, dtype)


class _LineFits:
    """Shared state of :func:`_batched_fit`: basis, normal matrices and weights.

    Every method writes only the lines it is given, so blocks and groups of lines
    can run on separate threads (:func:`_map_blocks`).
    """

    def __init__(self, data, valid, opts, period, evaluate):
        n, n_lines = data.shape
        self.data, self.valid, self.opts, self.evaluate = data, valid, opts, evaluate
        self.n, self.n_lines = n, n_lines
        gains = apodizer(np.arange(n // 2 + 1) / period, opts["cutoff"], opts["rolloff"])
        n_freq = max(0, min(int(np.count_nonzero(gains > 0)) - 1, (n - 1) // 2))
        self.n_freq = n_freq
        self.basis = _fourier_basis(period, n_freq)[:n]
        self.n_par = self.basis.shape[1]
        self.gain_per_par = np.concatenate([[gains[0]], np.repeat(gains[1 : n_freq + 1], 2)])

        self.iu, self.ju = np.triu_indices(self.n_par)
        trig, self.to_pairs = _product_identities(period, n_freq)
        self.trig = trig[:n]
        # The basis functions are columns of ``trig``: 1, cos(k), sin(k) for k <= K.
        self.basis_columns = [0] + [
            c for k in range(1, n_freq + 1) for c in (k, 2 * n_freq + k)
        ]
        self.density = _DensityFilter(n, opts["weight_sigma"])
        self.level, self.spread = _robust_level(data, valid)
        self.n_valid = np.empty(n_lines, dtype=np.intp)  # background samples of every line

        n_packed = len(self.iu)
        self.normal = np.empty((n_lines, n_packed))
        self.weight_sq_normal = np.empty((n_lines, n_packed))
        self.rhs = np.empty((n_lines, self.n_par))
        self.binned_weights = np.empty((self.density.n_bins, n_lines), dtype=np.float32)
        self.clip_far = self.spread > 0 and opts["outlier_sigma"] is not None
        self.blocks = {}
        self.sparsest = np.empty(n_lines, dtype=np.intp)
        self.far = None  # per block: gross outliers (pixels, lines), set by the caller
        self.group = _BLOCK_LINES * max(1, round(_GROUP_LINES / _BLOCK_LINES))

    def accumulate(self, j0):
        """Normal matrices, right-hand sides and gross outliers of block ``j0``."""
        j1 = min(j0 + _BLOCK_LINES, self.n_lines)
        density = self.density
        # Only the samples that are background in some line of the block contribute
        # (an IFU mask keeps ~30 % of the rows of a 128-line block); their data are
        # set to 0 where they are not background (they may be NaN).
        rows, block_valid, block_data = self.blocks[j0] = _background_rows(
            self.valid, self.data, j0, j1
        )
        self.n_valid[j0:j1] = np.count_nonzero(block_valid, axis=0)
        inverse_sq = density.binned_weights(self.valid[:, j0:j1], self.sparsest[j0:j1])
        self.binned_weights[:, j0:j1] = inverse_sq
        w = inverse_sq[rows // density.bin]
        w *= block_valid
        # A = B^T W B and C = B^T W^2 B (for the guard) in one product.  Products of
        # two basis functions are sums of cosines and sines of frequency 0..2K, so only
        # 4K+1 weighted sums per line are needed instead of (2K+1)(K+1).  C must be in
        # double precision: the guard's A^-1 C A^-1 amplifies its rounding errors by
        # the square of A's condition number on lines with long gaps.
        width = j1 - j0
        block_trig = self.trig[rows]
        # The right-hand sides B^T W d come out of the same product (their basis
        # functions are among the 4K+1 trigonometric columns).
        both = np.empty((len(w), 3 * width))
        both[:, :width] = w
        np.multiply(both[:, :width], both[:, :width], out=both[:, width : 2 * width])
        np.multiply(both[:, :width], block_data, out=both[:, 2 * width :])
        sums = both.T @ block_trig
        self.normal[j0:j1] = sums[:width] @ self.to_pairs
        self.weight_sq_normal[j0:j1] = sums[width : 2 * width] @ self.to_pairs
        self.rhs[j0:j1] = sums[2 * width :, self.basis_columns]
        if not self.clip_far:
            return _NO_SAMPLES
        # Gross outliers (hot pixels, cosmic-ray residue) are kept out of the first fit
        # only; the outlier passes below judge every pixel again.
        far = np.abs(block_data - self.level) > _FAR * self.spread
        far &= block_valid
        return _flat_indices(far, j0, rows)

    def downdated(self, g0, g1, pix, line):
        """Normal matrices (packed) and right-hand sides of lines g0:g1 without the
        samples (pix, line)."""
        sub_normal, sub_rhs = self.normal[g0:g1], self.rhs[g0:g1]
        if len(line):
            local = line - g0
            w_out = self.binned_weights[pix // self.density.bin, line].astype(np.float64)
            d_out = np.asarray(self.data[pix, line], dtype=np.float64)
            # Per-line sums of the removed samples' contributions, through the same
            # 4K+1 trigonometric sums as the full matrices.
            count = g1 - g0
            sums = np.stack(
                [np.bincount(local, w_out * t, minlength=count) for t in self.trig[pix].T],
                axis=1,
            )
            sub_normal = sub_normal - sums @ self.to_pairs
            weighted = w_out * d_out
            sub_rhs = sub_rhs - np.stack(
                [np.bincount(local, weighted * b, minlength=count) for b in self.basis[pix].T],
                axis=1,
            )
        return sub_normal, sub_rhs

    def _unpack(self, packed, lines_first=False):
        """Full symmetric matrices from packed upper triangles (see :func:`_unpack`)."""
        return _unpack(packed, self.n_par, self.iu, self.ju, lines_first=lines_first)

    def _line_sigma(self, g0, g1, normal, rhs, threshold):
        """Fit lines g0:g1 and judge the residuals (see :func:`_find_outliers`)."""
        coefficients = _solve(self._unpack(normal), rhs)
        return _find_outliers(
            self.blocks, g0, g1, self.n_valid, coefficients, self.basis, threshold,
            self.spread,
        )

    def fit_group(self, g0):
        """Outlier passes and guard of lines g0:g1 (lines are independent)."""
        opts = self.opts
        g1 = min(g0 + self.group, self.n_lines)
        own = range(g0 // _BLOCK_LINES, (g1 - 1) // _BLOCK_LINES + 1)
        pix = np.concatenate([self.far[b][0] for b in own])
        line = np.concatenate([self.far[b][1] for b in own])
        active_normal, active_rhs = self.downdated(g0, g1, pix, line)
        line_sigma = None
        # (The guard solves the final system itself, at the frequencies it allows; a
        # full solve is needed only to judge the residuals.)
        if opts["outlier_sigma"] is not None:
            for _ in range(opts["outlier_iterations"]):
                # Rejections are recomputed from the full background set at every
                # pass, so a pixel rejected because of a poor earlier fit comes back.
                pix, line, line_sigma = self._line_sigma(
                    g0, g1, active_normal, active_rhs, opts["outlier_sigma"]
                )
                active_normal, active_rhs = self.downdated(g0, g1, pix, line)
        n_background = self.n_valid[g0:g1] - np.bincount(line - g0, minlength=g1 - g0)
        if line_sigma is None:
            line_sigma = np.zeros(g1 - g0)
            if opts["adaptive"]:
                _, _, line_sigma = self._line_sigma(g0, g1, active_normal, active_rhs, None)
        used, coefficients, coef_variance = _guard(
            self._unpack(active_normal),
            self._unpack(self.weight_sq_normal[g0:g1], lines_first=True),
            active_rhs,
            n_background,
            self.basis,
            self.gain_per_par,
            self.evaluate,
            opts,
            self.sparsest[g0:g1],
        )
        return used, coefficients, coef_variance, line_sigma, n_background, len(line)

    def model(self, groups, dtype):
        """Model (P, M) of ``dtype`` and info dict from the results of :meth:`fit_group`."""
        n_lines, n_freq = self.n_lines, self.n_freq
        used, coefficients, coef_variance, line_sigma, n_background = (
            np.concatenate([result[i] for result in groups]) for i in range(5)
        )
        n_rejected = sum(result[5] for result in groups)
        gain = np.broadcast_to(self.gain_per_par, coefficients.shape)
        if self.opts["adaptive"]:
            gain = gain * _wiener_gains(coefficients, coef_variance, line_sigma, used, n_freq)
        # Lines with fewer frequencies carry zeros in the unused coefficients.  The model
        # is evaluated in the precision of the result (a single-precision image gets a
        # single-precision model, good to ~1e-7 of its amplitude).
        basis_out = self.basis.astype(dtype)
        scaled = (coefficients * gain).T.astype(dtype)
        model = np.empty((self.n, n_lines), dtype=dtype)

        def evaluate_model(j0):
            j1 = min(j0 + self.group, n_lines)
            np.matmul(basis_out, scaled[:, j0:j1], out=model[:, j0:j1])

        _map_blocks(evaluate_model, n_lines, self.group)
        info = {
            "n_lines": int(n_lines),
            "n_guarded": int(np.count_nonzero((used >= 0) & (used < n_freq))),
            "n_uncleaned": int(np.count_nonzero(used < 0)),
            "n_rejected": int(n_rejected),
            "frequencies": used,
            "n_background": n_background,
            "max_frequency": int(n_freq),
        }
        return model, info


@functools.lru_cache(maxsize=8)
def _product_identities(period, n_freq):
    """Trigonometric sums that give all products of pairs of basis functions.

    Returns ``trig`` (P x (4K+1)): 1, cos(2 pi f x/P) and sin(2 pi f x/P) for
    f = 1..2K, and ``to_pairs`` ((4K+1) x K'), with K' = (2K+1)(K+1) the packed
    upper triangle, such that ``trig @ to_pairs`` equals the products ``b_p b_q``:
    cos a cos b = [cos(a-b) + cos(a+b)]/2, sin a sin b = [cos(a-b) - cos(a+b)]/2,
    cos a sin b = [sin(a+b) + sin(b-a)]/2.
    """
    top = 2 * n_freq
    x = np.arange(period, dtype=np.float64)
    phase = 2.0 * np.pi * np.arange(1, top + 1)[None, :] * x[:, None] / period
    trig = np.concatenate([np.ones((period, 1)), np.cos(phase), np.sin(phase)], axis=1)

    def column(kind, f):
        if f == 0:
            return 0 if kind == "cos" else None
        return f if kind == "cos" else top + f

    # Parameter p: 0 -> constant, 2k-1 -> cos(k), 2k -> sin(k).
    kinds = [("cos", 0)] + [(t, k) for k in range(1, n_freq + 1) for t in ("cos", "sin")]
    iu, ju = np.triu_indices(len(kinds))
    to_pairs = np.zeros((trig.shape[1], len(iu)))
    for m, (p, q) in enumerate(zip(iu, ju, strict=True)):
        (tp, a), (tq, b) = kinds[p], kinds[q]
        if tp == tq:
            sign = 1.0 if tp == "cos" else -1.0
            to_pairs[column("cos", abs(a - b)), m] += 0.5
            to_pairs[column("cos", a + b), m] += 0.5 * sign
        else:
            if tp == "sin":  # write as cos(a') sin(b') with a' the cosine's frequency
                a, b = b, a
            col = column("sin", a + b)
            if col is not None:
                to_pairs[col, m] += 0.5
            col = column("sin", abs(b - a))
            if col is not None:
                to_pairs[col, m] += 0.5 * np.sign(b - a)
    # Cached: read-only.
    trig.flags.writeable = False
    to_pairs.flags.writeable = False
    return trig, to_pairs


def _wiener_gains(coefficients, coef_variance, line_sigma, used, n_freq):
    """Per-coefficient Wiener gains P_k / (P_k + N_lk) from the image's own statistics.

    ``N_lk`` is the noise variance of the coefficients of frequency k in line l,
    ``sigma_l^2 [A^-1 C A^-1]_pp`` averaged over the cosine and sine of k.  ``P_k``, the
    power of the correlated noise at frequency k, is estimated over all lines fitted to k
    or more from ``q_lk``, the mean square of the cosine and sine coefficients (a phase
    shift or a reversal of the line leaves it unchanged): for Gaussian coefficients of
    variance ``P + N``, ``median(q) = m (P + N)`` with ``m = ln 2`` for a pair and 0.4549
    for k = 0, so ``P_k = median(q) / m - median(N)``.  Medians keep a few lines with
    light leaking past the mask from raising the gains of the whole image.  A frequency
    that carries little correlated noise in this exposure is damped instead of adding the
    fit's noise; a noiseless line has ``N = 0`` and is reproduced exactly.
    """
    noise = coef_variance * (line_sigma[:, None] ** 2)

    def per_frequency(values):
        # (lines, K) -> (lines, n_freq + 1): k = 0 alone, then the mean of cos and sin.
        pairs = values[:, 1:].reshape(len(values), n_freq, 2)
        return np.concatenate([values[:, :1], (pairs[:, :, 0] + pairs[:, :, 1]) / 2], axis=1)

    q = per_frequency(coefficients**2)
    n = per_frequency(noise)
    gain_k = np.ones_like(q)
    for k in range(n_freq + 1):
        lines = used >= k
        if not lines.any():
            continue
        m = _MEDIAN_CHI2_1 if k == 0 else math.log(2.0)
        power = max(float(np.median(q[lines, k])) / m - float(np.median(n[lines, k])), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            gain_k[lines, k] = np.where(n[lines, k] > 0, power / (power + n[lines, k]), 1.0)
    # Back to parameters: 1, then cos and sin of every k.
    return np.concatenate([gain_k[:, :1], np.repeat(gain_k[:, 1:], 2, axis=1)], axis=1)


def _robust_level(data, valid):
    """Median and MAD-sigma of the background samples (from a subsample of lines)."""
    step = max(1, data.shape[1] // 64)
    sample = np.asarray(data[:, ::step], dtype=np.float64)[valid[:, ::step]]
    if sample.size == 0:
        return 0.0, 0.0
    level = float(np.median(sample))
    return level, 1.4826 * float(np.median(np.abs(sample - level)))


def _unpack(packed, n_par, iu, ju, lines_first=False):
    """Symmetric matrices from packed upper triangles (M, K(K+1)/2).

    The result is (K, K, M), lines on the LAST axis: the factorisation below works on
    whole rows of lines at a time (contiguous vectors of length M), which is several
    times faster than numpy's batched LAPACK calls on 17 x 17 matrices.  With
    ``lines_first`` it is (M, K, K), for batched matrix products.
    """
    if lines_first:
        full = np.empty((packed.shape[0], n_par, n_par), dtype=packed.dtype)
        full[:, iu, ju] = packed
        full[:, ju, iu] = packed
        return full
    full = np.empty((n_par, n_par, packed.shape[0]), dtype=packed.dtype)
    full[iu, ju] = packed.T
    full[ju, iu] = packed.T
    return full


def _regularised(normal):
    """Copy of a (K, K, M) stack with ``_RIDGE`` times its mean diagonal added."""
    n_par = normal.shape[0]
    diag = np.arange(n_par)
    scale = normal[diag, diag].sum(axis=0) / n_par
    scale = np.where(scale > 0, scale, 1.0)
    regular = normal.copy()
    regular[diag, diag] += _RIDGE * scale
    return regular


def _inverse_factor(normal):
    """Inverse Cholesky factors ``F = L^-1`` of a (K, K, M) stack of symmetric matrices.

    ``A = L L^T`` and ``A^-1 = F^T F``.  ``F`` is built row by row: with ``F_j`` the
    inverse factor of the leading block of order j and ``a`` the next column above the
    diagonal, ``v = F_j a``, ``d = sqrt(A_jj - v.v)`` and the next row of ``F`` is
    ``(-v^T F_j / d, 1 / d)``.

    Returns
    -------
    factor : ndarray (K, K, M)
        Lower triangular; the inverse factor of the leading block of order ``size``,
        the identity beyond it.
    size : ndarray of int (M,)
        Order of the largest leading block that is numerically positive definite
        (K for a healthy matrix).  The inverse factor of a leading block is the
        leading block of the inverse factor, so a line can still be fitted with that
        many parameters.
    """
    n_par, _, n_lines = normal.shape
    factor = np.zeros_like(normal)
    size = np.full(n_lines, n_par)
    # Past a failed pivot a line's factor is garbage (replaced below): no warnings.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(n_par):
            pivot = normal[j, j]
            if j:
                v = np.einsum("pql,ql->pl", factor[:j, :j], normal[:j, j])
                pivot = pivot - np.einsum("pl,pl->l", v, v)
            bad = ~(pivot > 0)  # also NaN
            if bad.any():
                size = np.where(bad & (size > j), j, size)
                pivot = np.where(bad, 1.0, pivot)
            reciprocal = 1.0 / np.sqrt(pivot)
            factor[j, j] = reciprocal
            if j:
                factor[j, :j] = np.einsum("pl,pql->ql", v, factor[:j, :j]) * -reciprocal
    if (size < n_par).any():
        keep = np.arange(n_par)[:, None] < size[None, :]
        inside = keep[:, None, :] & keep[None, :, :]
        factor = np.where(inside, factor, np.eye(n_par, dtype=bool)[:, :, None])
    return factor, size


def _solve(normal, rhs):
    """Solve the (K, K, M) stack of symmetric systems for right-hand sides (M, K).

    A tiny ridge guards against singularity; a line whose matrix is not numerically
    positive definite is solved on its leading positive-definite block (the other
    coefficients are 0).
    """
    factor, size = _inverse_factor(_regularised(normal))
    n_par = factor.shape[0]
    b = np.where(np.arange(n_par)[None, :] < size[:, None], rhs, 0.0).T
    # x = A^-1 b = F^T (F b)
    z = np.einsum("pql,ql->pl", factor, b)
    return np.einsum("qpl,ql->pl", factor, z).T


def _condition_below(normal, lines, diag, factor, limit):
    """Whether the condition number of the leading k x k blocks is at most ``limit``.

    ``normal[lines]`` (L, K, K) are the full matrices, ``diag`` (L, k) the diagonals of
    their leading blocks and ``factor`` (L, k, k) the inverse Cholesky factors of those
    blocks.  The number is the 1-norm condition number of the block scaled to a unit
    diagonal (:func:`_condition`).  For a positive definite matrix with unit diagonal
    no entry exceeds 1 in size and no entry of the inverse exceeds its largest diagonal
    entry, so ``k^2 max_p (A^-1)_pp A_pp`` bounds it from above: only blocks above the
    limit by that bound are computed exactly.
    """
    n_k = factor.shape[-1]
    inverse_diag = (factor * factor).sum(axis=1)  # diagonal of A_k^-1 = F_k^T F_k
    bound = n_k * n_k * np.max(inverse_diag * diag, axis=1, initial=0.0)
    result = bound <= limit
    exact = np.flatnonzero(~result)
    if exact.size:
        f = factor[exact]
        result[exact] = _condition(
            normal[lines[exact], :n_k, :n_k], f.transpose(0, 2, 1) @ f
        ) <= limit
    return result


def _condition(normal, inverse):
    """1-norm condition number of each (M, K, K) matrix after scaling it to a unit diagonal."""
    diag = np.sqrt(np.maximum(np.diagonal(normal, axis1=1, axis2=2), 1e-300))
    scaled = normal / diag[:, :, None] / diag[:, None, :]
    scaled_inverse = inverse * diag[:, :, None] * diag[:, None, :]
    norm = np.abs(scaled).sum(axis=1).max(axis=1)
    norm_inverse = np.abs(scaled_inverse).sum(axis=1).max(axis=1)
    return norm * norm_inverse


def _find_outliers(blocks, g0, g1, n_valid, coefficients, basis, threshold, global_sigma):
    """Background samples of lines g0:g1 whose residual from the fit exceeds the threshold.

    The noise level of each line is the rms of its residuals clipped at 4 times the
    image-wide sigma, corrected for the clipping, so a line noisier or quieter than
    the rest is judged on its own scale.  ``blocks`` holds the background rows, mask
    and data of every block of lines, by first line (see :func:`_background_rows`;
    g0 and g1 are block boundaries), ``n_valid`` the number of background samples of
    every line and ``coefficients`` the fit of lines g0:g1.

    Returns
    -------
    pix, line : ndarray of int
        Sample and line indices of the outliers (none if ``threshold`` is None).
    sigma : ndarray
        Robust noise sigma of every line of g0:g1.
    """
    if not global_sigma > 0:
        return (*_NO_SAMPLES, np.zeros(g1 - g0))
    clip = 4.0
    # E[x^2 | |x| < 4 sigma] / sigma^2 for a Gaussian, to correct the clipped rms.
    truncation = 1.0 - 2.0 * clip * math.exp(-clip * clip / 2) / (
        math.sqrt(2 * math.pi) * math.erf(clip / math.sqrt(2.0))
    )
    sigma = np.empty(g1 - g0)
    pixels, lines = [_NO_SAMPLES[0]], [_NO_SAMPLES[1]]
    for j0 in range(g0, g1, _BLOCK_LINES):
        j1 = min(j0 + _BLOCK_LINES, g1)
        rows, block_valid, block_data = blocks[j0]
        # Squared residuals, in place, 0 on unusable samples (their data are 0).
        sq = basis[rows] @ coefficients[j0 - g0 : j1 - g0].T
        np.subtract(block_data, sq, out=sq)
        sq *= block_valid
        np.square(sq, out=sq)
        keep = sq < (clip * global_sigma) ** 2
        # Unusable samples hold 0 and pass the clip: take them out of the count.
        count = keep.sum(axis=0) - (len(sq) - n_valid[j0:j1])
        # Summed row by row (axis 0), so the result does not depend on the block width.
        total = np.where(keep, sq, 0.0).sum(axis=0)
        block_sigma = np.where(
            count >= 3, np.sqrt(total / np.maximum(count, 1) / truncation), global_sigma
        )
        block_sigma = np.where(block_sigma > 0, block_sigma, global_sigma)
        sigma[j0 - g0 : j1 - g0] = block_sigma
        if threshold is not None:
            pix, line = _flat_indices(sq > (threshold * block_sigma) ** 2, j0, rows)
            pixels.append(pix)
            lines.append(line)
    return np.concatenate(pixels), np.concatenate(lines), sigma


_NO_SAMPLES = (np.empty(0, np.intp), np.empty(0, np.intp))


def _flat_indices(selected, j0, rows):
    """(sample, line) indices of the True entries of a block that starts at line j0.

    ``rows`` maps the block's rows to samples (see :func:`_background_rows`).
    ``flatnonzero`` and a division are several times faster than a 2-D ``nonzero``.
    """
    if not selected.any():
        return _NO_SAMPLES
    pix, line = np.divmod(np.flatnonzero(selected), selected.shape[1])
    return rows[pix], line + j0


def _background_rows(valid, data, j0, j1):
    """The samples of lines j0:j1 that are background in at least one of them.

    Returns ``(rows, valid, data)``: the sample indices and the block's mask and data
    restricted to them, the data set to 0 where not valid (they may be NaN there).
    The samples left out have zero weight in every line of the block, so no sum
    changes.
    """
    block_valid = valid[:, j0:j1]
    rows = np.flatnonzero(block_valid.any(axis=1))
    if len(rows) == len(block_valid):
        block_data = data[:, j0:j1]
    else:
        block_valid = block_valid[rows]
        block_data = data[rows, j0:j1]
    return rows, block_valid, np.where(block_valid, block_data, 0.0)


def _map_blocks(func, n_lines, step=None):
    """``[func(j0) for j0 in range(0, n_lines, step)]`` on a few threads, results in order.

    ``step`` defaults to ``_BLOCK_LINES``.

    numpy releases the GIL in the array operations and BLAS runs single-threaded inside
    a fit (see :func:`fit`), so the blocks of lines are processed in parallel.  Every
    block writes only its own lines and the results are returned in block order, so the
    output does not depend on the number of threads.
    """
    starts = range(0, n_lines, step or _BLOCK_LINES)
    workers = min(_worker_count(), len(starts))
    if workers <= 1:
        return [func(j0) for j0 in starts]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, starts))


def _worker_count():
    """Threads for a fit: NSCLEAN_THREADS, else OMP_NUM_THREADS (set by Snakemake to the
    job's threads), else the CPUs this process may use; at most 8."""
    import os

    for name in ("NSCLEAN_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), 8)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


def _guard(
    normal, weight_sq_normal, rhs, n_background, basis, gain_per_par, evaluate, opts, probe=None
):
    """Highest frequency each line can afford (-1: uncleaned), coefficients, their variance.

    ``normal`` is a (K, K, M) stack (see :func:`_unpack`), ``weight_sq_normal`` the
    (M, K, K) stack of the ``C`` matrices,
    ``rhs`` is (M, K), ``probe`` (M,) optionally a sample of every line where the
    variance is likely to peak.  The variance the fit adds at sample i, in units of the
    white-noise variance of one pixel, is ``g_i^T A^-1 C A^-1 g_i`` with
    ``g_i = G b_i``, ``A = B^T W B`` and ``C = B^T W^2 B`` (the covariance of a
    weighted least-squares estimate).  A line is fitted with the most frequencies for
    which the largest such variance stays below ``max_model_variance``, whose normal
    matrix is well conditioned, and which leave at least two background samples per
    parameter.

    Fewer frequencies means the leading sub-block of ``A``.  With ``A = L L^T`` and
    ``F = L^-1`` (lower triangular), ``A_k^-1 = F_k^T F_k`` with ``F_k`` the leading
    block of ``F``, and ``M = F C F^T`` has ``M_k = F_k C_k F_k^T``: one factorisation
    serves every k.  With ``h = F g_i``, whose leading entries are ``F_k g_i``, the
    variance at one sample is ``sum_{p<2k+1} h_p (M_pp h_p + 2 sum_{q<p} M_pq h_q)``,
    a cumulative sum that gives it for every k at once.  Every k whose variance at
    the evaluated samples next to ``probe`` already exceeds the limit is ruled out
    first; each line is then tried at its highest remaining k, where the maximum over
    all evaluated samples is computed, and a line that fails also drops every k whose
    variance at the failing sample is too high.  The result is the same as trying
    every k from the top, in one or two rounds instead of up to K.  (``C`` ignores rejected
    outliers, a negligible difference for a guard.)
    """
    n_par, _, n_lines = normal.shape
    n_freq = (n_par - 1) // 2
    limit = opts["max_model_variance"]
    factor, size = _inverse_factor(_regularised(normal))
    factor = np.ascontiguousarray(factor.transpose(2, 0, 1))
    m = factor @ weight_sq_normal @ factor.transpose(0, 2, 1)
    m_lower = np.tril(m, -1)
    m_diag = np.diagonal(m, axis1=1, axis2=2)
    orders = 2 * np.arange(n_freq + 1) + 1
    allowed = (n_background[:, None] >= 2 * orders[None, :]) & (orders[None, :] <= size[:, None])
    g = basis[evaluate] * gain_per_par  # (E, K): apodized basis at the evaluated samples

    def rule_out(lines, samples):
        # Drop every k of these lines whose variance at any of these samples (S
        # indices into the evaluated samples per line, (lines, S)) exceeds the limit.
        h = factor[lines] @ np.swapaxes(g[samples], 1, 2)  # (lines, K, S)
        terms = m_lower[lines] @ h
        terms *= 2.0
        terms += m_diag[lines][:, :, None] * h
        terms *= h
        variance = np.cumsum(terms, axis=1)[:, orders - 1, :].max(axis=2)
        allowed[lines] &= variance <= limit

    if limit is not None and probe is not None:
        # The evaluated samples on either side of the probe: lower bounds of the
        # maximum, like any evaluated sample.
        after = np.clip(np.searchsorted(np.flatnonzero(evaluate), probe), 0, len(g) - 1)
        rule_out(slice(None), np.stack([np.maximum(after - 1, 0), after], axis=1))

    def highest(lines):
        # Highest allowed k of each line, -1 if none.
        row = allowed[lines]
        return np.where(row.any(axis=1), n_freq - np.argmax(row[:, ::-1], axis=1), -1)

    used = np.full(n_lines, -1, dtype=int)
    result = np.zeros((n_lines, n_par))
    variance_of_coef = np.zeros((n_lines, n_par))
    trying = highest(np.arange(n_lines))
    pending = np.flatnonzero(trying >= 0)
    normal_lines = normal.transpose(2, 0, 1)
    diag = np.diagonal(normal)  # (K, K, M) -> (M, K)
    while pending.size:
        ok = np.zeros(pending.size, dtype=bool)
        worst = np.zeros(pending.size, dtype=np.intp)
        # Lines trying the same k together, with the k x k leading blocks only.
        for k in np.unique(trying[pending]):
            n_k = 2 * k + 1
            select = np.flatnonzero(trying[pending] == k)
            lines = pending[select]
            f = factor[lines, :n_k, :n_k]  # F_k
            f_t = f.transpose(0, 2, 1)
            noise = f_t @ (m[lines, :n_k, :n_k] @ f)  # covariance of the coefficients / sigma^2
            good = np.ones(len(lines), dtype=bool)
            if limit is not None:
                sub_i, sub_j = np.triu_indices(n_k)
                # Off-diagonal products appear twice in the quadratic form g^T Q g.
                products = g[:, sub_i] * g[:, sub_j] * np.where(sub_i == sub_j, 1.0, 2.0)
                variance = noise[:, sub_i, sub_j] @ products.T  # (lines, samples)
                worst[select] = np.argmax(variance, axis=1)
                good = variance[np.arange(len(lines)), worst[select]] <= limit
            # Numerical validity: beyond this condition number (of A_k scaled to a unit
            # diagonal) neither the solution nor its variance is reliable in double
            # precision (a long gap makes A nearly singular).
            check = np.flatnonzero(good)
            good[check] = _condition_below(
                normal_lines, lines[check], diag[lines[check], :n_k], f[check], _MAX_CONDITION
            )
            ok[select] = good
            accepted = lines[good]
            f, f_t = f[good], f_t[good]
            used[accepted] = k
            result[accepted, :n_k] = (f_t @ (f @ rhs[accepted, :n_k, None]))[:, :, 0]
            variance_of_coef[accepted, :n_k] = np.diagonal(noise[good], axis1=1, axis2=2)
        failed = pending[~ok]
        if limit is not None:
            # Every lower k whose variance at the worst sample is already too high is
            # ruled out as well.
            rule_out(failed, worst[~ok][:, None])
        allowed[failed, trying[failed]] = False
        trying[failed] = highest(failed)
        pending = failed[trying[failed] >= 0]
    return used, result, variance_of_coef


# --------------------------------------------------------------------------------------
# Median method (for comparison)
# --------------------------------------------------------------------------------------


def _median_model(image, valid, opts):
    """Median of the background pixels of every DMS column, optionally per output channel."""
    import warnings

    n, n_lines = image.shape
    values = np.where(valid, image, np.nan)
    per_channel = opts["per_channel"] and n % CHANNEL_ROWS == 0 and n > CHANNEL_ROWS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        if per_channel:
            segments = values.reshape(n // CHANNEL_ROWS, CHANNEL_ROWS, n_lines)
            medians = np.nanmedian(segments, axis=1)  # (channels, lines)
            missing = np.isnan(medians).any(axis=0)
            model = np.repeat(np.nan_to_num(medians, nan=0.0), CHANNEL_ROWS, axis=0)
        else:
            medians = np.nanmedian(values, axis=0)
            missing = np.isnan(medians)
            model = np.broadcast_to(np.nan_to_num(medians, nan=0.0), image.shape)
    info = {
        "n_lines": int(n_lines),
        "n_guarded": 0,
        "n_uncleaned": int(np.count_nonzero(missing)),
        "n_rejected": 0,
        "frequencies": np.where(missing, -1, 0),
        "n_background": valid.sum(axis=0),
        "max_frequency": 0,
    }
    return model, info
