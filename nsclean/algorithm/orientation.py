"""Conversion between the DMS frame of JWST products and the NIRSpec detector frame.

In the DMS (science) frame of a ``_rate.fits`` SCI array, every *column* is one
detector fast-scan line.  The detector (native) frame has the fast-scan lines as
*rows*, read left to right, lines in read-out order from top to bottom:

- NRS1: FASTAXIS = 2, SLOWAXIS = 1, so ``detector = dms.T``.
- NRS2: FASTAXIS = -2, SLOWAXIS = -1 (both axes run backwards), so
  ``detector = dms.T[::-1, ::-1]``.

Both functions return *views*: no data are copied and writing through the view
writes the original array.
"""

from __future__ import annotations

import numpy as np

from .nirspec import DETECTORS


def normalize_detector(detector) -> str:
    """Return the canonical detector name ("NRS1" or "NRS2").

    Parameters
    ----------
    detector : str
        Detector name, case-insensitive.

    Returns
    -------
    str
        "NRS1" or "NRS2".

    Raises
    ------
    ValueError
        If the name is not one of the accepted values.
    """
    name = str(detector).strip().upper()
    if name not in DETECTORS:
        raise ValueError(
            f"detector must be one of {', '.join(DETECTORS)} (case-insensitive); got {detector!r}"
        )
    return name


def dms_to_detector(dms_image: np.ndarray, detector: str) -> np.ndarray:
    """View a DMS-oriented array in the detector frame (rows = fast-scan lines in read order).

    Parameters
    ----------
    dms_image : ndarray
        2-D array in DMS orientation, as stored in the SCI extension.
    detector : str
        "NRS1" or "NRS2".

    Returns
    -------
    ndarray
        A view with shape ``dms_image.shape[::-1]``; row ``j`` is the ``j``-th line read,
        its pixels in read order.

    Examples
    --------
    >>> import numpy as np
    >>> dms = np.arange(6).reshape(2, 3)
    >>> dms_to_detector(dms, "NRS1")[0]  # first DMS column
    array([0, 3])
    """
    if normalize_detector(detector) == "NRS1":
        return dms_image.T
    return dms_image.T[::-1, ::-1]


def detector_to_dms(detector_image: np.ndarray, detector: str) -> np.ndarray:
    """Inverse of :func:`dms_to_detector` (also a view).

    Parameters
    ----------
    detector_image : ndarray
        2-D array in the detector frame.
    detector : str
        "NRS1" or "NRS2".

    Returns
    -------
    ndarray
        A view in DMS orientation.
    """
    if normalize_detector(detector) == "NRS1":
        return detector_image.T
    return detector_image[::-1, ::-1].T
