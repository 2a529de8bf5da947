"""NSClean: remove correlated read noise from JWST NIRSpec count-rate images.

The algorithm follows Rauscher (2024, PASP), "NSClean: An Algorithm for Removing
Correlated Noise from JWST NIRSpec Images": for every detector fast-scan line a
few low Fourier frequencies are fitted to the background pixels by weighted
least squares, apodized, transformed back and subtracted.
"""

__version__ = "0.1.0"

from .core import FitResult, NSClean, apodizer, clean, fit, fit_background  # noqa: E402

__all__ = ["FitResult", "NSClean", "apodizer", "clean", "fit", "fit_background", "__version__"]
