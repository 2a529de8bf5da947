"""Diagnostic figures of one cleaned exposure, after Rauscher (2024) Figs. 1-5.

Every function takes DMS-frame arrays (a DMS column is one detector fast-scan
line), writes one PNG atomically (temporary file + ``os.replace``, so a
reader never sees half a file) and returns its path. matplotlib is imported
inside the functions so that ``import nsclean`` stays fast; only the Agg
renderer is used (no pyplot, no display, no global figure state).

Speed: images are block-averaged to at most ``display_size`` pixels per axis
before smoothing, image panels get only the pixels they show, the PNGs are
compressed at zlib level 1 and the garbage collector is paused while a set is
drawn: a full 2048 x 2048 frame renders a whole set in ~0.7 s of CPU once
matplotlib is imported. See docs/qa.md.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os

import numpy as np

from ..algorithm._blocks import block_count, block_sum
from ..io.atomic import atomic_write

__all__ = [
    "DPI",
    "FIGURE_SIZES",
    "THUMBNAIL_SIZE",
    "plot_column",
    "plot_comparison",
    "plot_mask",
    "plot_power_spectrum",
    "write_figures",
    "write_thumbnail",
]

DPI = 100
#: Figure sizes in inches (width, height); the PNG is ``DPI`` times that.
FIGURE_SIZES = {
    "comparison": (12.0, 4.0),
    "comparison_wide": (12.0, 6.0),
    "mask": (6.0, 6.0),
    "mask_wide": (12.0, 3.0),
    "column": (9.0, 6.0),
    "spectrum": (7.0, 4.5),
}
#: Height in pixels of each half of the before|after thumbnail.
THUMBNAIL_SIZE = 128

_MAD_TO_SIGMA = 1.4826
# Images whose width exceeds their height by more than this factor (subarrays
# such as 32 x 2048) are laid out one panel above the other.
_WIDE = 4.0
# Title height in axes coordinates for axes without decorations above them (no top
# tick labels, no offset text): where matplotlib would place it anyway, but given
# explicitly it skips the search for such decorations at every draw (a second
# layout of the y tick labels).
_TITLE_Y = 1.0
# zlib level 6 (the default) spends ~0.1 s per noise-like figure for ~20 % smaller
# files; level 1 is the better trade for a few hundred KB per exposure.
_PNG_COMPRESSION = 1


def _save(figure, path):
    return atomic_write(
        path,
        lambda handle: figure.savefig(
            handle, format="png", dpi=DPI, pil_kwargs={"compress_level": _PNG_COMPRESSION}
        ),
    )


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector while a figure set is built and drawn.

    matplotlib allocates tens of thousands of small objects per set, enough to
    trigger a full collection, which traverses every object of the process
    (matplotlib's modules included): ~60 ms of a full-frame set. The figures'
    reference cycles are freed by the first collection after this.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _new_figure(kind):
    from matplotlib.figure import Figure

    return Figure(figsize=FIGURE_SIZES[kind], dpi=DPI)


def _block_factors(shape, display_size):
    return tuple(max(1, math.ceil(n / display_size)) for n in shape)


def _pixel_count(shape, factors):
    """Number of image pixels per block (fewer in the partial blocks at the far edges)."""
    per_axis = [np.minimum(n - np.arange(0, n, f), f) for n, f in zip(shape, factors, strict=True)]
    return np.outer(*per_axis).astype(np.float64)


def _block_mean(zeroed, use, factors):
    """Mean of the ``use`` pixels of each block and their number: (mean, count).

    ``zeroed`` must be zero where ``use`` is False; ``use=None`` means every pixel.
    Blocks without a pixel to use get NaN.
    """
    sums = block_sum(zeroed, factors)
    counts = _pixel_count(zeroed.shape, factors) if use is None else block_count(use, factors)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, counts


def _display(image, factors, smooth_sigma):
    """Block-average then Gaussian-smooth, ignoring NaNs (normalised convolution).

    smooth_sigma is in full-resolution pixels; on the block grid it becomes
    smooth_sigma / block, and the block average itself adds the rest of the
    smoothing that shows correlated noise (Rauscher 2024, Fig. 1).
    """
    from scipy.ndimage import gaussian_filter

    # float32 halves the memory traffic of the full-resolution pass; the
    # block sums themselves are accumulated in float64.
    image = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(image)
    if finite.all():
        means, counts = _block_mean(image, None, factors)
    else:
        means, counts = _block_mean(np.where(finite, image, np.float32(0.0)), finite, factors)
    sigma = [max(smooth_sigma / f, 0.5) if smooth_sigma else 0.0 for f in factors]
    has_data = counts > 0
    if not any(sigma):
        smoothed = means
    elif has_data.all():
        # Every weight is 1: the normalisation is 1 too.
        smoothed = gaussian_filter(means, sigma)
    else:
        weight = has_data.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            smoothed = gaussian_filter(np.where(has_data, means, 0.0), sigma) / gaussian_filter(
                weight, sigma
            )
    smoothed[~has_data] = np.nan
    return smoothed


def _robust(values):
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    if not sigma > 0:
        sigma = float(np.std(values)) or 1.0
    return median, sigma


def _mask_fraction(background_mask, factors):
    """Fraction of background pixels per block (None without a mask)."""
    if background_mask is None:
        return None
    mask = np.asarray(background_mask, dtype=bool)
    return block_count(mask, factors) / _pixel_count(mask.shape, factors)


def _stretch_halfwidth(display, mask_display, n_sigma):
    """Grey stretch half-width: n_sigma robust sigma of the smoothed background."""
    if mask_display is not None and np.any(mask_display > 0.5):
        _, sigma = _robust(display[mask_display > 0.5])
    else:
        _, sigma = _robust(display)
    return n_sigma * sigma


def _max_n_locator(n):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


def _sparse_ticks(ax, shape):
    # Three ticks per image axis: the text of the tick labels is most of a
    # figure's drawing time, and 0 / middle / end is all a reader needs.
    ax.set_xticks([0, shape[1] // 2, shape[1]])
    ax.set_yticks([0, shape[0] // 2, shape[0]])
    ax.tick_params(labelsize=7)


def _is_wide(shape):
    return shape[1] > _WIDE * shape[0]


def _nearest_picks(n, pixels):
    """Indices of ``ceil(pixels)`` evenly spread samples of ``n`` (all of them if fewer)."""
    m = math.ceil(pixels)
    if m >= n:
        return np.arange(n)
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(int), n - 1)


def _fit_to_panel(image, data):
    """Give an ``AxesImage`` only as many pixels of ``data`` as its panel has.

    Agg resamples an image to the panel's pixels when it draws ('nearest': it picks
    the nearest pixel); picking them here, once the layout (colorbar, aspect) is
    final, spares it resampling and colour-mapping the whole reduced view (512 x 512
    for the 254 x 254 px panels of a full-frame comparison). Extent, axes and ticks
    are unchanged.
    """
    ax = image.axes
    ax.apply_aspect()
    box = ax.get_position()
    width, height = ax.figure.get_size_inches() * ax.figure.dpi * (box.width, box.height)
    rows = _nearest_picks(data.shape[0], height)
    columns = _nearest_picks(data.shape[1], width)
    image.set_data(data[np.ix_(rows, columns)])


def plot_comparison(
    before,
    after,
    model,
    path,
    *,
    background_mask=None,
    n_sigma=2.5,
    smooth_sigma=2.0,
    display_size=512,
    title=None,
):
    """Smoothed before / after / model images on one grey stretch (paper Figs. 1, 3).

    Parameters
    ----------
    before, after : ndarray, shape (ny, nx)
        DMS-frame image before and after cleaning.
    model : ndarray, shape (ny, nx) or None
        The subtracted model; None leaves its panel out.
    path : str or os.PathLike
        PNG to write.
    background_mask : ndarray of bool, optional
        When given, the stretch is measured on background pixels only, so
        bright spectra do not widen it.
    n_sigma : float
        Half-width of the grey stretch in robust sigma of the smoothed
        ``before`` background. Every panel uses the same width, centred on its
        own median (the model carries the sky pedestal).
    smooth_sigma : float
        Gaussian sigma in full-resolution pixels.
    display_size : int
        Images are block-averaged to at most this many pixels per axis.
    title : str, optional
        Figure title.

    Returns
    -------
    str
        ``path``.
    """
    before = np.asarray(before)
    factors = _block_factors(before.shape, display_size)
    panels = [("before", before), ("after", after)]
    if model is not None:
        panels.append(("model", model))
    displays = [(name, _display(image, factors, smooth_sigma)) for name, image in panels]
    mask_display = _mask_fraction(background_mask, factors)
    return _render_comparison(displays, mask_display, before.shape, path, n_sigma, title)


def _background_centre(display, mask_display):
    """Median of the finite background of a view (``_robust``'s median, without its MAD)."""
    if mask_display is not None and np.any(mask_display > 0.5):
        display = display[mask_display > 0.5]
    values = display[np.isfinite(display)]
    return float(np.median(values)) if values.size else 0.0


def _render_comparison(displays, mask_display, shape, path, n_sigma, title):
    halfwidth = _stretch_halfwidth(displays[0][1], mask_display, n_sigma)
    wide = _is_wide(shape)
    figure = _new_figure("comparison_wide" if wide else "comparison")
    n = len(displays)
    axes = np.atleast_1d(figure.subplots(n, 1) if wide else figure.subplots(1, n))
    figure.subplots_adjust(left=0.04, right=0.88, bottom=0.07, top=0.88, wspace=0.15, hspace=0.35)
    shown = []
    for ax, (name, display) in zip(axes, displays, strict=True):
        centre = _background_centre(display, mask_display)
        shown.append(display - centre)
        image = ax.imshow(
            shown[-1],
            origin="lower",
            cmap="gray",
            vmin=-halfwidth,
            vmax=halfwidth,
            interpolation="nearest",
            aspect="auto" if wide else "equal",
            extent=(0, shape[1], 0, shape[0]),
        )
        ax.set_title(f"{name} (median {centre:.3g})", fontsize=9, y=_TITLE_Y)
        _sparse_ticks(ax, shape)
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02)
    colorbar.locator = _max_n_locator(5)
    colorbar.update_ticks()
    colorbar.set_label(f"offset from panel median (stretch +-{n_sigma} sigma)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    # Now that the colorbar has taken its space the panels have their final size.
    for ax, data in zip(axes, shown, strict=True):
        _fit_to_panel(ax.images[0], data)
    return _save(figure, path)


def plot_mask(image, background_mask, path, *, display_size=512, title=None):
    """The image in grey with background pixels shaded red (paper Fig. 2).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        DMS-frame image (typically ``before``).
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background.
    path : str or os.PathLike
        PNG to write.
    display_size : int
        Block-average to at most this many pixels per axis; a block is shaded
        in proportion to its background fraction.
    title : str, optional
        Figure title.

    Returns
    -------
    str
        ``path``.
    """
    image = np.asarray(image)
    factors = _block_factors(image.shape, display_size)
    display = _display(image, factors, 0.0)
    fraction = _mask_fraction(background_mask, factors)
    background_fraction = float(np.mean(np.asarray(background_mask, dtype=bool)))
    return _render_mask(display, fraction, background_fraction, image.shape, path, title)


def _render_mask(display, fraction, background_fraction, shape, path, title):
    finite = display[np.isfinite(display)]
    # A percentile stretch, not a sigma one: this figure is about where the
    # spectra are, and they must stay visible against the background.
    low, high = np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0)
    grey = np.clip((np.nan_to_num(display, nan=low) - low) / max(high - low, 1e-30), 0, 1)
    alpha = 0.45 * np.nan_to_num(fraction)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    red = np.array([0.9, 0.1, 0.1])
    rgb = rgb * (1 - alpha[:, :, None]) + red * alpha[:, :, None]

    wide = _is_wide(shape)
    figure = _new_figure("mask_wide" if wide else "mask")
    ax = figure.subplots()
    image = ax.imshow(
        rgb,
        origin="lower",
        interpolation="nearest",
        aspect="auto" if wide else "equal",
        extent=(0, shape[1], 0, shape[0]),
    )
    _sparse_ticks(ax, shape)
    ax.set_title(
        (title + "\n" if title else "") + f"background (red): {background_fraction:.1%} of pixels",
        fontsize=9,
        y=_TITLE_Y,
    )
    _fit_to_panel(image, rgb)
    return _save(figure, path)


def _default_column(model, background_mask):
    """Column with the largest model variation among well-sampled columns."""
    counts = np.count_nonzero(np.asarray(background_mask, dtype=bool), axis=0)
    if model is None:
        return int(np.argmax(counts)) if counts.size else 0
    model = np.asarray(model, dtype=float)
    if np.isnan(model).any():
        with np.errstate(invalid="ignore"):
            spread = np.nanstd(model, axis=0)
    else:
        spread = _column_std(model)
    spread = np.where(counts >= np.median(counts), np.nan_to_num(spread), -1.0)
    return int(np.argmax(spread))


def _column_std(image, rows_per_block=128):
    """``np.std(image, axis=0)`` of a finite float64 image, a block of rows at a time.

    numpy sums along axis 0 one row after the other, and so does this (each block's
    sum starts from the running total), so the values are the same; but it needs no
    full-size arrays of deviations and squares (2 x 32 MB for a full frame), whose
    allocation costs more than the arithmetic. (np.nanstd computes the same values
    when there is no NaN.)
    """
    ny, nx = image.shape
    work = np.empty((rows_per_block + 1, nx))  # row 0: the running total
    blocks = [(start, min(start + rows_per_block, ny)) for start in range(0, ny, rows_per_block)]

    def add(total, n):
        """total + work[1] + ... + work[n], in that order."""
        if total is None:
            return work[1 : 1 + n].sum(axis=0)
        work[0] = total
        return work[: 1 + n].sum(axis=0)

    total = None
    for start, stop in blocks:
        work[1 : 1 + stop - start] = image[start:stop]
        total = add(total, stop - start)
    mean = total / ny
    total = None
    for start, stop in blocks:
        deviations = work[1 : 1 + stop - start]
        np.subtract(image[start:stop], mean, out=deviations)
        np.square(deviations, out=deviations)
        total = add(total, stop - start)
    return np.sqrt(total / ny)


def plot_column(
    before,
    model,
    background_mask,
    path,
    *,
    column=None,
    weight_sigma=32.0,
    title=None,
):
    """One DMS column (one fast-scan line): samples and model (paper Figs. 4, 5).

    Parameters
    ----------
    before : ndarray, shape (ny, nx)
        DMS-frame image before cleaning.
    model : ndarray, shape (ny, nx) or None
        The fitted model, drawn as a line.
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background.
    path : str or os.PathLike
        PNG to write.
    column : int, optional
        DMS column to show. Default: among columns with at least the median
        number of background pixels, the one where the model varies most.
    weight_sigma : float
        Gaussian sigma (px) of the local background density drawn in the lower
        panel (the cleaner's weights are 1 / density^2).
    title : str, optional
        Figure title.

    Returns
    -------
    str
        ``path``.
    """
    from scipy.ndimage import gaussian_filter1d

    before = np.asarray(before)
    mask = np.asarray(background_mask, dtype=bool)
    if column is None:
        column = _default_column(model, mask)
    if not 0 <= column < before.shape[1]:
        raise ValueError(f"column {column} outside 0..{before.shape[1] - 1}")
    values = np.asarray(before[:, column], dtype=float)
    is_background = mask[:, column] & np.isfinite(values)
    rows = np.arange(values.size)

    figure = _new_figure("column")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    illuminated = ~mask[:, column] & np.isfinite(values)
    top.plot(
        rows[illuminated],
        values[illuminated],
        ".",
        ms=1.5,
        color="tab:orange",
        label="masked (potentially illuminated)",
    )
    top.plot(
        rows[is_background],
        values[is_background],
        ".",
        ms=2.0,
        color="tab:blue",
        label="background samples",
    )
    if model is not None:
        top.plot(
            rows,
            np.asarray(np.asarray(model)[:, column], dtype=float),
            "-",
            lw=1.5,
            color="navy",
            label="model",
        )
    centre, sigma = _robust(values[is_background]) if is_background.any() else _robust(values)
    top.set_ylim(centre - 6 * sigma, centre + 6 * sigma)
    top.set_ylabel("value (image units)", fontsize=8)
    top.legend(fontsize=7, loc="upper right", markerscale=4)
    top.set_title((title + ": " if title else "") + f"DMS column {column}", fontsize=9)

    density = gaussian_filter1d(mask[:, column].astype(float), weight_sigma, mode="constant")
    bottom.step(
        rows,
        mask[:, column].astype(float),
        where="mid",
        lw=0.6,
        color="grey",
        label="mask (1 = background)",
    )
    bottom.plot(
        rows,
        density,
        color="tab:green",
        lw=1.2,
        label=f"background density (Gaussian sigma {weight_sigma:g} px)",
    )
    bottom.set_ylim(-0.05, 1.1)
    bottom.set_xlabel("DMS row (position along the fast-scan line)", fontsize=8)
    bottom.legend(fontsize=7, loc="upper right")
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    figure.subplots_adjust(left=0.09, right=0.98, top=0.93, bottom=0.09, hspace=0.08)
    return _save(figure, path)


def _log_binned(freq, power, n_bins=30):
    """Mean power in logarithmic frequency bins (a raw periodogram scatters by 100 %)."""
    edges = np.geomspace(freq.min(), freq.max() * (1 + 1e-9), n_bins + 1)
    index = np.digitize(freq, edges) - 1
    counts = np.bincount(index, minlength=n_bins)[:n_bins]
    sums = np.bincount(index, weights=power, minlength=n_bins)[:n_bins]
    filled = counts > 0
    centres = np.sqrt(edges[:-1] * edges[1:])
    return centres[filled], sums[filled] / counts[filled]


def plot_power_spectrum(before, after, background_mask, path, *, title=None, spectra=None):
    """Power spectrum of the background column means, before and after.

    Parameters
    ----------
    before, after : ndarray, shape (ny, nx)
        DMS-frame images.
    background_mask : ndarray of bool, shape (ny, nx)
        True where a pixel is background.
    path : str or os.PathLike
        PNG to write.
    title : str, optional
        Figure title.
    spectra : dict, optional
        The spectra and white level of these images as filled in by
        :func:`nsclean.algorithm.qa.exposure_metrics` (``spectra=``); measured here if not given.

    Returns
    -------
    str
        ``path``.

    Notes
    -----
    Uses :func:`nsclean.algorithm.qa.banding_power_spectrum`; the spectrum of the column
    means is the spectrum of the vertical banding. Thin lines: the raw
    periodogram; thick lines: its mean in 30 logarithmic frequency bins;
    dashed: what white noise alone would give after cleaning
    (:func:`nsclean.algorithm.qa.banding_white_level`).
    """
    from ..algorithm.qa import banding_power_spectrum, banding_white_level

    if spectra is None:
        spectra = {
            "before": banding_power_spectrum(before, background_mask),
            "after": banding_power_spectrum(after, background_mask),
            "white": banding_white_level(after, background_mask),
        }
    figure = _new_figure("spectrum")
    ax = figure.subplots()
    plotted = False
    white = spectra["white"]
    if white:
        ax.axhline(white, color="grey", ls="--", lw=1, label="white-noise level (after)")
    for name, colour in (("before", "tab:red"), ("after", "tab:blue")):
        freq, power = spectra[name]
        positive = power > 0
        if positive.any():
            ax.loglog(freq[positive], power[positive], lw=0.5, color=colour, alpha=0.3)
            centres, means = _log_binned(freq[positive], power[positive])
            ax.loglog(
                centres,
                means,
                lw=1.8,
                color=colour,
                label=f"{name} (total {power.sum():.3g})",
            )
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no background columns", ha="center", transform=ax.transAxes)
    # Mathtext tick labels and minor log ticks cost more than everything else
    # in this figure; plain labels keep it cheap.
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, NullLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("frequency (cycles per column)", fontsize=8)
    ax.set_ylabel("power of column means (units^2 per bin)", fontsize=8)
    ax.set_title(
        (title + ": " if title else "") + "banding power spectrum", fontsize=9, y=_TITLE_Y
    )
    ax.tick_params(labelsize=7)
    figure.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.12)
    return _save(figure, path)


def write_thumbnail(before, after, path, *, background_mask=None, n_sigma=2.5, size=THUMBNAIL_SIZE):
    """Small grey before|after image for the report table.

    Parameters
    ----------
    before, after : ndarray, shape (ny, nx)
        DMS-frame images.
    path : str or os.PathLike
        PNG to write.
    background_mask : ndarray of bool, optional
        When given, each thumbnail pixel is the mean of the *background*
        pixels of its block (blocks without background are mid-grey): the
        thumbnail is there to show banding, and bright spectra would hide it.
    n_sigma : float
        Half-width of the shared grey stretch in robust sigma.
    size : int
        Height in pixels; each half is block-averaged to at most ``size``
        pixels per axis, so a full frame gives a (size) x (2 size) PNG.

    Returns
    -------
    str
        ``path``.
    """

    before = np.asarray(before)
    factors = _block_factors(before.shape, size)
    # Block averaging by 16 is already a strong smoothing; no Gaussian on top.
    left = _background_display(before, background_mask, factors)
    right = _background_display(after, background_mask, factors)
    return _render_thumbnail(left, right, None, path, n_sigma)


def _background_display(image, background_mask, factors):
    """Block mean of the finite background pixels (all finite pixels without a mask)."""
    if background_mask is None:
        return _display(image, factors, 0.0)
    image = np.asarray(image, dtype=np.float32)
    use = np.asarray(background_mask, dtype=bool) & np.isfinite(image)
    means, _ = _block_mean(np.where(use, image, np.float32(0.0)), use, factors)
    return means


def _render_thumbnail(left, right, mask_display, path, n_sigma):
    from matplotlib.image import imsave

    halfwidth = _stretch_halfwidth(left, mask_display, n_sigma)
    panels = []
    for display in (left, right):
        centre = _background_centre(display, mask_display)
        panels.append(np.clip((display - centre) / (2 * halfwidth) + 0.5, 0, 1))
    gap = np.ones((left.shape[0], 2))
    combined = np.nan_to_num(np.hstack([panels[0], gap, panels[1]]), nan=0.5)
    return atomic_write(
        path,
        lambda handle: imsave(
            handle, combined, cmap="gray", vmin=0, vmax=1, origin="lower", format="png"
        ),
    )


def write_figures(
    before,
    after,
    model,
    background_mask,
    directory,
    stem,
    *,
    column=None,
    n_sigma=2.5,
    smooth_sigma=2.0,
    display_size=512,
    spectra=None,
):
    """Write the whole figure set of one exposure.

    Parameters
    ----------
    before, after : ndarray, shape (ny, nx)
        DMS-frame images before and after cleaning.
    model : ndarray or None
        The subtracted model.
    background_mask : ndarray of bool
        True where a pixel is background.
    directory : str or os.PathLike
        Output folder (created if needed).
    stem : str
        Exposure stem; files are ``<stem>_<kind>.png``.
    column : int, optional
        Column for :func:`plot_column`.
    n_sigma, smooth_sigma, display_size : float, float, int
        As in :func:`plot_comparison`; the mask figure reuses the smoothed
        ``before`` view.
    spectra : dict, optional
        For :func:`plot_power_spectrum`: the spectra that
        :func:`nsclean.algorithm.qa.exposure_metrics` filled in (``spectra=``).

    Returns
    -------
    dict
        ``{"comparison", "mask", "column", "spectrum", "thumbnail"}`` -> path.
    """
    with _collector_paused():
        return _write_set(before, after, model, background_mask, os.fspath(directory), stem,
                          column, n_sigma, smooth_sigma, display_size, spectra)


def _write_set(before, after, model, background_mask, directory, stem, column, n_sigma,
               smooth_sigma, display_size, spectra):
    before = np.asarray(before)

    def target(kind):
        return os.path.join(directory, f"{stem}_{kind}.png")

    # One reduced view per image, shared by every figure: the full-resolution
    # pass is what costs time.
    factors = _block_factors(before.shape, display_size)
    panels = [("before", before), ("after", after)]
    if model is not None:
        panels.append(("model", model))
    displays = [(name, _display(image, factors, smooth_sigma)) for name, image in panels]
    mask_display = _mask_fraction(background_mask, factors)
    background_fraction = float(np.mean(np.asarray(background_mask, dtype=bool)))
    shape = before.shape
    thumbnail_factors = _block_factors(shape, THUMBNAIL_SIZE)
    return {
        "comparison": _render_comparison(
            displays, mask_display, shape, target("comparison"), n_sigma, stem
        ),
        "mask": _render_mask(
            displays[0][1], mask_display, background_fraction, shape, target("mask"), stem
        ),
        "column": plot_column(
            before, model, background_mask, target("column"), column=column, title=stem
        ),
        "spectrum": plot_power_spectrum(
            before, after, background_mask, target("spectrum"), title=stem, spectra=spectra
        ),
        "thumbnail": _render_thumbnail(
            _background_display(before, background_mask, thumbnail_factors),
            _background_display(after, background_mask, thumbnail_factors),
            None,
            target("thumbnail"),
            n_sigma,
        ),
    }
