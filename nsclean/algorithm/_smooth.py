"""Gaussian smoothing in numpy, for the QA metrics and figures.

``scipy.ndimage`` costs ~0.4 s to import (most of it scipy's array-API machinery),
which is a tenth of a QA job of the workflow, for a few small smoothings (block
grids of at most 512 x 512, single columns).  These functions compute what
``scipy.ndimage.gaussian_filter`` / ``gaussian_filter1d`` compute with the default
``truncate=4.0``, in the same order of floating-point operations (so the results
are the same to the bit; ``tests/test_qa.py`` checks this against scipy), for
float64 data and the modes used here.
"""

from __future__ import annotations

import numpy as np

# scipy.ndimage mode -> numpy.pad mode
_PAD_MODES = {"reflect": "symmetric", "nearest": "edge", "constant": "constant"}


def _kernel(sigma: float) -> np.ndarray:
    """Normalised Gaussian weights at -radius..radius (scipy's ``_gaussian_kernel1d``)."""
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def gaussian_filter1d(array, sigma: float, axis: int = -1, mode: str = "reflect"):
    """Gaussian filter along one axis, as ``scipy.ndimage.gaussian_filter1d``.

    Parameters
    ----------
    array : array_like
        Input (computed in float64).
    sigma : float
        Standard deviation in samples; the kernel reaches to ``int(4 sigma + 0.5)``.
    axis : int
        Axis to filter along.
    mode : {"reflect", "nearest", "constant"}
        How the input is extended beyond its edges (scipy's names; "constant"
        extends with zeros).

    Returns
    -------
    ndarray of float64
        The filtered array, same shape.
    """
    data = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)
    weights = _kernel(sigma)
    radius = weights.size // 2
    n = data.shape[-1]
    pad = [(0, 0)] * (data.ndim - 1) + [(radius, radius)]
    padded = np.pad(data, pad, mode=_PAD_MODES[mode])
    # scipy's loop for a symmetric kernel: centre first, then the pairs of samples at
    # the same distance, from the outermost pair inwards.
    result = padded[..., radius : radius + n] * weights[radius]
    for offset in range(radius, 0, -1):
        pair = padded[..., radius - offset : radius - offset + n]
        pair = pair + padded[..., radius + offset : radius + offset + n]
        pair *= weights[radius - offset]
        result += pair
    return np.moveaxis(result, -1, axis)


def gaussian_filter(array, sigma, mode: str = "reflect"):
    """Gaussian filter along every axis in turn, as ``scipy.ndimage.gaussian_filter``.

    Parameters
    ----------
    array : array_like
        Input (computed in float64).
    sigma : float or sequence of float
        Standard deviation per axis (one value for all); axes with sigma 0 are left
        as they are.
    mode : {"reflect", "nearest", "constant"}
        As in :func:`gaussian_filter1d`.

    Returns
    -------
    ndarray of float64
        The filtered array.
    """
    result = np.asarray(array, dtype=np.float64)
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=float), (result.ndim,))
    for axis, value in enumerate(sigmas):
        if value > 1e-15:
            result = gaussian_filter1d(result, float(value), axis, mode)
    return result
