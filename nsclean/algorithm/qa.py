"""Quality metrics for a cleaned NIRSpec count-rate image (pure numpy, no I/O).

All arrays are in the DMS frame: each DMS *column* is one detector fast-scan
line, so 1/f read noise shows as vertical stripes and the picture frame sits
near the four array edges. Metrics carry the image's own units (DN/s for a rate
file); powers carry those units squared. See ``docs/qa.md`` for the exact
definitions and the flag thresholds.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._blocks import block_count, block_sum

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FLAT_METRIC_KEYS",
    "banding_power_spectrum",
    "banding_white_level",
    "exposure_metrics",
    "flatten_metrics",
]

SCHEMA_VERSION = 1

#: Flag thresholds; every one can be overridden by a keyword of
#: :func:`exposure_metrics`. The reasoning behind each value is in docs/qa.md.
DEFAULT_THRESHOLDS = {
    "rms_increase_tolerance": 0.02,
    "max_banding_ratio": 0.9,
    "max_residual_banding": 2.0,
    "max_frame_ratio": 1.1,
    "max_model_ratio": 1.0,
    "max_guarded_fraction": 1.0,
    "max_uncleaned_fraction": 0.02,
    "min_background_fraction": 0.05,
    "starved_column_fraction": 0.02,
    "max_starved_fraction": 0.10,
}

# Per-image metrics, computed identically for the image before and after
# cleaning; the order here is the column order of the CSV and the report.
_IMAGE_KEYS = (
    "background_median",
    "background_rms",
    "banding_rms",
    "banding_white_rms",
    "banding_excess_rms",
    "banding_uniform_rms",
    "banding_uniform_white_rms",
    "banding_uniform_excess_rms",
    "lowfreq_power_rows",
    "lowfreq_power_columns",
    "frame_rms",
    "interior_rms",
    "picture_frame_amplitude",
    "n_nonfinite",
)

#: Scalar metric names in the stable order used by :func:`flatten_metrics`.
FLAT_METRIC_KEYS = (
    ("n_flags", "flags", "background_fraction", "n_background", "columns_starved")
    + tuple(f"before.{k}" for k in _IMAGE_KEYS)
    + tuple(f"after.{k}" for k in _IMAGE_KEYS)
    + ("ratio.background_rms", "ratio.banding_rms", "ratio.frame_rms")
    + ("model.rms", "model.max_abs", "model.n_nonfinite")
    + ("guard.n_lines", "guard.n_guarded", "guard.n_uncleaned")
    + ("guard.guarded_fraction", "guard.uncleaned_fraction")
    + ("guard.n_predicted", "guard.common_modes", "guard.output_modes")
    + ("worst_columns",)
)

_MAD_TO_SIGMA = 1.4826
# Pixels further than this many robust sigma from the background median are
# left out of the mean-based metrics: a single cosmic ray or an unmasked hot
# pixel would otherwise dominate a column mean.
_CLIP_SIGMA = 5.0
# Block size and Gaussian width (in blocks) of the smoothed background used for
# the picture frame: 4 px blocks and sigma 4 blocks ~ 16 px, wide enough to
# average column-to-column banding down by ~7x while keeping a structure of
# ~100 px, and 16x cheaper than smoothing the full-resolution frame.
_FRAME_BLOCK = 4
_FRAME_SIGMA_BLOCKS = 4.0
_FRAME_MIN_DENSITY = 0.02
_MAX_ROBUST_SAMPLES = 1 << 20
# Local background density for the length-uniform banding: 16-row blocks
# smoothed by 2 blocks = the cleaner's 32 px weight_sigma (Rauscher 2024, Fig. 5).
_DENSITY_BLOCK = 16
_DENSITY_SIGMA_BLOCKS = 2.0


def _as_float(value):
    """Return a JSON-friendly float (None for NaN/inf) from any numeric."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(after, before):
    if after is None or before is None or before == 0:
        return None
    return after / before


def _validate(image, name, shape=None):
    array = np.asarray(image)
    # float32 rate images stay float32 (half the memory traffic); every sum
    # below accumulates in float64 so a sky pedestal cannot eat the precision.
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D DMS-frame image, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape} like `before`")
    return array


def _validate_mask(background_mask, shape):
    mask = np.asarray(background_mask)
    if mask.shape != shape:
        raise ValueError(f"background_mask has shape {mask.shape}, expected {shape}")
    return mask.astype(bool, copy=False)


def _column_series(image, background_mask):
    """Validated image, background pixels, their sigma and the clipped column means."""
    image = _validate(image, "image")
    mask = _validate_mask(background_mask, image.shape)
    use, _, sigma = _background_pixels(image, mask)
    means, valid, counts = _column_means(_zeroed(image, use), use)
    return image, use, sigma, means, valid, counts


def _robust_location_scale(values):
    """Median and 1.4826 * MAD of a 1-D array (NaN, NaN if empty)."""
    if values.size == 0:
        return math.nan, math.nan
    if values.size > _MAX_ROBUST_SAMPLES:
        # An even stride keeps every part of the frame represented; 1M
        # samples pin the MAD to ~0.1 %, and the median of a 4M-pixel dark
        # frame would otherwise take most of the QA time.
        values = values[:: math.ceil(values.size / _MAX_ROBUST_SAMPLES)]
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    return median, sigma


def _series_power(series, valid):
    """One-sided periodogram of a gapped 1-D series.

    Missing samples are linearly interpolated from their valid neighbours
    (held constant beyond the ends): zero-filling would multiply the series
    by the sampling comb of an IFU-like mask and scatter the low-frequency
    power into sidebands. The powers sum to the variance of the filled series
    (Parseval). Returns (frequency in cycles per sample, power) without the
    zero frequency.
    """
    n = series.size
    if n < 2 or int(valid.sum()) < 2:
        return np.zeros(0), np.zeros(0)
    index = np.arange(n)
    filled = np.interp(index, index[valid], series[valid])
    spectrum = np.fft.rfft(filled - filled.mean())
    power = np.abs(spectrum) ** 2 / n**2
    # Fold negative frequencies onto positive ones, except DC and Nyquist,
    # which have no mirror image.
    power[1:] *= 2.0
    if n % 2 == 0:
        power[-1] /= 2.0
    freq = np.fft.rfftfreq(n)
    return freq[1:], power[1:]


def _lowfreq_power(series, valid, cutoff):
    freq, power = _series_power(series, valid)
    band = (freq > 0) & (freq <= cutoff)
    if not band.any():
        return None
    return float(power[band].sum())


@functools.lru_cache(maxsize=4)
def _frame_norm(shape):
    """Smoothed array of ones on the block grid (the same for every image of a shape)."""
    from scipy.ndimage import gaussian_filter

    norm = gaussian_filter(np.ones(shape), _FRAME_SIGMA_BLOCKS, mode="constant")
    norm.flags.writeable = False  # shared between calls
    return norm


def _smoothed_background(zeroed, use):
    """Normalised-convolution smooth of the background, on a 4x4 block grid.

    ``zeroed`` is the image with zeros off the background (``_zeroed``).
    Returns (smoothed, density) on the block grid; density is the Gaussian
    weighted fraction of background pixels, used to leave out areas with too
    little background to say anything.
    """
    from scipy.ndimage import gaussian_filter

    weighted = block_sum(zeroed, (_FRAME_BLOCK, _FRAME_BLOCK))
    counts = block_count(use, (_FRAME_BLOCK, _FRAME_BLOCK))
    # Normalised convolution: dividing the smoothed sums by the smoothed
    # counts makes the zero padding outside the array harmless, so the edge
    # band (where the picture frame lives) is not pulled toward zero.
    smooth_weighted = gaussian_filter(weighted, _FRAME_SIGMA_BLOCKS, mode="constant")
    smooth_counts = gaussian_filter(counts, _FRAME_SIGMA_BLOCKS, mode="constant")
    norm = _frame_norm(counts.shape)
    density = smooth_counts / (norm * _FRAME_BLOCK**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = smooth_weighted / smooth_counts
    smoothed[density < _FRAME_MIN_DENSITY] = np.nan
    return smoothed, density


def _edge_zone(shape_blocks, full_shape, edge_width):
    """Boolean block-grid mask of blocks whose centre is within edge_width px of an edge."""
    by, bx = shape_blocks
    centre_y = (np.arange(by) + 0.5) * _FRAME_BLOCK
    centre_x = (np.arange(bx) + 0.5) * _FRAME_BLOCK
    dist_y = np.minimum(centre_y, full_shape[0] - centre_y)
    dist_x = np.minimum(centre_x, full_shape[1] - centre_x)
    return np.minimum(dist_y[:, None], dist_x[None, :]) < edge_width


def _picture_frame(zeroed, use, edge_width):
    smoothed, _ = _smoothed_background(zeroed, use)
    edge = _edge_zone(smoothed.shape, zeroed.shape, edge_width)
    finite = np.isfinite(smoothed)
    interior_values = smoothed[~edge & finite]
    edge_values = smoothed[edge & finite]
    if interior_values.size < 4 or edge_values.size < 4:
        return None, None, None
    reference = float(np.median(interior_values))
    frame_rms = float(np.sqrt(np.mean((edge_values - reference) ** 2)))
    interior_rms = float(np.sqrt(np.mean((interior_values - reference) ** 2)))
    amplitude = math.sqrt(max(frame_rms**2 - interior_rms**2, 0.0))
    return frame_rms, interior_rms, amplitude


def _background_pixels(image, background_mask):
    """Background pixels usable for statistics: finite, in the mask, not outliers."""
    use = background_mask & np.isfinite(image)
    median, sigma = _robust_location_scale(image[use])
    if use.any() and sigma > 0:
        # |image - median| in the image's dtype, as the clip has always been computed;
        # off the background (NaNs included) the comparison does not matter.
        deviation = image - median
        np.abs(deviation, out=deviation)
        use &= deviation <= _CLIP_SIGMA * sigma
    return use, median, sigma


def _zeroed(image, use):
    """The image with zeros off ``use``: computed once, summed by several metrics."""
    return np.where(use, image, 0.0)


def _column_means(zeroed, use, min_pixels=1):
    counts = np.count_nonzero(use, axis=0)
    sums = zeroed.sum(axis=0, dtype=np.float64)
    valid = counts >= min_pixels
    means = np.zeros(zeroed.shape[1])
    means[valid] = sums[valid] / counts[valid]
    return means, valid, counts


def _pooled_variance(image, use, column_means, column_valid, column_counts, sigma):
    """Pixel variance about each pixel's own column mean, pooled over columns.

    White noise alone makes column j's mean scatter by sqrt(this / n_j);
    measuring the scatter about the column means keeps the stripes
    themselves from inflating it.
    """
    # In place in one float64 buffer: zeros off the background, squares on it.
    residual = np.zeros(image.shape)
    np.subtract(image, column_means[None, :], out=residual, where=use)
    np.square(residual, out=residual)
    dof = np.sum(column_counts[column_valid] - 1)
    return float(np.sum(residual, dtype=np.float64) / dof) if dof > 0 else sigma**2


def _white_variance(image, use, column_means, column_valid, column_counts, sigma):
    """Variance of the column means that white noise alone would give."""
    within = _pooled_variance(image, use, column_means, column_valid, column_counts, sigma)
    return float(np.mean(within / column_counts[column_valid]))


def _length_weights(use):
    """Per-pixel weight 1 / (local background density along the column), 0 off background.

    With these weights every stretch of a column counts in proportion to its
    length, not to how many background pixels it has: an IFU column's large
    background blocks at the top and bottom no longer outvote the thin gaps
    between the slices, where the science is.
    """
    from scipy.ndimage import gaussian_filter1d

    ny, nx = use.shape
    block = min(_DENSITY_BLOCK, ny)
    pad = (-ny) % block
    padded = np.pad(use, ((0, pad), (0, 0))) if pad else use
    # count / block: exactly the float64 mean of the bools, counted in int16.
    counts = padded.reshape(-1, block, nx).sum(axis=1, dtype=np.int16)
    fraction = counts / block
    density = gaussian_filter1d(fraction, _DENSITY_SIGMA_BLOCKS, axis=0, mode="nearest")
    with np.errstate(divide="ignore"):
        block_weight = np.where(density > 0, 1.0 / density, 0.0)
    weights = np.repeat(block_weight.astype(np.float32), block, axis=0)[:ny]
    weights *= use  # 0 off the background (the weights are finite)
    return weights


def _uniform_banding(zeroed, use, column_valid, within):
    weights = _length_weights(use)
    weight_sum = weights.sum(axis=0, dtype=np.float64)
    valid = column_valid & (weight_sum > 0)
    keys = ("banding_uniform_rms", "banding_uniform_white_rms", "banding_uniform_excess_rms")
    if valid.sum() < 2:
        return dict.fromkeys(keys)
    weighted = zeroed * weights
    means = weighted.sum(axis=0, dtype=np.float64)[valid] / weight_sum[valid]
    centred = means - means.mean()
    rms = float(np.sqrt(np.mean(centred**2)))
    # Variance of a weighted mean of independent pixels: s^2 sum(w^2) / (sum w)^2.
    squares = weights.astype(np.float64)
    np.square(squares, out=squares)
    square_sum = squares.sum(axis=0)[valid]
    white = float(np.mean(within * square_sum / weight_sum[valid] ** 2))
    excess = math.sqrt(max(rms**2 - white, 0.0))
    return dict(zip(keys, (rms, math.sqrt(white), excess), strict=True))


def _row_means(zeroed, use):
    counts = np.count_nonzero(use, axis=1)
    sums = zeroed.sum(axis=1, dtype=np.float64)
    valid = counts >= 1
    means = np.zeros(zeroed.shape[0])
    means[valid] = sums[valid] / counts[valid]
    return means, valid


def _image_metrics(image, background_mask, *, lowfreq_cutoff, edge_width, series=None):
    """Per-image metrics; ``series``, if given, receives the banding spectrum and white
    level they were measured from (as :func:`banding_power_spectrum` and
    :func:`banding_white_level` compute them)."""
    use, median, sigma = _background_pixels(image, background_mask)
    n_nonfinite = int(np.count_nonzero(~np.isfinite(image)))
    result = dict.fromkeys(_IMAGE_KEYS)
    result["n_nonfinite"] = n_nonfinite
    if series is not None:
        series["white"] = None
    zeroed = _zeroed(image, use)
    if not use.any():
        if series is not None:
            series["spectrum"] = _series_power(*_column_means(zeroed, use)[:2])
        return result
    # Median and MAD are taken before the 5-sigma clip: the clip removes far
    # less than the 50 % a MAD tolerates, so recomputing would change nothing
    # but the run time.
    result["background_median"] = median
    result["background_rms"] = sigma

    column_means, column_valid, column_counts = _column_means(zeroed, use)
    if column_valid.sum() >= 2:
        centred = column_means[column_valid] - column_means[column_valid].mean()
        result["banding_rms"] = float(np.sqrt(np.mean(centred**2)))
        within = _pooled_variance(image, use, column_means, column_valid, column_counts, sigma)
        white = float(np.mean(within / column_counts[column_valid]))
        result["banding_white_rms"] = float(np.sqrt(white))
        excess = result["banding_rms"] ** 2 - white
        result["banding_excess_rms"] = float(np.sqrt(max(excess, 0.0)))
        result.update(_uniform_banding(zeroed, use, column_valid, within))
        if series is not None:
            series["white"] = _as_float(2.0 * white / image.shape[1])
    if series is not None:
        series["spectrum"] = _series_power(column_means, column_valid)
    result["lowfreq_power_rows"] = _lowfreq_power(column_means, column_valid, lowfreq_cutoff)
    row_means, row_valid = _row_means(zeroed, use)
    result["lowfreq_power_columns"] = _lowfreq_power(row_means, row_valid, lowfreq_cutoff)
    frame_rms, interior_rms, amplitude = _picture_frame(zeroed, use, edge_width)
    result["frame_rms"] = frame_rms
    result["interior_rms"] = interior_rms
    result["picture_frame_amplitude"] = amplitude
    return {key: (_as_float(v) if key != "n_nonfinite" else v) for key, v in result.items()}


def _guard_metrics(fit_info, max_listed):
    guard = {
        "n_lines": None,
        "n_guarded": None,
        "n_uncleaned": None,
        "guarded_fraction": None,
        "uncleaned_fraction": None,
        "uncleaned_lines": [],
        "guarded_lines": [],
        # The readout method has no guard: a line without background takes the
        # prediction of its neighbours, and the data choose how many modes to fit.
        "n_predicted": None,
        "common_modes": None,
        "output_modes": None,
    }
    if not fit_info:
        return guard
    if fit_info.get("method") == "readout":
        for key in ("n_predicted", "common_modes", "output_modes"):
            if fit_info.get(key) is not None:
                guard[key] = int(fit_info[key])
        n_lines = fit_info.get("n_lines")
        guard["n_lines"] = None if n_lines is None else int(n_lines)
        guard["n_guarded"] = guard["n_uncleaned"] = 0
        if guard["n_lines"]:
            guard["guarded_fraction"] = guard["uncleaned_fraction"] = 0.0
        return guard
    frequencies = fit_info.get("frequencies")
    if frequencies is not None:
        frequencies = np.asarray(frequencies, dtype=int).ravel()
    n_lines = fit_info.get("n_lines")
    if n_lines is None and frequencies is not None:
        n_lines = frequencies.size
    n_uncleaned = fit_info.get("n_uncleaned")
    if frequencies is not None and frequencies.size:
        uncleaned = np.flatnonzero(frequencies < 0)
        fitted = frequencies[frequencies >= 0]
        # The guard lowers the highest frequency on lines whose gaps make the
        # full fit unstable; lines below the requested frequency (or, if the
        # info does not say, below the highest one used) are the guarded ones.
        nominal = fit_info.get("max_frequency")
        if nominal is None and fitted.size:
            nominal = int(fitted.max())
        if nominal is not None:
            guarded = np.flatnonzero((frequencies >= 0) & (frequencies < nominal))
        else:
            guarded = np.zeros(0, dtype=int)
        guard["uncleaned_lines"] = [int(i) for i in uncleaned[:max_listed]]
        guard["guarded_lines"] = [int(i) for i in guarded[:max_listed]]
        if n_uncleaned is None:
            n_uncleaned = uncleaned.size
    n_guarded = fit_info.get("n_guarded")
    if n_guarded is None and frequencies is not None and frequencies.size:
        n_guarded = guarded.size
    guard["n_lines"] = None if n_lines is None else int(n_lines)
    guard["n_guarded"] = None if n_guarded is None else int(n_guarded)
    guard["n_uncleaned"] = None if n_uncleaned is None else int(n_uncleaned)
    if guard["n_lines"]:
        if guard["n_guarded"] is not None:
            guard["guarded_fraction"] = guard["n_guarded"] / guard["n_lines"]
        if guard["n_uncleaned"] is not None:
            guard["uncleaned_fraction"] = guard["n_uncleaned"] / guard["n_lines"]
    return guard


def _flags(metrics, thresholds):
    """Human-readable warnings; each names the measured value and the threshold."""
    flags = []
    before, after, model = metrics["before"], metrics["after"], metrics["model"]
    if metrics["n_background"] == 0:
        return ["no usable background pixels: no metric can be measured"]
    frac = metrics["background_fraction"]
    if frac < thresholds["min_background_fraction"]:
        flags.append(
            f"low background fraction {frac:.3f} < {thresholds['min_background_fraction']}"
        )
    n_columns = metrics["shape"][1]
    if n_columns and metrics["columns_starved"] / n_columns > thresholds["max_starved_fraction"]:
        flags.append(
            f"{metrics['columns_starved']} of {n_columns} columns have under "
            f"{thresholds['starved_column_fraction']:.0%} background pixels"
        )
    ratio = metrics["ratio"]
    if (
        ratio["background_rms"] is not None
        and ratio["background_rms"] > 1 + thresholds["rms_increase_tolerance"]
    ):
        flags.append(
            f"background rms went up: {before['background_rms']:.4g} -> "
            f"{after['background_rms']:.4g} (x{ratio['background_rms']:.3f})"
        )
    if ratio["banding_rms"] is not None and ratio["banding_rms"] > thresholds["max_banding_ratio"]:
        flags.append(
            f"banding not reduced: {before['banding_rms']:.4g} -> {after['banding_rms']:.4g} "
            f"(x{ratio['banding_rms']:.3f} > {thresholds['max_banding_ratio']})"
        )
    if (
        after["banding_uniform_excess_rms"] is not None
        and after["banding_uniform_white_rms"]
        and after["banding_uniform_excess_rms"]
        > thresholds["max_residual_banding"] * after["banding_uniform_white_rms"]
    ):
        flags.append(
            f"residual banding: length-weighted excess {after['banding_uniform_excess_rms']:.4g}"
            f" after cleaning is over {thresholds['max_residual_banding']} x the white-noise "
            f"level {after['banding_uniform_white_rms']:.4g}"
        )
    if ratio["frame_rms"] is not None and ratio["frame_rms"] > thresholds["max_frame_ratio"]:
        flags.append(
            f"picture frame rms went up: {before['frame_rms']:.4g} -> {after['frame_rms']:.4g} "
            f"(x{ratio['frame_rms']:.3f} > {thresholds['max_frame_ratio']})"
        )
    if (
        model["rms"] is not None
        and before["background_rms"]
        and model["rms"] > thresholds["max_model_ratio"] * before["background_rms"]
    ):
        flags.append(
            f"model rms {model['rms']:.4g} exceeds {thresholds['max_model_ratio']} x "
            f"background rms {before['background_rms']:.4g}"
        )
    new_nonfinite = after["n_nonfinite"] - before["n_nonfinite"]
    if new_nonfinite > 0:
        flags.append(f"cleaning introduced {new_nonfinite} non-finite pixels")
    if model["n_nonfinite"]:
        flags.append(f"model has {model['n_nonfinite']} non-finite pixels")
    guard = metrics["guard"]
    if (
        guard["guarded_fraction"] is not None
        and guard["guarded_fraction"] > thresholds["max_guarded_fraction"]
    ):
        flags.append(
            f"guard lowered the frequencies on {guard['guarded_fraction']:.1%} of lines "
            f"({guard['n_guarded']} of {guard['n_lines']})"
        )
    if (
        guard["uncleaned_fraction"] is not None
        and guard["uncleaned_fraction"] > thresholds["max_uncleaned_fraction"]
    ):
        flags.append(
            f"{guard['uncleaned_fraction']:.1%} of lines left uncleaned "
            f"({guard['n_uncleaned']} of {guard['n_lines']})"
        )
    predicted = guard.get("n_predicted")
    if predicted and guard["n_lines"]:
        fraction = predicted / guard["n_lines"]
        if fraction > thresholds["max_uncleaned_fraction"]:
            flags.append(
                f"{fraction:.1%} of lines have no background pixel: their model is the "
                f"prediction from the neighbouring lines ({predicted} of {guard['n_lines']})"
            )
    return flags


def exposure_metrics(
    before,
    after,
    model,
    background_mask,
    *,
    fit_info=None,
    lowfreq_cutoff=1.0 / 128,
    edge_width=128,
    n_worst_columns=5,
    max_listed_lines=20,
    spectra=None,
    **thresholds,
):
    """Measure how well one exposure was cleaned.

    Parameters
    ----------
    before, after : ndarray, shape (ny, nx)
        The DMS-frame image before and after cleaning (same units, same shape).
        NaNs are allowed and ignored.
    model : ndarray, shape (ny, nx) or None
        The subtracted background model (``before - after`` where the cleaner
        changed anything). None leaves the model metrics empty.
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background (what the cleaner fitted).
    fit_info : dict, optional
        ``FitResult.info`` of the cleaner: ``n_lines``, ``n_guarded``,
        ``n_uncleaned``, ``max_frequency`` and a per-line ``frequencies``
        array (highest frequency fitted, -1 = line left uncleaned). Line
        indices are reported in the cleaner's order: DMS columns in line mode,
        chunks in timeseries mode.
    lowfreq_cutoff : float
        Highest spatial frequency (cycles per pixel) counted as "low" in the
        low-frequency powers. Default 1/128: structures larger than 128 px.
    edge_width : float
        Width in pixels of the band along the four array edges in which the
        picture frame is measured.
    n_worst_columns : int
        How many columns with the fewest background pixels to list.
    max_listed_lines : int
        At most this many guarded / uncleaned line indices are listed.
    spectra : dict, optional
        If given, filled with what the banding metrics were measured from, so that
        the spectrum figure need not measure it again: ``"before"`` and ``"after"``
        map to ``(freq, power)`` as :func:`banding_power_spectrum` returns it for
        that image, ``"white"`` to :func:`banding_white_level` of ``after``.
    **thresholds
        Overrides for :data:`DEFAULT_THRESHOLDS` (``rms_increase_tolerance``,
        ``max_banding_ratio``, ``max_residual_banding``, ``max_frame_ratio``,
        ``max_model_ratio``, ``max_guarded_fraction``, ``max_uncleaned_fraction``,
        ``min_background_fraction``, ``starved_column_fraction``,
        ``max_starved_fraction``); see docs/qa.md.

    Returns
    -------
    dict
        JSON-serialisable (plain floats/ints/lists; None where a metric cannot
        be measured) with keys ``schema``, ``shape``, ``background_fraction``,
        ``n_background``, ``columns_starved``, ``worst_columns`` (list of
        ``[column, n_background]``), ``before`` and ``after`` (per-image
        metrics), ``ratio`` (after / before), ``model``, ``guard``, ``flags``
        (list of warnings) and ``thresholds`` (the effective values).

    Notes
    -----
    A DMS column is one detector fast-scan line (Rauscher 2024, Sec. 2), so
    "banding" is measured on the series of background column means and
    "along rows" means that series as a function of column index. The exact
    definitions are in ``docs/qa.md``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> before = rng.normal(size=(256, 256)) + rng.normal(size=256)[None, :]
    >>> after = before - before.mean(axis=0)
    >>> m = exposure_metrics(before, after, before - after, np.ones((256, 256), bool))
    >>> m["after"]["banding_rms"] < 0.1 < m["before"]["banding_rms"]
    True
    """
    unknown = set(thresholds) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise TypeError(
            f"unknown threshold(s) {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}"
        )
    effective = {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in thresholds.items()}}
    before = _validate(before, "before")
    after = _validate(after, "after", before.shape)
    mask = _validate_mask(background_mask, before.shape)

    metrics = {"schema": SCHEMA_VERSION,
               **_coverage(before, mask, effective["starved_column_fraction"], n_worst_columns),
               "lowfreq_cutoff": float(lowfreq_cutoff), "edge_width": float(edge_width)}
    options = {"lowfreq_cutoff": lowfreq_cutoff, "edge_width": edge_width}
    series = {"before": {}, "after": {}} if spectra is not None else {}
    metrics["before"] = _image_metrics(before, mask, series=series.get("before"), **options)
    metrics["after"] = _image_metrics(after, mask, series=series.get("after"), **options)
    if spectra is not None:
        spectra.update(before=series["before"]["spectrum"], after=series["after"]["spectrum"],
                       white=series["after"]["white"])
    metrics["ratio"] = {
        key: _ratio(metrics["after"][key], metrics["before"][key])
        for key in ("background_rms", "banding_rms", "frame_rms")
    }

    metrics["model"] = _model_metrics(model, before.shape)
    metrics["guard"] = _guard_metrics(fit_info, max_listed_lines)
    metrics["flags"] = _flags(metrics, effective)
    metrics["thresholds"] = effective
    return metrics


def _coverage(before, mask, starved_fraction, n_worst_columns) -> dict:
    """How much background each column has: the fraction, starved and worst columns."""
    usable = mask & np.isfinite(before)
    counts = usable.sum(axis=0)
    ny, nx = before.shape
    order = np.argsort(counts, kind="stable")[:n_worst_columns]
    return {
        "shape": [int(ny), int(nx)],
        "background_fraction": float(usable.sum()) / before.size if before.size else 0.0,
        "n_background": int(usable.sum()),
        "columns_starved": int(np.count_nonzero(counts < starved_fraction * ny)),
        "worst_columns": [[int(c), int(counts[c])] for c in order],
    }


def _model_metrics(model, shape) -> dict:
    """rms and largest deviation of the subtracted model from its pedestal."""
    model_metrics = {"rms": None, "max_abs": None, "n_nonfinite": 0}
    if model is None:
        return model_metrics
    model = _validate(model, "model", shape)
    finite = np.isfinite(model)
    model_metrics["n_nonfinite"] = int(np.count_nonzero(~finite))
    if finite.any():
        # The model's overall level is the sky/dark pedestal, not noise.
        # (a flat view when every pixel is finite: the same values in the same order)
        values = model.ravel() if model_metrics["n_nonfinite"] == 0 else model[finite]
        pedestal, _ = _robust_location_scale(values)
        deviation = values - pedestal
        # The largest |d| is that of the largest or the smallest d (no array of |d|).
        model_metrics["max_abs"] = _as_float(
            max(abs(float(deviation.max())), abs(float(deviation.min())))
        )
        np.square(deviation, out=deviation)
        model_metrics["rms"] = _as_float(np.sqrt(np.mean(deviation, dtype=np.float64)))
    return model_metrics


def banding_power_spectrum(image, background_mask):
    """Power spectrum of the background column means (the vertical banding).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        DMS-frame image; NaNs are ignored.
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background.

    Returns
    -------
    freq : ndarray
        Spatial frequency in cycles per column, excluding zero.
    power : ndarray
        One-sided periodogram of the column-mean series, in image units
        squared per frequency bin; it sums to the variance of the column means.
        Both arrays are empty when fewer than two columns have background.

    Notes
    -----
    Column means use the same clipped background pixels as
    :func:`exposure_metrics`; columns without background are linearly
    interpolated from their neighbours.
    """
    _, _, _, means, valid, _ = _column_series(image, background_mask)
    return _series_power(means, valid)


def banding_white_level(image, background_mask):
    """Power per frequency bin that white noise alone puts in the banding spectrum.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        DMS-frame image; NaNs are ignored.
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background.

    Returns
    -------
    float or None
        ``2 * banding_white_rms**2 / nx`` (image units squared): white noise
        spreads the variance of the column means evenly over the ``nx / 2``
        bins of :func:`banding_power_spectrum`. None without two background
        columns.
    """
    image, use, sigma, means, valid, counts = _column_series(image, background_mask)
    if valid.sum() < 2:
        return None
    white = _white_variance(image, use, means, valid, counts, sigma)
    return _as_float(2.0 * white / image.shape[1])


def flatten_metrics(metrics):
    """Flatten a metrics dict to the scalar columns of :data:`FLAT_METRIC_KEYS`.

    Parameters
    ----------
    metrics : dict or None
        As returned by :func:`exposure_metrics` (or loaded back from JSON).

    Returns
    -------
    dict
        Ordered like ``FLAT_METRIC_KEYS``; lists are joined into strings
        (flags with " | ", worst columns as ``col:n``), missing values are None.
    """
    flat = dict.fromkeys(FLAT_METRIC_KEYS)
    if not metrics:
        return flat
    for key in FLAT_METRIC_KEYS:
        if key == "flags":
            flat[key] = " | ".join(metrics.get("flags") or [])
        elif key == "n_flags":
            flat[key] = len(metrics.get("flags") or [])
        elif key == "worst_columns":
            pairs = metrics.get("worst_columns") or []
            flat[key] = " ".join(f"{c}:{n}" for c, n in pairs)
        elif "." in key:
            group, name = key.split(".", 1)
            flat[key] = (metrics.get(group) or {}).get(name)
        else:
            flat[key] = metrics.get(key)
    return flat
