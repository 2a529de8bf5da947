"""NIRSpec exposure files: read rate and cal products, pair them, write cleaned products.

This is the I/O layer around the pure-array modules :mod:`nsclean.algorithm.masks` and
:mod:`nsclean.algorithm.core`. It knows about FITS files and header keywords, never
about Snakemake. Every problem with an input file raises
:class:`~nsclean.io.errors.NSCleanInputError`, whose message is one line naming
the file and the problem.

Products written here:

* the cleaned ``_rate`` file: the input file byte for byte, except the SCI
  data and the primary header, which gains the status keyword
  ``S_NSCLEN = 'COMPLETE'`` plus ``NSC*`` keywords and HISTORY recording the
  software version and every fit and mask parameter;
* optionally the fitted model, ``<stem>_flicker_noise.fits`` (the layout of
  the rate file with the model in SCI, as jwst's ``clean_flicker_noise``
  saves the noise it removed), and the mask, ``<stem>_mask.fits``;
* masks: uint8 FITS (1 = background) with a header saying how they were
  built, and a PNG quick-look.

All outputs are written to a temporary file in the destination folder and
renamed into place, so a failure never leaves a partial file; an existing
output is replaced only with ``overwrite=True``; input files are only ever
opened for reading.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import textwrap
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .. import __version__
from ..algorithm import masks as masklib
from ..algorithm.nirspec import DETECTORS, FULL_FRAME
from ..algorithm.nirspec import MSA_FAILED_OPEN as DQ_MSA_FAILED_OPEN
from ..algorithm.options import CLEAN_OPTIONS, MASK_OPTIONS
from .atomic import EXISTS_MESSAGE, atomic_write_bytes
from .errors import NSCleanInputError
from .jsonable import jsonable

__all__ = [
    "CalExposure",
    "RateExposure",
    "build_exposure_mask",
    "check_match",
    "clean_exposure",
    "exposure_stem",
    "make_mask",
    "match_problems",
    "pair_exposures",
    "product_path",
    "read_cal",
    "read_mask",
    "read_png_mask",
    "read_rate",
    "write_cleaned_rate",
    "write_mask",
    "write_mask_png",
]

STATUS_KEYWORD = "S_NSCLEN"
# Status keywords set on a cleaned product (left off the saved noise model).
# S_CLNFNS is the keyword jwst's schema defines for this correction (clean_flicker_noise):
# jwst and its users see that the file is cleaned (and do not clean it twice).
JWST_STATUS_KEYWORD = "S_CLNFNS"
STATUS_KEYWORDS = (STATUS_KEYWORD, JWST_STATUS_KEYWORD)
IFU_EXP_TYPES = ("NRS_IFU",)
SLIT_EXP_TYPES = ("NRS_MSASPEC", "NRS_FIXEDSLIT", "NRS_BRIGHTOBJ")
# NIRSpec values allowed for SUBARRAY by the stdatamodels 6.0 schema.
NIRSPEC_SUBARRAYS = frozenset(
    {
        "FULL",
        "FULL_IRS2",
        "GENERIC",
        "ALLSLITS",
        "SUBS200A1",
        "SUBS200A2",
        "SUBS200B1",
        "SUBS400A1",
        "S200A1",
        "S200A2",
        "S200B1",
        "S400A1",
        "SUB1024A",
        "SUB1024B",
        "SUB2048",
        "SUB512",
        "SUB512S",
        "SUB32",
        "SUB256M2_PRISM",
        "SUB128M4_PRISM",
        "SUB64M8_PRISM",
        "SUB32M16_PRISM",
    }
)
# jwst product names for the extra outputs of clean_flicker_noise.
MODEL_SUFFIX = "flicker_noise"
MASK_SUFFIX = "mask"

# A time-series segment (``_00001-seg002_nrs1``) belongs to the exposure without it.
_STEM_RE = re.compile(r"(jw\d{11}_\d{5}_\d{5})(?:-seg\d{3})?_(nrs[12])", re.IGNORECASE)
# Keywords that identify an exposure; a rate and its cal must agree on all.
_EXPOSURE_KEYWORDS = ("PROGRAM", "OBSERVTN", "VISIT", "VISITGRP", "SEQ_ID", "ACT_ID", "EXPOSURE")
_GEOMETRY_KEYWORDS = ("DETECTOR", "SUBARRAY", "SUBSTRT1", "SUBSTRT2", "SUBSIZE1", "SUBSIZE2")
# Copied into mask files so that a mask can be checked against the rate it is used on.
_IDENTITY_KEYWORDS = (
    "TELESCOP",
    "INSTRUME",
    "DETECTOR",
    "EXP_TYPE",
    "READPATT",
    "SUBARRAY",
    "SUBSTRT1",
    "SUBSTRT2",
    "SUBSIZE1",
    "SUBSIZE2",
    "FILTER",
    "GRATING",
    *_EXPOSURE_KEYWORDS,
)

# Mask option -> (keyword, comment); the same keywords go into mask files and
# into cleaned rate files, so a cleaned file says how its mask was built.
# FITS keyword and card comment of each option recorded in masks and cleaned files.
_MASK_KEYWORDS = {o.name: (o.keyword, o.comment) for o in MASK_OPTIONS if o.keyword}
_FIT_KEYWORDS = {o.name: (o.keyword, o.comment) for o in CLEAN_OPTIONS if o.keyword}
_FIT_INFO_KEYWORDS = {
    "n_lines": ("NSCNLINE", "lines or chunks fitted"),
    "n_guarded": ("NSCNGRD", "lines fitted with fewer frequencies"),
    "n_uncleaned": ("NSCNUNCL", "lines left uncleaned"),
    "n_rejected": ("NSCNREJ", "background pixels rejected as outliers"),
    "common_modes": ("NSCNCOM", "readout: common modes fitted per line"),
    "output_modes": ("NSCNOUT", "readout: per-output modes fitted per line"),
    "n_predicted": ("NSCNPRED", "readout: lines predicted from neighbours only"),
    "spectral_index": ("NSCALPHA", "readout subarray: fitted 1/f spectral index"),
}


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


class ExposureKeywords:
    """``detector``, ``exp_type`` and ``subarray`` of an exposure, from its ``header``
    (upper case; SUBARRAY defaults to FULL, the others to "").  Shared by the rate, cal
    and rateints readers."""

    header: fits.Header

    @property
    def detector(self) -> str:
        return str(self.header.get("DETECTOR", "")).strip().upper()

    @property
    def exp_type(self) -> str:
        return str(self.header.get("EXP_TYPE", "")).strip().upper()

    @property
    def subarray(self) -> str:
        return str(self.header.get("SUBARRAY", "FULL")).strip().upper()


@dataclass
class RateExposure(ExposureKeywords):
    """A NIRSpec ``_rate`` product in memory (copies; the file is closed).

    Attributes
    ----------
    path : Path
    stem : str
        ``jw<ppppp><ooo><vvv>_<gg><s><aa>_<eeeee>_<det>``.
    header : astropy.io.fits.Header
        Primary header.
    sci : ndarray
        SCI image (DMS frame).
    dq : ndarray of uint32
        DQ array.
    """

    path: Path
    stem: str
    header: fits.Header = field(repr=False)
    sci: np.ndarray = field(repr=False)
    dq: np.ndarray = field(repr=False)

    @property
    def origin(self) -> tuple[int, int]:
        """0-indexed full-frame (row, column) of ``sci[0, 0]``."""
        return _origin(self.header)

    @property
    def full_frame(self) -> bool:
        return self.sci.shape == (FULL_FRAME, FULL_FRAME)


@dataclass
class CalExposure(ExposureKeywords):
    """A NIRSpec stage-2 ``_cal`` product reduced to what the mask needs.

    Attributes
    ----------
    path : Path
    stem : str
    header : astropy.io.fits.Header
        Primary header.
    layout : {"ifu", "slits"}
    ifu_sci : ndarray or None
        Full SCI image of an IFU product (NaN outside the slices).
    slits : list of nsclean.algorithm.masks.SlitRegion
        Slit cutouts placed on the rate array (MOS, fixed slit, BOTS).
    failed_open : list of (int, int, ndarray of bool)
        ``(row, column, cutout)``: where the cal DQ flags MSA_FAILED_OPEN, per DQ
        array (the full IFU frame at (0, 0), or each slit's cutout at its SLTSTRT),
        0-indexed in the rate array.  Stage 2's ``msa_flagging`` sets this flag in the
        cal product; the rate never carries it.
    """

    path: Path
    stem: str
    header: fits.Header = field(repr=False)
    layout: str
    ifu_sci: np.ndarray | None = field(default=None, repr=False)
    slits: list = field(default_factory=list, repr=False)
    failed_open: list = field(default_factory=list, repr=False)

    def failed_open_pixels(self, shape: tuple[int, int]) -> np.ndarray:
        """Pixels of a rate array of ``shape`` that the cal DQ flags MSA_FAILED_OPEN."""
        flagged = np.zeros(shape, dtype=bool)
        for row, column, cutout in self.failed_open:
            rows = slice(max(row, 0), min(row + cutout.shape[0], shape[0]))
            cols = slice(max(column, 0), min(column + cutout.shape[1], shape[1]))
            if rows.stop > rows.start and cols.stop > cols.start:
                flagged[rows, cols] |= cutout[rows.start - row : rows.stop - row,
                                              cols.start - column : cols.stop - column]
        return flagged

    def footprint(self, shape: tuple[int, int], mode: str = "trace") -> np.ndarray:
        """Science footprint on a rate array of ``shape`` (``True`` = science)."""
        if self.layout == "ifu":
            if self.ifu_sci.shape != tuple(shape):
                raise NSCleanInputError(
                    self.path,
                    f"IFU SCI is {_shape_text(self.ifu_sci.shape)} but the rate image is "
                    f"{_shape_text(shape)}",
                )
            return masklib.ifu_footprint(self.ifu_sci)
        try:
            return masklib.slit_footprint(shape, self.slits, mode=mode)
        except ValueError as exc:
            raise NSCleanInputError(self.path, str(exc)) from None


def exposure_stem(name: str | os.PathLike | None = None, header: Mapping | None = None) -> str:
    """Exposure stem ``jw<ppppp><ooo><vvv>_<gg><s><aa>_<eeeee>_<det>``.

    Parameters
    ----------
    name : str or path, optional
        A file name; the stem is taken from it when it contains one.
    header : mapping, optional
        A primary header; used when the name has no stem (renamed files):
        PROGRAM, OBSERVTN, VISIT, VISITGRP, SEQ_ID, ACT_ID, EXPOSURE, DETECTOR.

    Returns
    -------
    str
        The stem in lower case.

    Raises
    ------
    ValueError
        If neither the name nor the header gives a stem.

    Examples
    --------
    >>> exposure_stem("data/jw01345062001_03101_00001_nrs2_rate.fits")
    'jw01345062001_03101_00001_nrs2'
    """
    if name is not None:
        found = _STEM_RE.search(Path(name).name)
        if found:
            return f"{found.group(1)}_{found.group(2)}".lower()
    if header is not None:
        try:
            return (
                f"jw{_digits(header['PROGRAM'], 5)}{_digits(header['OBSERVTN'], 3)}"
                f"{_digits(header['VISIT'], 3)}_{_digits(header['VISITGRP'], 2)}"
                f"{_digits(header['SEQ_ID'], 1)}{_digits(header['ACT_ID'], 2)}_"
                f"{_digits(header['EXPOSURE'], 5)}_{str(header['DETECTOR']).strip().lower()}"
            )
        except (KeyError, ValueError):
            pass
    raise ValueError(
        f"cannot tell the exposure stem of {name!r}: the name has no "
        "jw<program><obs><visit>_<group><seq><act>_<exposure>_<nrs1|nrs2> part and the "
        "header lacks the PROGRAM/OBSERVTN/VISIT/VISITGRP/SEQ_ID/ACT_ID/EXPOSURE/DETECTOR keywords"
    )


def read_rate(path: str | os.PathLike) -> RateExposure:
    """Read a NIRSpec ``_rate.fits`` file (full frame or subarray, either detector).

    Parameters
    ----------
    path : str or path
        The rate file.

    Returns
    -------
    RateExposure

    Raises
    ------
    NSCleanInputError
        If the file is missing, truncated or not FITS, is not a NIRSpec
        exposure, lacks SCI or DQ, has an unknown or inconsistent subarray,
        or has no finite pixel.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        header = hdul[0].header.copy()
        _check_nirspec(path, header)
        _check_product_kind(path, header, "rate")
        sci = _image_data(path, hdul, "SCI")
        dq = _image_data(path, hdul, "DQ")
    if sci.ndim == 3:
        raise NSCleanInputError(path, _INTS_HINT)
    if sci.ndim != 2:
        raise NSCleanInputError(
            path, f"SCI is {sci.ndim}-D {sci.shape}; only 2-D rate images are supported"
        )
    if dq.shape != sci.shape:
        raise NSCleanInputError(
            path, f"DQ is {_shape_text(dq.shape)} but SCI is {_shape_text(sci.shape)}"
        )
    if not np.issubdtype(sci.dtype, np.floating):
        raise NSCleanInputError(path, f"SCI has data type {sci.dtype}, expected floating point")
    _check_subarray(path, header, sci.shape)
    if not np.isfinite(sci).any():
        raise NSCleanInputError(path, "SCI has no finite pixel (all NaN or infinite)")
    return RateExposure(
        path=path,
        stem=_stem_or_error(path, header),
        header=header,
        sci=sci,
        dq=dq.astype(np.uint32, copy=False),
    )


def read_cal(path: str | os.PathLike) -> CalExposure:
    """Read the science footprint information of a NIRSpec ``_cal.fits`` file.

    Three layouts are understood: IFU (one full SCI, NaN outside the slices),
    and MOS, fixed slit and BOTS (one SCI per slit, placed on the rate array
    by SLTSTRT1/2 and SLTSIZE1/2, off-trace pixels NaN).

    Parameters
    ----------
    path : str or path
        The cal file.

    Returns
    -------
    CalExposure

    Raises
    ------
    NSCleanInputError
        If the file is missing, corrupt, not NIRSpec, of an exposure type
        without a known layout, or a slit lacks or contradicts its placement
        keywords.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        header = hdul[0].header.copy()
        _check_nirspec(path, header)
        _check_product_kind(path, header, "cal")
        exp_type = str(header.get("EXP_TYPE", "")).strip().upper()
        sci_hdus = [hdu for hdu in hdul[1:] if hdu.name == "SCI"]
        if not sci_hdus:
            raise NSCleanInputError(path, "no SCI extension")
        if exp_type in IFU_EXP_TYPES:
            if len(sci_hdus) != 1:
                raise NSCleanInputError(
                    path, f"IFU cal product has {len(sci_hdus)} SCI extensions, expected 1"
                )
            ifu_sci = _checked_data(path, sci_hdus[0], "SCI")
            if ifu_sci.ndim != 2:
                raise NSCleanInputError(path, f"IFU SCI is {ifu_sci.ndim}-D, expected 2-D")
            failed = _failed_open_cutout(path, hdul, sci_hdus[0], 0, 0)
            return CalExposure(path, _stem_or_error(path, header), header, "ifu", ifu_sci=ifu_sci,
                               failed_open=failed)
        if exp_type not in SLIT_EXP_TYPES:
            known = ", ".join(IFU_EXP_TYPES + SLIT_EXP_TYPES)
            raise NSCleanInputError(
                path, f"EXP_TYPE {exp_type or '(missing)'} has no known cal layout (known: {known})"
            )
        slits = [_slit_region(path, hdu) for hdu in sci_hdus]
        failed = [cutout for hdu, slit in zip(sci_hdus, slits, strict=True)
                  for cutout in _failed_open_cutout(path, hdul, hdu, slit.ystart, slit.xstart)]
    return CalExposure(path, _stem_or_error(path, header), header, "slits", slits=slits,
                       failed_open=failed)


def _failed_open_cutout(path: Path, hdul, sci_hdu, row: int, column: int) -> list:
    """The MSA_FAILED_OPEN pixels of the DQ that goes with a SCI extension (same EXTVER).

    Returns ``[(row, column, bool cutout)]`` when any pixel is flagged, else ``[]``.  A
    calints DQ (one plane per integration) counts a pixel flagged in any integration.
    """
    try:
        dq_hdu = hdul["DQ", sci_hdu.ver]
    except KeyError:
        return []
    dq = _checked_data(path, dq_hdu, f"DQ extension {sci_hdu.ver}")
    if not np.issubdtype(dq.dtype, np.integer):
        raise NSCleanInputError(path, f"DQ extension {sci_hdu.ver} has data type {dq.dtype}, "
                                      "expected integers")
    flagged = (dq.astype(np.uint32, copy=False) & np.uint32(DQ_MSA_FAILED_OPEN)) != 0
    if flagged.ndim == 3:
        flagged = flagged.any(axis=0)
    return [(row, column, flagged)] if flagged.any() else []


def _slit_region(path: Path, hdu) -> masklib.SlitRegion:
    sci_header = hdu.header
    label = f"SCI extension {hdu.ver} (slit {str(sci_header.get('SLTNAME', '?')).strip()})"
    missing = [k for k in ("SLTSTRT1", "SLTSTRT2") if k not in sci_header]
    if missing:
        raise NSCleanInputError(path, f"{label} lacks {', '.join(missing)}")
    data = _checked_data(path, hdu, "SCI")
    if data.ndim == 3:
        # BOTS _calints: one plane per integration; a pixel is on the trace if
        # any integration calibrated it.
        data = np.where(np.isfinite(data).any(axis=0), np.float32(1), np.float32(np.nan))
    if data.ndim != 2:
        raise NSCleanInputError(path, f"{label} is {data.ndim}-D, expected 2-D (or 3-D calints)")
    for key, size in (("SLTSIZE1", data.shape[1]), ("SLTSIZE2", data.shape[0])):
        if key in sci_header and int(sci_header[key]) != size:
            raise NSCleanInputError(
                path, f"{label} has {key} = {sci_header[key]} but its data are {size} wide"
            )
    return masklib.SlitRegion(
        name=str(sci_header.get("SLTNAME", hdu.ver)).strip(),
        xstart=int(sci_header["SLTSTRT1"]) - 1,
        ystart=int(sci_header["SLTSTRT2"]) - 1,
        data=data,
    )


def match_problems(rate: RateExposure, cal: CalExposure) -> list[str]:
    """List every way in which a rate and a cal product do not belong together.

    Compares the stems, the detector and subarray geometry keywords and the
    exposure-identification keywords (PROGRAM ... EXPOSURE).

    Returns
    -------
    list of str
        One phrase per difference, e.g. ``"DETECTOR: rate NRS1, cal NRS2"``;
        empty when they match.
    """
    problems = []
    if rate.stem != cal.stem:
        problems.append(f"stem: rate {rate.stem}, cal {cal.stem}")
    for key in _GEOMETRY_KEYWORDS + _EXPOSURE_KEYWORDS:
        in_rate, in_cal = key in rate.header, key in cal.header
        if not in_rate and not in_cal:
            continue
        rate_value = _normalise(rate.header.get(key))
        cal_value = _normalise(cal.header.get(key))
        if rate_value != cal_value:
            problems.append(
                f"{key}: rate {rate_value if in_rate else '(missing)'}, "
                f"cal {cal_value if in_cal else '(missing)'}"
            )
    return problems


def check_match(rate: RateExposure, cal: CalExposure) -> None:
    """Raise :class:`NSCleanInputError` naming the cal file if it does not belong to the rate."""
    problems = match_problems(rate, cal)
    if problems:
        raise NSCleanInputError(
            cal.path, f"does not match rate {rate.path.name}: " + "; ".join(problems)
        )


def pair_exposures(
    rate_paths: Iterable[str | os.PathLike],
    cal_paths: Iterable[str | os.PathLike],
    *,
    require_all: bool = True,
) -> list[tuple[Path, Path]]:
    """Pair rate and cal files by exposure stem, never by list position.

    Parameters
    ----------
    rate_paths, cal_paths : iterable of path
        File names containing ``jw..._<exposure>_<nrs1|nrs2>``.
    require_all : bool
        Raise if a rate file has no cal file (otherwise it is left out).

    Returns
    -------
    list of (Path, Path)
        ``(rate, cal)`` pairs sorted by stem.

    Raises
    ------
    NSCleanInputError
        For a name without a stem, a stem given twice, or (with
        ``require_all``) a rate without cal.
    """

    def by_stem(paths, kind):
        table = {}
        for path in map(Path, paths):
            try:
                stem = exposure_stem(path)
            except ValueError as exc:
                raise NSCleanInputError(path, str(exc)) from None
            if stem in table:
                raise NSCleanInputError(
                    path, f"{kind} for exposure {stem} given twice (also {table[stem]})"
                )
            table[stem] = path
        return table

    rates, cals = by_stem(rate_paths, "rate"), by_stem(cal_paths, "cal")
    missing = sorted(set(rates) - set(cals))
    if missing and require_all:
        raise NSCleanInputError(
            rates[missing[0]],
            f"no cal file for exposure {missing[0]}"
            + (f" (and {len(missing) - 1} more rate files)" if len(missing) > 1 else ""),
        )
    return [(rates[s], cals[s]) for s in sorted(rates) if s in cals]


def read_mask(
    path: str | os.PathLike, rate: RateExposure | None = None
) -> tuple[np.ndarray, fits.Header]:
    """Read a background mask from FITS (1 = background, 0 = not).

    The mask is the first 2-D image in the file (primary HDU, or an extension
    such as MASK or SCI), so masks from other tools work too: jwst's
    ``clean_flicker_noise`` mask (an ImageModel, SCI of 0.0/1.0), or any boolean or
    0/1 integer image.  Anything else (NaN, infinities, other values: a rate or
    science image given by mistake) is refused.

    Parameters
    ----------
    path : str or path
        The mask file.
    rate : RateExposure, optional
        When given, the mask's shape, and its DETECTOR/SUBARRAY keywords if it
        has them, must agree with the rate.

    Returns
    -------
    mask : ndarray of bool
    header : astropy.io.fits.Header
        Header of the HDU the mask came from.

    Raises
    ------
    NSCleanInputError
        If the file cannot be read, has no 2-D image, holds values other than 0 and 1,
        or does not match ``rate``.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        for hdu in hdul:
            if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)) and hdu.header.get("NAXIS") == 2:
                data = _checked_data(path, hdu, hdu.name or "PRIMARY")
                header = hdu.header.copy()
                if hdu is not hdul[0]:
                    # the exposure's identity and (nsclean masks) how it was built
                    header.extend(
                        (c for c in hdul[0].header.cards
                         if c.keyword in _IDENTITY_KEYWORDS or c.keyword.startswith("NSC")),
                        unique=True,
                    )
                break
        else:
            raise NSCleanInputError(path, "no 2-D image to use as a mask")
    problem = _mask_values_problem(data)
    if problem:
        raise NSCleanInputError(path, problem)
    mask = data != 0  # only 0 and 1 are left: 1 (True) = background
    if rate is not None:
        if mask.shape != rate.sci.shape:
            raise NSCleanInputError(
                path,
                f"mask is {_shape_text(mask.shape)} but rate {rate.path.name} is "
                f"{_shape_text(rate.sci.shape)}",
            )
        for key in ("DETECTOR", "SUBARRAY"):
            if key in header and _normalise(header[key]) != _normalise(rate.header.get(key)):
                raise NSCleanInputError(
                    path,
                    f"mask was made for {key} {_normalise(header[key])} but rate "
                    f"{rate.path.name} has {_normalise(rate.header.get(key))}",
                )
    return mask, header


def _mask_values_problem(data: np.ndarray) -> str | None:
    """Why an image is not a 0/1 mask, or None."""
    if data.dtype == bool:
        return None
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype,
                                                                   np.complexfloating):
        return f"not a mask: data type {data.dtype}, expected boolean or 0/1 numbers"
    if np.issubdtype(data.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            found = " and ".join(text for count, text in ((n_nan, f"{n_nan} NaN"),
                                                          (n_inf, f"{n_inf} infinite"))
                                 if count)
            return (f"not a mask: {found} pixels (a mask holds 0 and 1 only; is this a "
                    "rate or science image?)")
    other = (data != 0) & (data != 1)
    if other.any():
        example = data[other].flat[0]
        return (f"not a mask: {int(other.sum())} pixels are not 0 or 1 (e.g. {example:g}; "
                "a mask holds 0 and 1 only; is this a rate or science image?)")
    return None


def read_png_mask(
    path: str | os.PathLike, *, min_red_excess: float = 20.0, flip_vertical: bool = True
) -> np.ndarray:
    """Background mask from a PNG with the background shaded red (paper section 3.4).

    See :func:`nsclean.algorithm.masks.mask_from_shaded_rgb` for the parameters.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise NSCleanInputError(path, "file not found")
    from ..algorithm.nirspec import FULL_FRAME

    try:
        with Image.open(path) as image:
            # The size is in the header: refuse a decompression bomb before decoding it.
            width, height = image.size
            if width > FULL_FRAME or height > FULL_FRAME:
                raise NSCleanInputError(
                    path, f"PNG is {width} x {height} pixels, larger than a NIRSpec frame "
                    f"({FULL_FRAME} x {FULL_FRAME})")
            rgb = np.asarray(image.convert("RGBA"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, NSCleanInputError):
            raise
        raise NSCleanInputError(path, f"not a readable PNG image ({exc})") from None
    return masklib.mask_from_shaded_rgb(
        rgb, min_red_excess=min_red_excess, flip_vertical=flip_vertical
    )


# --------------------------------------------------------------------------------------
# Masks for exposures
# --------------------------------------------------------------------------------------


def build_exposure_mask(
    rate: RateExposure,
    cal: CalExposure | None = None,
    *,
    user_mask: np.ndarray | None = None,
    user_mask_mode: str = "and",
    options: masklib.MaskOptions | Mapping | None = None,
    **option_overrides,
) -> tuple[np.ndarray, dict]:
    """Background mask for one exposure: automatic, user-supplied, or both.

    Parameters
    ----------
    rate : RateExposure
    cal : CalExposure, optional
        Gives the science footprint; checked against ``rate`` first.
    user_mask : ndarray of bool, optional
        A mask made elsewhere (``True`` = background).
    user_mask_mode : {"and", "replace"}
        ``"and"``: the user mask removes pixels from the automatic one;
        ``"replace"``: the user mask is used alone.
    options : MaskOptions or mapping, optional
        Automatic-mask options; ``option_overrides`` take precedence.

    Returns
    -------
    mask : ndarray of bool
    info : dict
        As :func:`nsclean.algorithm.masks.build_background_mask`, plus ``source``
        (``"auto"``, ``"user"`` or ``"auto+user"``), ``rate`` and ``cal``.
    """
    if cal is not None:
        check_match(rate, cal)
    opts = _as_options(options, **option_overrides)
    if user_mask is not None and user_mask_mode == "replace":
        mask = np.array(user_mask, dtype=bool)
        if mask.shape != rate.sci.shape:
            raise ValueError(
                f"user mask shape {mask.shape} differs from image shape {rate.sci.shape}"
            )
        info = {
            "options": opts.to_dict(),
            "steps": [{"step": "user_mask", "applied": True, "mode": "replace"}],
        }
        info.update(_summary_of(mask, opts, rate.origin))
        source = "user"
    else:
        footprint = cal.footprint(rate.sci.shape, opts.footprint_mode) if cal else None
        dq, from_cal = rate.dq, None
        if cal is not None and cal.failed_open:
            # MSA_FAILED_OPEN is set by stage 2 (msa_flagging) in the cal DQ only.
            from_cal = cal.failed_open_pixels(rate.sci.shape)
            dq = rate.dq | np.where(from_cal, np.uint32(DQ_MSA_FAILED_OPEN), np.uint32(0))
        mask, info = masklib.build_background_mask(
            rate.sci,
            dq,
            footprint,
            exp_type=rate.exp_type,
            origin=rate.origin,
            full_frame=rate.full_frame,
            options=opts,
        )
        source = "auto"
        if from_cal is not None:
            info["steps"].append({"step": "failed_open_from_cal", "applied": True,
                                     "n_flagged": int(from_cal.sum())})
        if user_mask is not None:
            before = int(mask.sum())
            mask = masklib.combine_masks(mask, user_mask, "and")
            info["steps"].append(
                {
                    "step": "user_mask",
                    "applied": True,
                    "mode": "and",
                    "n_removed": before - int(mask.sum()),
                }
            )
            info.update(_summary_of(mask, opts, rate.origin))
            source = "auto+user"
    info["source"] = source
    info["rate"] = rate.path.name
    info["cal"] = cal.path.name if cal is not None else None
    if not mask.any():
        raise NSCleanInputError(rate.path, "the background mask leaves no background pixel")
    return mask, info


def _as_options(options, **overrides) -> masklib.MaskOptions:
    if isinstance(options, masklib.MaskOptions):
        options = options.to_dict()
    return masklib.MaskOptions.from_mapping(options, **overrides)


def _summary_of(mask: np.ndarray, opts: masklib.MaskOptions, origin) -> dict:
    n_background = int(mask.sum())
    return {
        "n_background": n_background,
        "background_fraction": n_background / mask.size,
        "guard": masklib.guard_report(mask, opts, origin=origin),
    }


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def product_path(directory: str | os.PathLike, stem: str, suffix: str) -> Path:
    """Path of an extra product named like jwst's: ``<directory>/<stem>_<suffix>.fits``."""
    return Path(directory) / f"{stem}_{suffix}.fits"


def write_mask(
    path: str | os.PathLike,
    mask: np.ndarray,
    info: Mapping,
    *,
    reference_header: Mapping | None = None,
    overwrite: bool = False,
    fsync: bool = False,
) -> Path:
    """Write a background mask as FITS: an ImageModel whose SCI is 1 on background.

    The file is laid out as stdatamodels' ``ImageModel`` (``DATAMODL``, SCI float32
    1.0/0.0), so that ``stdatamodels.jwst.datamodels.open`` gives the mask as its
    ``data`` and jwst's ``clean_flicker_noise`` can take it as ``user_mask``.  The
    primary header carries the identification keywords of the exposure
    (from ``reference_header``), the ``NSCM*`` keywords of every mask option,
    and HISTORY lines describing each step. A ``GUARD`` table lists, per
    column, the number of background pixels, the longest masked run and
    whether the guard flagged the column.  ``fsync`` flushes the file to disk before
    it is renamed into place (see :func:`write_cleaned_rate`).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    mask = np.asarray(mask, dtype=bool)
    header = fits.Header()
    if reference_header is not None:
        for key in _IDENTITY_KEYWORDS:
            if key in reference_header:
                header[key] = reference_header[key]
    _set_card(header, "NSCPROD", "MASK", "nsclean background mask, 1 = background")
    _set_card(header, "NSCVER", __version__, "nsclean version")
    _add_mask_cards(header, info)
    for line in _mask_history(info):
        header.add_history(line)
    header["DATAMODL"] = ("ImageModel", "stdatamodels model: SCI holds the mask")
    if "TELESCOP" not in header:
        header["TELESCOP"] = "JWST"
    sci = fits.ImageHDU(mask.astype(np.float32), name="SCI")
    sci.header["BUNIT"] = ("", "1 = background used by the fit, 0 = not")
    hdus = [fits.PrimaryHDU(header=header), sci]
    guard = info.get("guard")
    if guard and len(guard.get("column_counts", [])) == mask.shape[1]:
        weak = np.zeros(mask.shape[1], dtype=bool)
        weak[np.asarray(guard["weak_columns"], dtype=int)] = True
        hdus.append(
            _table_hdu(
                [
                    fits.Column("COLUMN", "J", array=np.arange(mask.shape[1])),
                    fits.Column("N_BACKGROUND", "J", array=np.asarray(guard["column_counts"])),
                    fits.Column("LONGEST_GAP", "J", array=np.asarray(guard["longest_gap"])),
                    fits.Column("WEAK", "L", array=weak),
                ],
                name="GUARD",
            )
        )
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer, output_verify="exception")
    atomic_write_bytes(path, [buffer.getvalue()], overwrite=overwrite, fsync=fsync)
    return path


def _table_hdu(columns: list, name: str) -> fits.BinTableHDU:
    """``fits.BinTableHDU.from_columns(columns, name=name)``, the same bytes on disk.

    Giving the table to the constructor makes astropy import ``astropy.table`` (and
    with it asdf), ~0.4 s of every mask job; assigning the record array afterwards
    does not.
    """
    hdu = fits.BinTableHDU(name=name)
    hdu.data = fits.FITS_rec.from_columns(fits.ColDefs(columns))
    return hdu


def write_mask_png(
    path: str | os.PathLike,
    mask: np.ndarray,
    image: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a quick-look PNG: the image in grey, background shaded 30 % red.

    Rows are flipped so that the PNG looks like DS9's display; the PNG can be
    edited by hand and read back with :func:`read_png_mask`.
    """
    from PIL import Image

    path = Path(path)
    mask = np.asarray(mask, dtype=bool)
    shown = np.zeros(mask.shape, dtype=np.float32) if image is None else image
    rgb = masklib.quicklook_rgb(shown, mask)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, [buffer.getvalue()], overwrite=overwrite)
    return path


def write_cleaned_rate(
    rate_path: str | os.PathLike,
    output_path: str | os.PathLike,
    sci: np.ndarray,
    *,
    cards: Iterable[tuple] = (),
    history: Iterable[str] = (),
    overwrite: bool = False,
    fsync: bool = False,
    images: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Copy a rate file with new SCI data and extra primary-header cards.

    Every byte of the input except the primary header and the replaced image data
    is copied unchanged (other HDUs, their headers and padding, the SCI header),
    so the datamodel type and all metadata survive.

    Parameters
    ----------
    rate_path : path
        The input rate file (opened read-only).
    output_path : path
        Destination; must differ from the input.
    sci : ndarray
        New SCI data, same shape as the input SCI.
    cards : iterable of (keyword, value, comment)
        Added to (or updated in) the primary header.
    history : iterable of str
        HISTORY lines appended to the primary header.
    overwrite : bool
        Replace an existing output.
    fsync : bool
        Flush each file to disk before it is renamed into place, so that a crash of
        the machine cannot leave a complete-looking but empty or short file.  Off by
        default: the caller would wait for the disk (the workflow's ``fsync`` key).
    images : mapping of str to ndarray, optional
        More image extensions to replace, by EXTNAME (e.g. ``VAR_RNOISE``, ``ERR``);
        each must exist and keep its shape.

    Returns
    -------
    Path
    """
    rate_path, output_path = Path(rate_path), Path(output_path)
    if output_path.exists() and output_path.resolve() == rate_path.resolve():
        raise NSCleanInputError(output_path, "output would overwrite the input rate file")
    replacements = {"SCI": sci, **dict(images or {})}
    with _open_fits(rate_path) as hdul:
        layout = [hdu.fileinfo() for hdu in hdul]
        names = [hdu.name for hdu in hdul]
        primary_header = hdul[0].header.copy()
        missing = [name for name in replacements if name not in names]
        if missing:
            raise NSCleanInputError(rate_path, f"no {', '.join(missing)} extension")
        encoded = {}
        for name, data in replacements.items():
            index = names.index(name)
            header = hdul[index].header.copy()
            encoded[index] = (header, _encode_image(rate_path, header, data), np.shape(data))
        primary_data = hdul[0].data if _has_checksum(primary_header) else None
    for keyword, value, comment in cards:
        _set_card(primary_header, keyword, value, comment)
    for line in history:
        primary_header.add_history(line)
    if _has_checksum(primary_header):
        # Archive products carry no checksums; files that do keep valid ones.
        primary_header = _rechecksummed(fits.PrimaryHDU(primary_data, primary_header))
    with open(rate_path, "rb") as source:
        raw = source.read()
    # Views, not copies, of the unchanged stretches (most of the file).
    unchanged = memoryview(raw)
    chunks = [primary_header.tostring().encode("ascii")]
    position = layout[0]["datLoc"]
    for index in sorted(encoded):
        header, data_bytes, shape = encoded[index]
        start, data_start = layout[index]["hdrLoc"], layout[index]["datLoc"]
        header_bytes = raw[start:data_start]
        if _has_checksum(header):
            count = int(np.prod(shape))
            new_data = np.frombuffer(data_bytes, dtype=_image_dtype(header), count=count)
            header = _rechecksummed(fits.ImageHDU(new_data.reshape(shape), header))
            header_bytes = header.tostring().encode("ascii")
        chunks += [unchanged[position:start], header_bytes, data_bytes]
        position = data_start + layout[index]["datSpan"]
    chunks.append(unchanged[position:])
    atomic_write_bytes(output_path, chunks, overwrite=overwrite, fsync=fsync)
    return output_path


def _variance_images(rate_path: Path, variance) -> dict:
    """New VAR_RNOISE and ERR with the model's posterior variance added (or {})."""
    if variance is None:
        return {}
    with _open_fits(rate_path) as hdul:
        names = [hdu.name for hdu in hdul]
        if "VAR_RNOISE" not in names or "ERR" not in names:
            return {}
        var_rnoise = np.asarray(hdul["VAR_RNOISE"].data)
        err = np.asarray(hdul["ERR"].data)
        if var_rnoise.shape != variance.shape or err.shape != variance.shape:
            return {}
        # In the files' precision and native byte order (FITS data are big-endian; the
        # arithmetic is several times slower on them), float64 only where a file is.
        work = np.result_type(var_rnoise.dtype, err.dtype, np.float32).newbyteorder("=")
        added = variance.astype(work)
        new_var = var_rnoise.astype(work)
        new_var += added
        new_err = err.astype(work)
        np.square(new_err, out=new_err)
        new_err += added
        np.sqrt(new_err, out=new_err)
        return {"VAR_RNOISE": new_var.astype(var_rnoise.dtype, copy=False),
                "ERR": new_err.astype(err.dtype, copy=False)}


def _has_checksum(header: fits.Header) -> bool:
    return "CHECKSUM" in header or "DATASUM" in header


def _rechecksummed(hdu) -> fits.Header:
    hdu.add_checksum()
    return hdu.header


def _image_dtype(header: fits.Header) -> str | None:
    return {-32: ">f4", -64: ">f8"}.get(int(header["BITPIX"]))


def _encode_image(path: Path, header: fits.Header, data: np.ndarray) -> bytes:
    bitpix = int(header["BITPIX"])
    shape = tuple(header[f"NAXIS{i}"] for i in range(header["NAXIS"], 0, -1))
    if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0:
        raise NSCleanInputError(path, "SCI is scaled (BSCALE/BZERO); cannot replace it in place")
    dtype = _image_dtype(header)
    if dtype is None:
        raise NSCleanInputError(path, f"SCI has BITPIX {bitpix}, expected floating point")
    data = np.asarray(data)
    if data.shape != shape:
        raise ValueError(f"new SCI data {data.shape} differs from the file's SCI {shape}")
    encoded = data.astype(dtype, copy=False).tobytes()
    padding = -len(encoded) % 2880
    return encoded + b"\0" * padding


@contextlib.contextmanager
def _all_or_nothing(paths):
    """Write the outputs of one call together: all of them, or none.

    Before anything is written, each output's folder must exist or be creatable (an
    unwritable ``--png`` or ``--product-dir`` fails first).  If writing any output
    fails, the outputs this call had already created are removed again, so that a rerun
    is not refused with "output exists".
    """
    paths = [Path(p) for p in paths if p is not None]
    existed = {p for p in paths if p.exists()}
    for path in paths:
        folder = path.parent if str(path.parent) else Path(".")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(folder))
        except OSError as exc:
            raise NSCleanInputError(
                path, f"cannot be written: {exc.strerror or exc} ({exc.filename or folder}); "
                "nothing was written") from None
    try:
        yield
    except BaseException:
        for path in paths:
            if path not in existed:
                path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# High level
# --------------------------------------------------------------------------------------


def make_mask(
    cal_path: str | os.PathLike | None,
    rate_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    user_mask_path: str | os.PathLike | None = None,
    user_mask_mode: str = "and",
    png_path: str | os.PathLike | None = None,
    options: masklib.MaskOptions | Mapping | None = None,
    overwrite: bool = False,
    fsync: bool = False,
) -> dict:
    """Build the background mask of one exposure and write it (FITS, optional PNG).

    Parameters
    ----------
    cal_path : path or None
        The exposure's cal file (science footprint); ``None`` for a mask from
        the rate and user mask alone.
    rate_path : path
        The rate file.
    output_path : path
        The FITS mask to write.
    user_mask_path : path, optional
        A FITS mask, or a PNG with the background shaded red.
    user_mask_mode : {"and", "replace"}
        How the user mask combines with the automatic one.
    png_path : path, optional
        Where to write the quick-look PNG.
    options : MaskOptions or mapping, optional
        Automatic-mask options.
    overwrite : bool
        Replace existing outputs.
    fsync : bool
        Flush each file to disk before it is renamed into place, so that a crash of
        the machine cannot leave a complete-looking but empty or short file.  Off by
        default: the caller would wait for the disk (the workflow's ``fsync`` key).

    Returns
    -------
    dict
        JSON-able summary: stem, paths, ``n_background``, ``background_fraction``,
        ``n_weak_columns``, ``weak_columns``, ``source``.
    """
    rate = read_rate(rate_path)
    cal = read_cal(cal_path) if cal_path is not None else None
    user_mask = _read_user_mask(user_mask_path, rate) if user_mask_path else None
    try:
        mask, info = build_exposure_mask(
            rate, cal, user_mask=user_mask, user_mask_mode=user_mask_mode, options=options
        )
    except ValueError as exc:
        if isinstance(exc, NSCleanInputError):
            raise
        raise NSCleanInputError(rate.path, str(exc)) from None
    if user_mask_path:
        info["user_mask"] = Path(user_mask_path).name
    _refuse_inputs_as_outputs([rate_path, cal_path, user_mask_path],
                              [output_path, png_path])
    _refuse_existing([output_path] + ([png_path] if png_path else []), overwrite)
    with _all_or_nothing([output_path, png_path]):
        write_mask(output_path, mask, info, reference_header=rate.header,
                   overwrite=overwrite, fsync=fsync)
        if png_path:
            write_mask_png(png_path, mask, rate.sci, overwrite=overwrite)
    return {
        "stem": rate.stem,
        "rate": str(rate.path),
        "cal": str(cal.path) if cal else None,
        "mask": str(output_path),
        "png": str(png_path) if png_path else None,
        "source": info["source"],
        "n_background": info["n_background"],
        "background_fraction": round(info["background_fraction"], 6),
        "n_weak_columns": info["guard"]["n_weak_columns"],
        "weak_columns": info["guard"]["weak_columns"],
    }


def clean_exposure(
    rate_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    cal_path: str | os.PathLike | None = None,
    mask_path: str | os.PathLike | None = None,
    user_mask_mode: str = "and",
    mask_options: masklib.MaskOptions | Mapping | None = None,
    fit_options: Mapping | None = None,
    save_model: bool = False,
    save_mask: bool = False,
    product_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    extra_cards: Sequence[tuple] = (),
    arrays: dict | None = None,
    add_variance: bool | None = None,
) -> dict:
    """Clean one rate file and write the cleaned product (and optional extras).

    The background mask comes from ``mask_path`` (a FITS mask or a red-shaded
    PNG), from ``cal_path`` (automatic), or from both (``user_mask_mode``).
    The fit is :func:`nsclean.algorithm.core.fit`; ``cleaned = SCI - model``, so NaN
    pixels stay NaN.

    Parameters
    ----------
    rate_path : path
        Input ``_rate.fits`` (never opened for writing).
    output_path : path
        Cleaned rate file to write.
    cal_path : path, optional
        The exposure's cal file, for an automatic mask.
    mask_path : path, optional
        A ready-made mask (FITS, 1 = background; or PNG shaded red).
    user_mask_mode : {"and", "replace"}
        With both ``cal_path`` and ``mask_path``: combine (``"and"``) or use
        the mask file alone (``"replace"``). With only ``mask_path`` the mask
        is used as it is.
    mask_options : MaskOptions or mapping, optional
        Automatic-mask options.  With a mask file and no cal file they set the
        weak-column guard of the summary (default: the options the mask file records,
        as :func:`make_mask` writes them).
    fit_options : mapping, optional
        Options of :func:`nsclean.algorithm.core.fit` (``method``, ``cutoff`` ...).
    save_model, save_mask : bool
        Also write ``<stem>_flicker_noise.fits`` (the fitted model, in the
        layout of the rate file) and ``<stem>_mask.fits``.
    product_dir : path, optional
        Folder for the extra products (default: that of ``output_path``).
    overwrite : bool
        Replace existing outputs.
    fsync : bool
        Flush each file to disk before it is renamed into place, so that a crash of
        the machine cannot leave a complete-looking but empty or short file.  Off by
        default: the caller would wait for the disk (the workflow's ``fsync`` key).
    extra_cards : sequence of (keyword, value, comment)
        More primary-header cards for the cleaned file (the workflow records the
        input checksums this way).
    arrays : dict, optional
        Filled in with the arrays of the exposure, in native byte order, for a caller
        that measures the result without reading the files again: ``sci`` (the input
        SCI), ``cleaned`` (the SCI written) and ``mask`` (the background mask used).
    add_variance : bool, optional
        Where the fit returns the posterior variance of its model (the readout
        method), add it to ``VAR_RNOISE`` and recompute ``ERR`` as
        ``sqrt(ERR^2 + variance)``, so that the error of a cleaned pixel includes
        what the model could not know (``NSCVAR`` records it).  Default: the fit
        option ``variance`` (True unless ``fit_options`` turns it off).

    Returns
    -------
    dict
        JSON-able summary: stem, detector, exp_type, subarray, paths written,
        mask source and background fraction, weak columns, fit diagnostics
        (``n_lines``, ``n_guarded``, ``n_uncleaned``, ``n_rejected``),
        ``fit_options`` and ``mask_options``.

    Raises
    ------
    NSCleanInputError
        For any unusable input; nothing is written then.
    FileExistsError
        If an output exists and ``overwrite`` is false.
    """
    output_path, rate_path = Path(output_path), Path(rate_path)
    rate, cal, user_mask, user_header = _read_clean_inputs(rate_path, output_path, cal_path,
                                                           mask_path)
    directory = Path(product_dir) if product_dir is not None else output_path.parent
    model_path = product_path(directory, rate.stem, MODEL_SUFFIX) if save_model else None
    saved_mask_path = product_path(directory, rate.stem, MASK_SUFFIX) if save_mask else None
    _refuse_inputs_as_outputs([rate_path, cal_path, mask_path],
                              [output_path, model_path, saved_mask_path])
    _refuse_existing([output_path, model_path, saved_mask_path], overwrite)

    mask, info, options_record, result, add_variance = _fit_exposure(
        rate, cal, user_mask, user_header, user_mask_mode, mask_options, fit_options,
        add_variance, mask_path or rate_path)

    model = np.asarray(result.model)
    cleaned = (rate.sci - model).astype(rate.sci.dtype, copy=False)
    info["user_mask"] = Path(mask_path).name if mask_path else None
    info["options"] = options_record
    cards, history, images = _cleaned_cards(rate, cal, mask_path, info, result,
                                            add_variance, extra_cards)
    with _all_or_nothing([output_path, model_path, saved_mask_path]):
        write_cleaned_rate(
            rate.path, output_path, cleaned, cards=cards, history=history,
            overwrite=overwrite, fsync=fsync, images=images,
        )
        written = [str(output_path), *_write_extras(rate, model, mask, info, cards, history,
                                                    model_path, saved_mask_path,
                                                    overwrite=overwrite, fsync=fsync)]
    if arrays is not None:
        native = rate.sci.dtype.newbyteorder("=")
        arrays.update(sci=rate.sci.astype(native, copy=False),
                      cleaned=cleaned.astype(native, copy=False), mask=mask,
                      header=rate.header)
    return _clean_summary(rate, cal, mask_path, written, info, result, options_record)


def _fit_exposure(rate, cal, user_mask, user_header, user_mask_mode, mask_options,
                  fit_options, add_variance, mask_source):
    """Background mask and fit of one exposure (see :func:`clean_exposure`).

    Returns
    -------
    mask, info, options_record
        As :func:`_mask_for_cleaning`.
    result : FitResult
    add_variance : bool
        Whether the model variance is to be added to the error arrays.

    Raises
    ------
    NSCleanInputError
        For an unusable input: naming ``mask_source`` for a mask without background,
        the rate file for any other problem.
    """
    from ..algorithm.core import fit

    try:
        mask, info, options_record = _mask_for_cleaning(
            rate, cal, user_mask, user_header, user_mask_mode, mask_options)
        if not mask.any():
            raise NSCleanInputError(mask_source, "mask has no background pixel")
        fit_options = dict(fit_options or {})
        if add_variance is not None:
            fit_options["variance"] = bool(add_variance)
        add_variance = fit_options.get("variance", True)
        result = fit(rate.sci, mask, rate.detector, **fit_options)
    except NSCleanInputError:
        raise
    except (ValueError, TypeError) as exc:
        raise NSCleanInputError(rate.path, str(exc)) from None
    return mask, info, options_record, result, add_variance


def _cleaned_cards(rate, cal, mask_path, info, result, add_variance, extra_cards):
    """Header cards, HISTORY lines and variance images of the cleaned file.

    Returns
    -------
    cards : list of (keyword, value, comment)
    history : list of str
    images : dict
        ``VAR_RNOISE`` and ``ERR`` with the model variance added, or empty.
    """
    cards, history = _provenance(rate, cal, mask_path, info, result)
    images = _variance_images(rate.path, result.variance) if add_variance else {}
    cards.append(("NSCVAR", bool(images), "model variance added to VAR_RNOISE and ERR"))
    if images:
        history.append("nsclean: posterior variance of the noise model added to VAR_RNOISE; "
                       "ERR = sqrt(ERR^2 + variance)")
    cards = [*cards, *extra_cards]
    return cards, history, images


def _write_extras(rate, model, mask, info, cards, history, model_path, mask_path, *,
                  overwrite, fsync) -> list[str]:
    """The optional products of :func:`clean_exposure`: the model and the mask used."""
    written = []
    if model_path is not None:
        model_cards = [*cards, ("NSCPROD", "MODEL", "SCI holds the fitted noise model")]
        model_cards = [c for c in model_cards if c[0] not in STATUS_KEYWORDS]
        write_cleaned_rate(rate.path, model_path, model.astype(rate.sci.dtype, copy=False),
                           cards=model_cards, history=history, overwrite=overwrite,
                           fsync=fsync)
        written.append(str(model_path))
    if mask_path is not None:
        write_mask(mask_path, mask, info, reference_header=rate.header, overwrite=overwrite,
                   fsync=fsync)
        written.append(str(mask_path))
    return written


def _read_clean_inputs(rate_path: Path, output_path: Path, cal_path, mask_path):
    """The rate, cal and user mask (with its header) of :func:`clean_exposure`, checked."""
    if cal_path is None and mask_path is None:
        raise NSCleanInputError(
            rate_path,
            "no background mask: give a cal file (automatic mask) or a mask file",
        )
    if output_path.resolve() == rate_path.resolve():
        raise NSCleanInputError(output_path, "output would overwrite the input rate file")
    rate = read_rate(rate_path)
    cal = read_cal(cal_path) if cal_path is not None else None
    user_mask, user_header = None, None
    if mask_path is not None:
        user_mask, user_header = _read_user_mask(mask_path, rate, with_header=True)
    return rate, cal, user_mask, user_header


def _mask_for_cleaning(rate, cal, user_mask, user_header, user_mask_mode, mask_options):
    """The mask :func:`clean_exposure` fits with, its info and the options it records."""
    if cal is not None:
        mask, info = build_exposure_mask(rate, cal, user_mask=user_mask,
                                         user_mask_mode=user_mask_mode, options=mask_options)
        return mask, info, info["options"]
    options_record = _options_from_header(user_header)
    guard_options = options_record if mask_options is None else mask_options
    info = {
        "source": "user",
        "n_background": int(user_mask.sum()),
        "background_fraction": float(user_mask.mean()),
        "guard": masklib.guard_report(user_mask, _as_options(guard_options),
                                      origin=rate.origin),
    }
    return user_mask, info, options_record


def _clean_summary(rate, cal, mask_path, written, info, result, options_record) -> dict:
    """The JSON-able summary :func:`clean_exposure` returns."""
    fit_info = result.info
    return {
        "stem": rate.stem,
        "rate": str(rate.path),
        "cal": str(cal.path) if cal else None,
        "mask_file": str(mask_path) if mask_path else None,
        "outputs": written,
        "detector": rate.detector,
        "exp_type": rate.exp_type,
        "subarray": rate.subarray,
        "mask_source": info["source"],
        "n_background": int(info["n_background"]),
        "background_fraction": round(float(info["background_fraction"]), 6),
        "n_weak_columns": int(info["guard"]["n_weak_columns"]),
        "weak_columns": list(info["guard"]["weak_columns"]),
        "fit": {key: jsonable(fit_info.get(key)) for key in _FIT_INFO_KEYWORDS},
        "fit_method": fit_info.get("method"),
        "fit_mode": fit_info.get("mode"),
        "fit_options": result.options,
        "mask_options": options_record,
        "version": __version__,
    }


def _read_user_mask(path, rate: RateExposure, with_header: bool = False):
    path = Path(path)
    if path.suffix.lower() == ".png":
        mask = read_png_mask(path)
        if mask.shape != rate.sci.shape:
            raise NSCleanInputError(
                path,
                f"PNG mask is {_shape_text(mask.shape)} but rate {rate.path.name} is "
                f"{_shape_text(rate.sci.shape)}",
            )
        header = fits.Header()
        return (mask, header) if with_header else mask
    mask, header = read_mask(path, rate)
    return (mask, header) if with_header else mask


def _options_from_header(header: fits.Header | None) -> dict:
    """Mask options recorded in a mask file made by nsclean (empty for foreign masks)."""
    if header is None:
        return {}
    record = {}
    for name, (keyword, _) in _MASK_KEYWORDS.items():
        if keyword in header:
            record[name] = header[keyword]
    for key in ("NSCMFSB1", "NSCMFSB2"):
        if key in header:
            record.setdefault("fixed_slit_rows", []).append(header[key])
    return record


def _provenance(rate, cal, mask_path, info, result) -> tuple[list, list]:
    cards = [
        (STATUS_KEYWORD, "COMPLETE", "nsclean correlated-noise removal"),
        (JWST_STATUS_KEYWORD, "COMPLETE", "1/f noise cleaned (by nsclean)"),
        ("NSCVER", __version__, "nsclean version"),
    ]
    for name, (keyword, comment) in _FIT_KEYWORDS.items():
        if name in result.options:
            cards.append((keyword, _card_value(result.options[name]), comment))
    for name, (keyword, comment) in _FIT_INFO_KEYWORDS.items():
        if name in result.info:
            cards.append((keyword, _card_value(result.info[name]), comment))
    header = fits.Header()
    _add_mask_cards(header, info)
    cards.extend((c.keyword, c.value, c.comment) for c in header.cards)
    if cal is not None:
        cards.append(("NSCMCAL", cal.path.name[:68], "cal file giving the science footprint"))
    if mask_path is not None:
        cards.append(("NSCMUSER", Path(mask_path).name[:68], "user mask file"))
    history = [f"nsclean {__version__}: correlated read noise removed (Rauscher 2024)"]
    history += _wrap("nsclean fit options: " + json.dumps(result.options, sort_keys=True))
    history += _mask_history(info)
    return cards, history


def _add_mask_cards(header: fits.Header, info: Mapping) -> None:
    options = info.get("options") or {}
    _set_card(header, "NSCMSRC", info.get("source", "auto"), "mask source: auto, user, auto+user")
    for name, (keyword, comment) in _MASK_KEYWORDS.items():
        if name in options:
            _set_card(header, keyword, _card_value(options[name]), comment)
    rows = options.get("fixed_slit_rows")
    if rows:
        _set_card(header, "NSCMFSB1", int(rows[0]), "fixed-slit band first DMS row (0-indexed)")
        _set_card(header, "NSCMFSB2", int(rows[1]), "fixed-slit band last DMS row (0-indexed)")
    if "n_background" in info:
        _set_card(header, "NSCMNBKG", int(info["n_background"]), "background pixels in the mask")
        _set_card(
            header, "NSCMFRAC", round(float(info["background_fraction"]), 6), "background fraction"
        )
    guard = info.get("guard") or {}
    if "n_weak_columns" in guard:
        _set_card(
            header, "NSCMWEAK", int(guard["n_weak_columns"]), "columns the guard flagged as weak"
        )
    for key, keyword, comment in (
        ("cal", "NSCMCAL", "cal file giving the science footprint"),
        ("user_mask", "NSCMUSER", "user mask file"),
    ):
        if info.get(key):
            _set_card(header, keyword, str(info[key])[:68], comment)


def _mask_history(info: Mapping) -> list[str]:
    lines = []
    for step in info.get("steps", []):
        details = {k: v for k, v in step.items() if k not in ("step", "applied", "n_removed")}
        state = "applied" if step.get("applied") else "off"
        removed = step.get("n_removed")
        text = f"nsclean mask step {step['step']}: {state}"
        if removed is not None and step.get("applied"):
            text += f", removed {removed} px"
        if details:
            text += " " + json.dumps(details, sort_keys=True)
        lines += _wrap(text)
    guard = info.get("guard") or {}
    if guard.get("weak_columns"):
        lines += _wrap(
            f"nsclean mask guard: {guard['n_weak_columns']} weak columns "
            f"(< {guard['min_pixels']} px or gap > {guard['max_gap']} px): "
            + _ranges(guard["weak_columns"])
        )
    return lines


def _ranges(columns: list[int]) -> str:
    parts, start = [], None
    for i, col in enumerate(columns):
        if start is None:
            start = col
        if i + 1 == len(columns) or columns[i + 1] != col + 1:
            parts.append(f"{start}" if start == col else f"{start}-{col}")
            start = None
    return ",".join(parts)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, 70, break_long_words=True, break_on_hyphens=False) or [""]


def _set_card(header: fits.Header, keyword: str, value, comment: str) -> None:
    """Set a card, shortening the comment so that the card fits in 80 characters."""
    value_width = max(20, len(fits.Card(keyword, value).image.rstrip()) - 10)
    room = 80 - 10 - value_width - 3
    header[keyword] = (value, comment[:room] if room > 0 else "")


def _card_value(value):
    if value is None:
        return "NONE"
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)[:68]
    return str(value)[:68]


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _open_fits(path: Path) -> fits.HDUList:
    if not path.exists():
        raise NSCleanInputError(path, "file not found")
    if not path.is_file():
        raise NSCleanInputError(path, "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise NSCleanInputError(path, "empty file")
    _refuse_compressed(path)
    try:
        with warnings.catch_warnings():
            # Truncation is checked below from the sizes; other warnings are
            # about cosmetic header issues that real archive files can have.
            warnings.simplefilter("ignore")
            # Lazily: each HDU's declared size is checked before the next one is read.
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=True)
    except Exception as exc:  # astropy raises many types for damaged files
        raise NSCleanInputError(path, f"not a readable FITS file ({_reason(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for hdu in hdul:
                _check_declared_size(path, hdu, size)
    except NSCleanInputError:
        hdul.close()
        raise
    except Exception as exc:  # a damaged header further on
        hdul.close()
        raise NSCleanInputError(path, f"not a readable FITS file ({_reason(exc)})") from None
    return hdul


#: Largest data part of one HDU that is read (a full-frame SCI is 16 MiB; a long BOTS
#: time series of integrations is some hundreds of MiB).
MAX_HDU_BYTES = 2 << 30

_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"PK\x03\x04": "zip",
                     b"\xfd7zXZ": "xz"}


def _refuse_compressed(path: Path) -> None:
    """Refuse compressed files before astropy decompresses them (a gzip bomb named
    ``.fits`` would cost seconds of CPU and gigabytes before any check)."""
    with open(path, "rb") as handle:
        start = handle.read(6)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if start.startswith(magic):
            raise NSCleanInputError(
                path, f"{kind}-compressed file; decompress it first (JWST products are "
                "plain FITS)")


def _check_declared_size(path: Path, hdu, size: int) -> None:
    declared = _data_bytes(hdu.header)
    label = hdu.name or "PRIMARY"
    if declared > MAX_HDU_BYTES:
        axes = " x ".join(str(hdu.header.get(f"NAXIS{i}", "?"))
                          for i in range(int(hdu.header.get("NAXIS", 0)), 0, -1))
        raise NSCleanInputError(
            path, f"HDU {label} declares {declared} bytes of data ({axes}, BITPIX "
            f"{hdu.header.get('BITPIX')}), more than any NIRSpec product "
            f"(limit {MAX_HDU_BYTES >> 20} MiB)")
    needed = hdu.fileinfo()["datLoc"] + declared
    if needed > size:
        raise NSCleanInputError(
            path, f"truncated FITS file: HDU {label} needs {needed} bytes, the file has {size}")


def _data_bytes(header: fits.Header) -> int:
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    count = 1
    for i in range(1, naxis + 1):
        count *= max(int(header.get(f"NAXIS{i}", 0)), 0)
    count = (
        abs(int(header.get("BITPIX", 8)))
        // 8
        * int(header.get("GCOUNT", 1))
        * (count + int(header.get("PCOUNT", 0)))
    )
    return count


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def _image_data(path: Path, hdul: fits.HDUList, name: str) -> np.ndarray:
    try:
        hdu = hdul[name]
    except KeyError:
        raise NSCleanInputError(path, f"no {name} extension") from None
    return _checked_data(path, hdu, name)


def _checked_data(path: Path, hdu, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = hdu.data
    except Exception as exc:
        raise NSCleanInputError(path, f"cannot read {name} data ({_reason(exc)})") from None
    if data is None:
        raise NSCleanInputError(path, f"{name} extension has no data")
    return np.array(data)


def _check_nirspec(path: Path, header: fits.Header) -> None:
    instrument = str(header.get("INSTRUME", "")).strip().upper()
    if instrument != "NIRSPEC":
        raise NSCleanInputError(
            path, f"not a NIRSpec exposure (INSTRUME = {instrument or '(missing)'})"
        )
    detector = str(header.get("DETECTOR", "")).strip().upper()
    if detector not in DETECTORS:
        raise NSCleanInputError(
            path, f"DETECTOR = {detector or '(missing)'}, expected NRS1 or NRS2"
        )


_RATE_MODELS = ("IMAGEMODEL",)
_CAL_MODELS = ("IFUIMAGEMODEL", "MULTISLITMODEL", "SLITMODEL")
_CAL_NAME_RE = re.compile(r"_(cal|s2d|x1d|photom|phot|flat)[._]", re.IGNORECASE)
_RATE_NAME_RE = re.compile(r"_(rate|rateints|nsclean|cfn_rate)[._]", re.IGNORECASE)


_INTS_NAME_RE = re.compile(r"_rateints[._]", re.IGNORECASE)
_INTS_HINT = (
    "is a per-integration rateints product (CubeModel), not a 2-D rate image: clean it with "
    "nsclean.io.tso.clean_rateints, or give it to 'nsclean clean' with its calints file(s)"
)


def _check_product_kind(path: Path, header: fits.Header, expected: str) -> None:
    """Catch a cal given for a rate and vice versa (e.g. swapped arguments)."""
    model = str(header.get("DATAMODL", "")).strip().upper()
    name = path.name
    if expected == "rate":
        if model == "CUBEMODEL" or (not model and _INTS_NAME_RE.search(name)):
            raise NSCleanInputError(path, _INTS_HINT)
        if model and model not in _RATE_MODELS:
            raise NSCleanInputError(
                path,
                f"is a {header['DATAMODL'].strip()} product, expected a rate file (ImageModel); "
                "were the cal and rate files swapped?",
            )
        if not model and _CAL_NAME_RE.search(name):
            raise NSCleanInputError(path, "looks like a cal product by its name, expected a rate")
    else:
        if model and model not in _CAL_MODELS:
            raise NSCleanInputError(
                path,
                f"is a {header['DATAMODL'].strip()} product, expected a stage-2 cal file "
                "(IFUImageModel, MultiSlitModel or SlitModel); were the cal and rate files "
                "swapped?",
            )
        if not model and _RATE_NAME_RE.search(name):
            raise NSCleanInputError(path, "looks like a rate product by its name, expected a cal")


def _check_subarray(path: Path, header: fits.Header, shape: tuple[int, int]) -> None:
    name = str(header.get("SUBARRAY", "FULL")).strip().upper()
    if name not in NIRSPEC_SUBARRAYS:
        raise NSCleanInputError(path, f"unknown NIRSpec subarray SUBARRAY = {name}")
    size = FULL_FRAME
    try:
        start1 = int(header.get("SUBSTRT1", 1))
        start2 = int(header.get("SUBSTRT2", 1))
        size1 = int(header.get("SUBSIZE1", shape[1]))
        size2 = int(header.get("SUBSIZE2", shape[0]))
    except (TypeError, ValueError):
        raise NSCleanInputError(path, "SUBSTRT1/2 or SUBSIZE1/2 is not an integer") from None
    if (size2, size1) != tuple(shape):
        raise NSCleanInputError(
            path,
            f"subarray {name}: SUBSIZE2 x SUBSIZE1 = {size2} x {size1} but SCI is "
            f"{_shape_text(shape)}",
        )
    if start1 < 1 or start2 < 1 or start1 + size1 - 1 > size or start2 + size2 - 1 > size:
        raise NSCleanInputError(
            path,
            f"subarray {name} (SUBSTRT1 {start1}, SUBSTRT2 {start2}, {size2} x {size1}) "
            f"does not fit on the {size} x {size} detector",
        )
    if name.startswith("FULL") and tuple(shape) != (size, size):
        raise NSCleanInputError(path, f"SUBARRAY = {name} but SCI is {_shape_text(shape)}")


def _origin(header: Mapping) -> tuple[int, int]:
    return int(header.get("SUBSTRT2", 1)) - 1, int(header.get("SUBSTRT1", 1)) - 1


def _stem_or_error(path: Path, header: Mapping) -> str:
    try:
        return exposure_stem(path, header)
    except ValueError as exc:
        raise NSCleanInputError(path, str(exc)) from None


def _refuse_inputs_as_outputs(inputs, outputs) -> None:
    """Inputs are never written: refuse an output that is one of them (by any name: the
    same path, a symbolic or a hard link), whatever ``overwrite`` says."""
    inputs = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for output in (Path(p) for p in outputs if p is not None):
        if not output.exists():
            continue
        for source in inputs:
            if os.path.samefile(output, source):
                raise NSCleanInputError(output, f"output would overwrite the input {source}")
    names = [Path(p) for p in outputs if p is not None]
    for index, output in enumerate(names):
        if output.resolve() in {other.resolve() for other in names[index + 1:]}:
            raise NSCleanInputError(output, "is given for two outputs")


def _refuse_existing(paths, overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path is not None and Path(path).exists():
            raise FileExistsError(f"{path}: {EXISTS_MESSAGE}")


def _digits(value, width: int) -> str:
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(text)
    return text.zfill(width)


def _normalise(value) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, str):
        text = value.strip().upper()
        # PROGRAM '01345' vs 1345, EXPOSURE '1' vs '00001': compare as numbers.
        return str(int(text)) if text.isdigit() else text
    return str(value)


def _shape_text(shape) -> str:
    return " x ".join(str(n) for n in shape)
