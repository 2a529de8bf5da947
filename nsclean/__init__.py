"""NSClean: remove correlated read noise from JWST NIRSpec count-rate images.

The algorithm follows Rauscher (2024, PASP), "NSClean: An Algorithm for Removing
Correlated Noise from JWST NIRSpec Images": for every detector fast-scan line a
few low Fourier frequencies are fitted to the background pixels by weighted
least squares, apodized, transformed back and subtracted.

``nsclean.clean``, ``nsclean.fit`` and the rest of :mod:`nsclean.algorithm.core` are loaded on
first use, so that importing a submodule (the archive client, the report) does not pay
for scipy.
"""

__version__ = "0.1.0"

_CORE_NAMES = ("FitResult", "NSClean", "apodizer", "clean", "fit", "fit_background")

__all__ = [*_CORE_NAMES, "__version__"]


def __getattr__(name):
    # PEP 562: resolve the core names lazily.
    if name in _CORE_NAMES:
        from .algorithm import core

        return getattr(core, name)
    raise AttributeError(f"module 'nsclean' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_CORE_NAMES])
