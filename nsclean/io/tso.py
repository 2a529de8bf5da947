"""Time-series (BOTS) products: ``_rateints`` and ``_calints``, whole or in segments.

A NIRSpec bright-object time series (EXP_TYPE ``NRS_BRIGHTOBJ``) is one exposure of
hundreds to thousands of integrations.  Stage 1 writes one count-rate plane per
integration (``_rateints``, a CubeModel: SCI/ERR/DQ/VAR_* of shape
``(n_integrations, ny, nx)``) and stage 2 the matching ``_calints`` (a SlitModel with
3-D SCI).  Large exposures are split into *segments*, one file each
(``jw..._00001-seg001_nrs1_rateints.fits``), whose primary headers say which
integrations they hold (INTSTART, INTEND, 1-indexed, of NINTS).  A segmented exposure
is one exposure with several files: its stem is the name without ``-segNNN``.

Design decisions
----------------
One mask per exposure
    The science footprint does not move between integrations, so the background mask is
    built once, from the union of the calints slits and a summary image of the
    rateints (the median of at most 64 evenly spaced integrations, and the DQ flags set
    in every integration: the reference border and bad pixels).  Pixels flagged in a
    single integration (a jump, a saturated group) are NaN in that plane and the fit
    never uses NaN pixels, so they drop out of that integration's fit only.
One fit per integration
    The noise is independent from one integration to the next, so every plane is fitted
    on its own with :func:`nsclean.fit` (the library's public interface: whatever the
    cleaning model becomes, this module does not change).  The planes are split into
    chunks fitted by forked worker processes, one per CPU: the fit of a 32 x 2048
    subarray is bound by Python overhead, so threads gave nothing (4.7 s with one, 4.4 s
    with two, for 200 integrations).
Segment at a time
    A 2000-integration SUB2048 exposure is ~2.6 GB of FITS.  Segments are read, cleaned
    and written one at a time, so memory stays at about one segment.  Each cleaned
    segment is the input file byte for byte except the SCI data and the primary header
    (:func:`nsclean.exposure.write_cleaned_rate`), written under a temporary name and
    renamed; if a later segment fails, the segments already written by the call are
    removed again, so an exposure is either cleaned whole or not at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from astropy.io import fits

from ..algorithm import masks as masklib
from ..algorithm import nirspec as dqflags
from . import exposure as expo
from .errors import NSCleanInputError

__all__ = [
    "ProductName",
    "RateintsExposure",
    "RateintsSegment",
    "clean_rateints",
    "cleaned_name",
    "is_ints_product",
    "make_rateints_mask",
    "parse_product_name",
    "read_calints",
    "read_rateints",
    "read_segment",
]

_PRODUCT_RE = re.compile(
    r"^(?P<base>jw\d{11}_\d{5}_\d{5})(?:-seg(?P<segment>\d{3}))?_(?P<detector>nrs[12])"
    r"_(?P<suffix>[a-z0-9_]+)\.fits$",
    re.IGNORECASE,
)
#: Integrations used for the summary image of the mask (evenly spaced).
SUMMARY_PLANES = 64
_INTS_MODELS = ("CUBEMODEL",)
_FIT_INFO_SUMS = ("n_lines", "n_guarded", "n_uncleaned", "n_rejected")


@dataclass(frozen=True)
class ProductName:
    """The parts of a JWST product file name.

    Attributes
    ----------
    stem : str
        Exposure stem without the segment, lower case
        (``jw01345062001_03101_00001_nrs1``).
    segment : int or None
        Segment number (``-seg002`` -> 2), None for an unsegmented file.
    suffix : str
        Product suffix (``rateints``, ``calints``, ``rate``, ``cal`` ...).
    """

    stem: str
    segment: int | None
    suffix: str

    @property
    def segment_stem(self) -> str:
        """The stem with its segment, as it appears in the file name."""
        base, detector = self.stem.rsplit("_", 1)
        seg = "" if self.segment is None else f"-seg{self.segment:03d}"
        return f"{base}{seg}_{detector}"


def parse_product_name(name: str | os.PathLike) -> ProductName | None:
    """Split a product file name into stem, segment and suffix.

    Examples
    --------
    >>> parse_product_name("jw01366004001_04101_00001-seg002_nrs1_rateints.fits")
    ProductName(stem='jw01366004001_04101_00001_nrs1', segment=2, suffix='rateints')
    >>> parse_product_name("notes.txt") is None
    True
    """
    found = _PRODUCT_RE.match(Path(name).name)
    if not found:
        return None
    segment = found.group("segment")
    return ProductName(
        stem=f"{found.group('base')}_{found.group('detector')}".lower(),
        segment=None if segment is None else int(segment),
        suffix=found.group("suffix").lower(),
    )


def cleaned_name(rateints_path: str | os.PathLike) -> str:
    """File name of the cleaned product of one rateints file (segment kept).

    ``jw..._00001-seg001_nrs1_rateints.fits`` -> ``jw..._00001-seg001_nrs1_nsclean_rateints.fits``
    """
    parsed = parse_product_name(rateints_path)
    if parsed is None:
        raise NSCleanInputError(rateints_path, "not a jw..._<nrs1|nrs2>_rateints.fits name")
    return f"{parsed.segment_stem}_nsclean_rateints.fits"


def is_ints_product(path: str | os.PathLike) -> bool:
    """True for a per-integration product (``_rateints``; DATAMODL CubeModel)."""
    parsed = parse_product_name(path)
    if parsed is not None and parsed.suffix in ("rateints", "nsclean_rateints"):
        return True
    try:
        model = str(fits.getval(path, "DATAMODL", 0)).strip().upper()
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return False
    return model in _INTS_MODELS


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass
class RateintsSegment:
    """One rateints file: its header and where its integrations sit in the exposure.

    The data are not kept in memory; :meth:`read` loads them.
    """

    path: Path
    header: fits.Header = field(repr=False)
    segment: int | None
    int_start: int
    int_end: int
    shape: tuple[int, int, int]

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """SCI (native byte order) and DQ (uint32, 3-D) of this segment."""
        with expo._open_fits(self.path) as hdul:
            sci = expo._image_data(self.path, hdul, "SCI")
            dq = expo._image_data(self.path, hdul, "DQ")
        sci = sci.astype(sci.dtype.newbyteorder("="), copy=False)
        if dq.ndim == 2:  # a DQ shared by all integrations
            dq = np.broadcast_to(dq, sci.shape)
        return sci, dq.astype(np.uint32, copy=False)


@dataclass
class RateintsExposure(expo.ExposureKeywords):
    """A time-series exposure: one or more rateints segments in integration order."""

    stem: str
    segments: list[RateintsSegment]

    @property
    def header(self) -> fits.Header:
        return self.segments[0].header

    @property
    def path(self) -> Path:
        return self.segments[0].path

    @property
    def n_integrations(self) -> int:
        return sum(s.shape[0] for s in self.segments)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.segments[0].shape[1:]

    def summary(self, max_planes: int = SUMMARY_PLANES) -> expo.RateExposure:
        """A 2-D stand-in for the mask: median image and the DQ flags every plane has.

        Parameters
        ----------
        max_planes : int
            At most this many evenly spaced integrations make the median image.

        Returns
        -------
        nsclean.exposure.RateExposure
            ``path`` and ``header`` of the first segment.
        """
        picks = np.unique(np.linspace(0, self.n_integrations - 1, max_planes).astype(int))
        chosen, common_dq, offset = [], None, 0
        for segment in self.segments:
            sci, dq = segment.read()
            anded = np.bitwise_and.reduce(dq, axis=0)
            common_dq = anded if common_dq is None else common_dq & anded
            local = picks[(picks >= offset) & (picks < offset + sci.shape[0])] - offset
            chosen.append(sci[local].astype(np.float32, copy=True))
            offset += sci.shape[0]
        stack = np.concatenate(chosen)
        with np.errstate(all="ignore"), _quiet():
            median = np.nanmedian(stack, axis=0).astype(np.float32)
        if not np.isfinite(median).any():
            raise NSCleanInputError(self.path, "SCI has no finite pixel in any integration")
        return expo.RateExposure(path=self.path, stem=self.stem, header=self.header,
                                 sci=median, dq=common_dq)


class _quiet:
    """Silence numpy's all-NaN slice warnings (such pixels stay NaN, as intended)."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)


def read_rateints(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> RateintsExposure:
    """Check and describe the rateints file(s) of one time-series exposure.

    Parameters
    ----------
    paths : path or iterable of paths
        One unsegmented ``_rateints.fits``, or every segment of one exposure (any
        order).

    Returns
    -------
    RateintsExposure
        Segments in integration order; data are read later, segment by segment.

    Raises
    ------
    NSCleanInputError
        If a file is not a NIRSpec rateints product (one line naming it: a 2-D rate
        file, a cal file, a non-NIRSpec file ...), the files belong to different
        exposures or geometries, a segment is given twice, or a segment is missing
        (a gap in the segment numbers or in INTSTART/INTEND, or integrations up to
        NINTS that no file holds).
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise NSCleanInputError(None, "no rateints file given")
    segments, stems = [], {}
    for path in paths:
        segment = read_segment(path)
        stems.setdefault(expo._stem_or_error(path, segment.header), []).append(path)
        segments.append(segment)
    if len(stems) > 1:
        described = "; ".join(f"{stem}: {', '.join(p.name for p in ps)}"
                              for stem, ps in sorted(stems.items()))
        raise NSCleanInputError(paths[0], f"rateints files of different exposures given "
                                          f"together ({described})")
    stem = next(iter(stems))
    segments.sort(key=lambda s: (s.int_start, s.segment or 0))
    _check_segments(stem, segments)
    return RateintsExposure(stem=stem, segments=segments)


def read_segment(path: str | os.PathLike) -> RateintsSegment:
    """Check and describe one rateints file on its own (see :func:`read_rateints`)."""
    path = Path(path)
    with expo._open_fits(path) as hdul:
        header = hdul[0].header.copy()
        expo._check_nirspec(path, header)
        model = str(header.get("DATAMODL", "")).strip().upper()
        parsed = parse_product_name(path)
        if model and model not in _INTS_MODELS:
            raise NSCleanInputError(
                path, f"is a {header['DATAMODL'].strip()} product, expected a rateints file "
                      "(CubeModel, one plane per integration)")
        if not model and parsed is not None and parsed.suffix not in ("rateints",
                                                                      "nsclean_rateints"):
            raise NSCleanInputError(path, f"is a _{parsed.suffix} file by its name, expected "
                                          "a _rateints file")
        names = [hdu.name for hdu in hdul]
        for name in ("SCI", "DQ"):
            if name not in names:
                raise NSCleanInputError(path, f"no {name} extension")
        sci_header, dq_header = hdul["SCI"].header, hdul["DQ"].header
    shape = tuple(int(sci_header.get(f"NAXIS{i}", 0))
                  for i in range(int(sci_header.get("NAXIS", 0)), 0, -1))
    if len(shape) != 3:
        raise NSCleanInputError(path, f"SCI is {len(shape)}-D {shape}; a rateints product has "
                                      "one 2-D plane per integration (3-D)")
    dq_shape = tuple(int(dq_header.get(f"NAXIS{i}", 0))
                     for i in range(int(dq_header.get("NAXIS", 0)), 0, -1))
    if dq_shape not in (shape, shape[1:]):
        raise NSCleanInputError(path, f"DQ is {expo._shape_text(dq_shape)} but SCI is "
                                      f"{expo._shape_text(shape)}")
    if int(sci_header.get("BITPIX", 8)) not in (-32, -64):
        raise NSCleanInputError(path, "SCI is not floating point")
    expo._check_subarray(path, header, shape[1:])
    try:
        int_start = int(header.get("INTSTART", 1))
        int_end = int(header.get("INTEND", int_start + shape[0] - 1))
    except (TypeError, ValueError):
        raise NSCleanInputError(path, "INTSTART or INTEND is not an integer") from None
    if int_end - int_start + 1 != shape[0]:
        raise NSCleanInputError(
            path, f"INTSTART {int_start} to INTEND {int_end} is {int_end - int_start + 1} "
                  f"integrations but SCI has {shape[0]} planes")
    return RateintsSegment(path=path, header=header,
                           segment=None if parsed is None else parsed.segment,
                           int_start=int_start, int_end=int_end, shape=shape)


def _check_segments(stem: str, segments: list[RateintsSegment]) -> None:
    first = segments[0]
    for other in segments[1:]:
        problems = [
            f"{key}: {first.path.name} {expo._normalise(first.header.get(key))}, "
            f"{other.path.name} {expo._normalise(other.header.get(key))}"
            for key in expo._GEOMETRY_KEYWORDS + ("EXP_TYPE", "NINTS")
            if expo._normalise(first.header.get(key)) != expo._normalise(other.header.get(key))
        ]
        if problems:
            raise NSCleanInputError(other.path, "segment does not match the others of "
                                                f"exposure {stem}: " + "; ".join(problems))
    numbers = [s.segment for s in segments if s.segment is not None]
    if len(set(numbers)) != len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        raise NSCleanInputError(first.path, f"segment seg{twice[0]:03d} of exposure {stem} "
                                            "given twice")
    if numbers:
        expected = set(range(1, max(numbers) + 1))
        missing = sorted(expected - set(numbers))
        if missing:
            raise NSCleanInputError(
                first.path, f"segment seg{missing[0]:03d} of exposure {stem} is missing "
                            f"(given: {', '.join(f'seg{n:03d}' for n in sorted(numbers))})")
    expected_start = 1
    for segment in segments:
        if segment.int_start != expected_start:
            raise NSCleanInputError(
                segment.path, f"starts at integration {segment.int_start} (INTSTART) but the "
                              f"given segments of exposure {stem} end at {expected_start - 1}:"
                              " a segment is missing")
        expected_start = segment.int_end + 1
    n_ints = first.header.get("NINTS")
    if n_ints is not None and int(n_ints) > segments[-1].int_end:
        last = segments[-1]
        after = f"after seg{last.segment:03d} " if last.segment is not None else ""
        raise NSCleanInputError(
            last.path, f"integrations {last.int_end + 1}-{int(n_ints)} of NINTS {int(n_ints)} "
                       f"are in no given file: a segment {after}of exposure {stem} is missing")


def read_calints(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 rateints: RateintsExposure) -> expo.CalExposure:
    """The science footprint of a time series from its calints file(s).

    Parameters
    ----------
    paths : path or iterable of paths
        The ``_calints.fits`` of the exposure (all segments, or some: the slit does not
        move, so any segment gives the footprint; all given ones are combined).
    rateints : RateintsExposure
        The exposure they must belong to.

    Returns
    -------
    nsclean.exposure.CalExposure
        With the slits of every given calints file.

    Raises
    ------
    NSCleanInputError
        Naming the calints file, if it is not a calints product or does not match the
        rateints: another exposure, detector or subarray, or a segment whose
        INTSTART/INTEND differ from the rateints segment of the same number.
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise NSCleanInputError(rateints.path, "no calints file given for the footprint")
    summary = expo.RateExposure(path=rateints.path, stem=rateints.stem,
                                header=rateints.header, sci=np.empty((0, 0)),
                                dq=np.empty((0, 0), np.uint32))
    by_segment = {s.segment: s for s in rateints.segments}
    cals = []
    for path in paths:
        parsed = parse_product_name(path)
        if parsed is not None and parsed.suffix not in ("calints",):
            raise NSCleanInputError(path, f"is a _{parsed.suffix} file by its name, expected "
                                          "a _calints file")
        cal = expo.read_cal(path)
        problems = expo.match_problems(summary, cal)
        segment = by_segment.get(parsed.segment if parsed else None)
        if segment is not None:
            for key, value in (("INTSTART", segment.int_start), ("INTEND", segment.int_end)):
                if key in cal.header and int(cal.header[key]) != value:
                    problems.append(f"{key}: rateints {value}, calints {int(cal.header[key])}")
        if problems:
            raise NSCleanInputError(path, f"does not match rateints {rateints.path.name}: "
                                          + "; ".join(problems))
        cals.append(cal)
    combined = cals[0]
    for cal in cals[1:]:
        combined.slits.extend(cal.slits)
    return combined


# --------------------------------------------------------------------------------------
# Masks and cleaning
# --------------------------------------------------------------------------------------


def _exposure_mask(rateints, calints_paths, mask_path, user_mask_mode, mask_options):
    summary = rateints.summary()
    cal = read_calints(calints_paths, rateints) if calints_paths else None
    user_mask, user_header = None, None
    if mask_path is not None:
        user_mask, user_header = expo._read_user_mask(mask_path, summary, with_header=True)
    if cal is None and user_mask is None:
        raise NSCleanInputError(rateints.path, "no background mask: give the calints file(s) "
                                               "(automatic mask) or a mask file")
    try:
        if cal is None:
            opts = expo._as_options(mask_options)
            info = {"source": "user", **expo._summary_of(user_mask, opts, summary.origin),
                    "options": expo._options_from_header(user_header), "steps": []}
            mask = user_mask
        else:
            mask, info = expo.build_exposure_mask(summary, cal, user_mask=user_mask,
                                                  user_mask_mode=user_mask_mode,
                                                  options=mask_options)
            info["cal"] = ", ".join(Path(p).name for p in _as_paths(calints_paths))
    except NSCleanInputError:
        raise
    except ValueError as exc:
        raise NSCleanInputError(rateints.path, str(exc)) from None
    if not mask.any():
        raise NSCleanInputError(mask_path or rateints.path, "mask has no background pixel")
    if mask_path is not None:
        info["user_mask"] = Path(mask_path).name
    return summary, cal, mask, info


def _as_paths(paths) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def make_rateints_mask(
    calints_paths, rateints_paths, output_path: str | os.PathLike, *,
    user_mask_path: str | os.PathLike | None = None, user_mask_mode: str = "and",
    options: masklib.MaskOptions | Mapping | None = None, overwrite: bool = False,
    fsync: bool = False,
) -> dict:
    """Build and write the one background mask of a time-series exposure.

    Parameters
    ----------
    calints_paths : path, iterable of paths or None
        The exposure's calints file(s) (science footprint).
    rateints_paths : path or iterable of paths
        Every rateints segment of the exposure.
    output_path : path
        The FITS mask to write (uint8, 1 = background; header as
        :func:`nsclean.exposure.write_mask`).
    user_mask_path, user_mask_mode, options, overwrite, fsync
        As :func:`nsclean.exposure.make_mask`.

    Returns
    -------
    dict
        JSON-able summary like :func:`nsclean.exposure.make_mask`, plus
        ``n_integrations`` and ``segments``.
    """
    rateints = read_rateints(rateints_paths)
    summary, _, mask, info = _exposure_mask(rateints, calints_paths, user_mask_path,
                                            user_mask_mode, options)
    expo.write_mask(output_path, mask, info, reference_header=summary.header,
                    overwrite=overwrite, fsync=fsync)
    return {
        "stem": rateints.stem,
        "rate": [str(s.path) for s in rateints.segments],
        "cal": [str(p) for p in _as_paths(calints_paths)] or None,
        "mask": str(output_path),
        "source": info["source"],
        "n_background": int(info["n_background"]),
        "background_fraction": round(float(info["background_fraction"]), 6),
        "n_weak_columns": int(info["guard"]["n_weak_columns"]),
        "weak_columns": list(info["guard"]["weak_columns"]),
        "n_integrations": rateints.n_integrations,
        "segments": len(rateints.segments),
    }


# The segment being fitted, for forked worker processes (inherited, not pickled).
_JOB: dict = {}


def _fit_range(bounds: tuple[int, int]):
    """Fit planes ``start:stop`` of the current job; model and summed diagnostics."""
    from .. import fit

    sci, dq, mask, detector, fit_options = (_JOB[k] for k in
                                            ("sci", "dq", "mask", "detector", "options"))
    start, stop = bounds
    model = np.empty((stop - start, *sci.shape[1:]), dtype=sci.dtype)
    totals = dict.fromkeys(_FIT_INFO_SUMS, 0)
    first = None
    unusable = np.uint32(dqflags.DO_NOT_USE)
    for index in range(start, stop):
        plane_mask = mask
        flagged = (dq[index] & unusable) != 0
        if flagged[mask].any():  # flagged in this integration only: keep it out
            plane_mask = mask & ~flagged
        result = fit(sci[index], plane_mask, detector, **fit_options)
        model[index - start] = result.model
        for key in _FIT_INFO_SUMS:
            totals[key] += int(result.info.get(key) or 0)
        if first is None:
            first = ({k: v for k, v in result.info.items() if np.isscalar(v) or v is None},
                     result.options)
    return start, model, totals, first


def _fit_planes(sci, dq, mask, detector, fit_options, workers):
    """Fit every integration plane: model cube, summed diagnostics, first info/options.

    With ``workers`` > 1 the planes are split into chunks fitted by forked processes
    (see the module notes).
    """
    import contextlib

    from ..algorithm.core import resolved_method
    from ..algorithm.readout import shared_covariance

    _JOB.update(sci=sci, dq=dq, mask=mask, detector=detector, options=fit_options)
    n_planes = sci.shape[0]
    # The readout model's noise covariance is measured once for all the integrations
    # (forked workers inherit it): the same fits whatever the number of workers.
    method = resolved_method(fit_options.get("method", "auto"), sci.shape[1:])
    sharing = (shared_covariance(sci, mask, detector) if method == "readout"
               else contextlib.nullcontext())
    try:
        with sharing:
            if workers <= 1 or n_planes < 2 * workers or not _can_fork():
                _, model, totals, first = _fit_range((0, n_planes))
                return model, totals, first
            import multiprocessing

            edges = np.linspace(0, n_planes, 4 * workers + 1).round().astype(int)
            chunks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)
                      if b > a]
            model = np.empty(sci.shape, dtype=sci.dtype)
            totals, first = dict.fromkeys(_FIT_INFO_SUMS, 0), None
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for start, part, part_totals, part_first in pool.imap_unordered(_fit_range,
                                                                                chunks):
                    model[start:start + part.shape[0]] = part
                    for key in _FIT_INFO_SUMS:
                        totals[key] += part_totals[key]
                    if start == 0:
                        first = part_first
            return model, totals, first
    finally:
        _JOB.clear()


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def clean_rateints(
    rateints_paths,
    output_dir: str | os.PathLike,
    *,
    calints_paths=None,
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
    workers: int | None = None,
) -> dict:
    """Clean every integration of a time-series exposure (all its segments).

    Parameters
    ----------
    rateints_paths : path or iterable of paths
        The exposure's ``_rateints.fits`` (every segment); never opened for writing.
    output_dir : path
        Folder for the cleaned files, one per input file, named by
        :func:`cleaned_name` (``<file stem>_nsclean_rateints.fits``).
    calints_paths : path or iterable of paths, optional
        The calints file(s), for the automatic mask.
    mask_path : path, optional
        A ready-made mask (FITS or red-shaded PNG) of the subarray.
    user_mask_mode, mask_options
        As :func:`nsclean.exposure.clean_exposure`.
    fit_options : mapping, optional
        Options of :func:`nsclean.fit`, the same for every integration.
    save_model, save_mask : bool
        Also write ``<file stem>_flicker_noise.fits`` per segment (the model cube in
        the layout of the rateints file) and ``<stem>_mask.fits`` (once).
    product_dir : path, optional
        Folder for those extra products (default ``output_dir``).
    overwrite, fsync, extra_cards
        As :func:`nsclean.exposure.clean_exposure`.
    workers : int, optional
        Processes fitting integrations at the same time (default: the CPUs this
        process may use; 1 fits in this process).

    Returns
    -------
    dict
        JSON-able summary as :func:`nsclean.exposure.clean_exposure` (``fit`` sums
        the diagnostics over all integrations), plus ``n_integrations`` and
        ``segments``.

    Raises
    ------
    NSCleanInputError
        For any unusable input (nothing is written then; outputs of earlier segments
        of the same call are removed if a later one fails).
    FileExistsError
        If an output exists and ``overwrite`` is false.
    """
    rateints = read_rateints(rateints_paths)
    outputs, models, saved_mask = _output_paths(rateints, output_dir, product_dir,
                                                save_model, save_mask)
    expo._refuse_existing([*outputs, *models, saved_mask], overwrite)
    summary, cal, mask, info = _exposure_mask(rateints, calints_paths, mask_path,
                                              user_mask_mode, mask_options)
    workers = _default_workers() if workers is None else max(1, int(workers))
    fit_options = dict(fit_options or {})
    totals = dict.fromkeys(_FIT_INFO_SUMS, 0)
    options_record, first = info.get("options", {}), None
    written: list[Path] = []
    try:
        for segment, output, model_path in zip(
                rateints.segments, outputs, models or [None] * len(outputs), strict=True):
            sci, dq = segment.read()
            try:
                model, part_totals, part_first = _fit_planes(sci, dq, mask, rateints.detector,
                                                             fit_options, workers)
            except (ValueError, TypeError) as exc:
                if isinstance(exc, NSCleanInputError):
                    raise
                raise NSCleanInputError(segment.path, str(exc)) from None
            first = first or part_first
            for key in _FIT_INFO_SUMS:
                totals[key] += part_totals[key]
            cleaned = sci - model
            del sci
            aggregate = SimpleNamespace(options=first[1], info=dict(first[0], **totals))
            cards, history = expo._provenance(summary, cal, mask_path, info, aggregate)
            cards = [*cards, ("NSCNINTS", int(model.shape[0]), "integrations cleaned in file"),
                     *extra_cards]
            expo.write_cleaned_rate(segment.path, output, cleaned, cards=cards,
                                    history=history, overwrite=overwrite, fsync=fsync)
            written.append(output)
            if model_path is not None:
                model_cards = [c for c in cards if c[0] not in expo.STATUS_KEYWORDS]
                model_cards.append(("NSCPROD", "MODEL", "SCI holds the fitted noise model"))
                expo.write_cleaned_rate(segment.path, model_path, model, cards=model_cards,
                                        history=history, overwrite=overwrite, fsync=fsync)
                written.append(model_path)
        if saved_mask is not None:
            expo.write_mask(saved_mask, mask, info, reference_header=summary.header,
                            overwrite=overwrite, fsync=fsync)
            written.append(saved_mask)
    except BaseException:
        for path in written:  # all or nothing for the exposure
            path.unlink(missing_ok=True)
        raise
    return _summary(rateints, calints_paths, mask_path, written, info, totals, first,
                    options_record)


def _output_paths(rateints, output_dir, product_dir, save_model, save_mask):
    """Cleaned files, model files and mask file of a time-series exposure.

    Returns
    -------
    outputs : list of Path
        One cleaned file per segment.
    models : list of Path
        One model file per segment if ``save_model``, else empty.
    saved_mask : Path or None

    Raises
    ------
    NSCleanInputError
        If an output would overwrite an input rateints file.
    """
    output_dir = Path(output_dir)
    extras_dir = Path(product_dir) if product_dir is not None else output_dir
    outputs = [output_dir / cleaned_name(s.path) for s in rateints.segments]
    models = [expo.product_path(extras_dir, parse_product_name(s.path).segment_stem,
                                expo.MODEL_SUFFIX) for s in rateints.segments] \
        if save_model else []
    saved_mask = expo.product_path(extras_dir, rateints.stem, expo.MASK_SUFFIX) \
        if save_mask else None
    inputs = {s.path.resolve() for s in rateints.segments}
    for path in outputs + models:
        if path.resolve() in inputs:
            raise NSCleanInputError(path, "output would overwrite an input rateints file")
    return outputs, models, saved_mask


def _summary(rateints, calints_paths, mask_path, written, info, totals, first,
             options_record) -> dict:
    """JSON-able summary of :func:`clean_rateints` (see its Returns section)."""
    return {
        "stem": rateints.stem,
        "rate": [str(s.path) for s in rateints.segments],
        "cal": [str(p) for p in _as_paths(calints_paths)] or None,
        "mask_file": str(mask_path) if mask_path else None,
        "outputs": [str(p) for p in written],
        "detector": rateints.detector,
        "exp_type": rateints.exp_type,
        "subarray": rateints.subarray,
        "mask_source": info["source"],
        "n_background": int(info["n_background"]),
        "background_fraction": round(float(info["background_fraction"]), 6),
        "n_weak_columns": int(info["guard"]["n_weak_columns"]),
        "weak_columns": list(info["guard"]["weak_columns"]),
        "fit": totals,
        "fit_method": first[0].get("method"),
        "fit_mode": first[0].get("mode"),
        "fit_options": first[1],
        "mask_options": options_record,
        "n_integrations": rateints.n_integrations,
        "segments": len(rateints.segments),
        "version": expo.__version__,
    }
