"""Synthetic NIRSpec count-rate exposures with known truth.

The simulator makes ``_rate.fits`` / ``_cal.fits`` pairs that look like JWST NIRSpec
products (same HDU layout and header keywords), together with the noise-free scene and
the exact noise realisation, so that the cleaner can be benchmarked against the truth,
the file readers and mask builder can be tested, and the whole workflow can be demonstrated
without downloading anything.

Noise model
-----------
After Rauscher (2015, PASP 127, 1144, "NGHXRG"): a 2048 x 2048 H2RG read through 4 outputs
of 512 pixels, 10 us per pixel, 12 pause ticks per line (one line of pause per frame).
Components: white read noise, pink (1/f) noise shared by the 4 outputs (mirrored on odd
outputs because their fast-scan direction alternates), uncorrelated pink noise per output,
alternating column noise (ACN), a picture-frame pattern that changes from exposure to
exposure, and quieter reference pixels. The 1/f components are made in the *time domain*
(the order in which pixels were digitised) and only then mapped to the DMS frame, which is
what makes them vertical stripes in a DMS image.

All arrays here are in the DMS frame (as stored in SCI) unless their name says otherwise.

Approximations
--------------
- A rate image is a slope fitted to many frames; its noise is modelled as *one effective
  frame* of the components above, in electrons, divided by ``gain * effective_time``. The
  spatial structure and the ratios of the components are kept, not the exact frequency
  weighting of the slope fit.
- IRS2: the interleaved reference pixels remove the 1/f power that varies within a line;
  the residual is modelled as 1/f noise low-passed at half the line rate (so smooth along
  a DMS column, independent from column to column). Traditional readout keeps the whole
  1/f spectrum. Subarrays are read through one output, traditionally.
- Photon noise is Gaussian with the Poisson variance, and counted as white noise.
- Scenes are schematic: straight or gently curved/tilted traces with a soft-edged slit
  profile, a Gaussian source profile, smooth continua and Gaussian emission lines. Slit
  and subarray row positions, slit heights and wavelength ranges are plausible, not the
  real instrument model. Cal SCI values stay in DN/s (no flux calibration).
- Files are written with astropy only: no ASDF extension (stdatamodels still opens them
  as the right model, from DATAMODL and the FITS keywords, but more slowly).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy.fft
from astropy.io import fits

from nsclean import __version__
from nsclean.algorithm import nirspec as dqflags
from nsclean.algorithm.nirspec import FIXED_SLIT_ROWS, FULL_FRAME, N_CHANNELS, REFERENCE_BORDER
from nsclean.algorithm.orientation import detector_to_dms
from nsclean.io.atomic import atomic_file

__all__ = [
    "DEFAULT_AMPLITUDES",
    "KINDS",
    "SUBARRAYS",
    "SimulatedExposure",
    "make_demo_program",
    "SimulatedTimeSeries",
    "make_stem",
    "simulate_exposure",
    "simulate_timeseries",
    "write_exposure",
    "write_timeseries",
]

# --- detector timing (Rauscher 2015; field notes section 2) --------------------------------
OUTPUT_WIDTH = FULL_FRAME // N_CHANNELS
PIXEL_TIME = 10e-6  # s per pixel tick
ROW_OVERHEAD = 12  # pause ticks at the end of every line of every output
IRS2_ROW_TICKS = 712  # normal pixels interleaved with reference pixels in IRS2
GAIN = {"NRS1": 0.996, "NRS2": 1.137}  # e-/DN

# light above this (DN/s; 2 % of the default white-noise rms) counts as illuminated
_ILLUMINATION_THRESHOLD = 1e-4

KINDS = ("ifu", "mos", "fs", "bots", "dark")

_EXP_TYPE = {
    "ifu": "NRS_IFU",
    "mos": "NRS_MSASPEC",
    "fs": "NRS_FIXEDSLIT",
    "bots": "NRS_BRIGHTOBJ",
    "dark": "NRS_DARK",
}
_CAL_MODEL = {
    "ifu": "IFUImageModel",
    "mos": "MultiSlitModel",
    "fs": "MultiSlitModel",
    # jwst's extract_2d writes a single SlitModel for NRS_BRIGHTOBJ
    "bots": "SlitModel",
}
# grating, filter, wavelength range (micron), APT template
_OPTICS = {
    "ifu": ("G395H", "F290LP", (2.87, 5.27), "NIRSpec IFU Spectroscopy"),
    "mos": ("PRISM", "CLEAR", (0.60, 5.30), "NIRSpec MultiObject Spectroscopy"),
    "fs": ("G140M", "F100LP", (0.97, 1.89), "NIRSpec Fixed Slit Spectroscopy"),
    "bots": ("G395H", "F290LP", (2.87, 5.27), "NIRSpec Bright Object Time Series"),
    "dark": ("MIRROR", "OPAQUE", (np.nan, np.nan), "NIRSpec Dark"),
}

# DMS frame, 1-indexed (SUBSTRT1, SUBSTRT2, SUBSIZE1, SUBSIZE2). The row placement of the
# 32-row subarrays is put on the simulated S1600A1 aperture; it is not the real one.
SUBARRAYS = {
    "FULL": (1, 1, 2048, 2048),
    "ALLSLITS": (1, 897, 2048, 256),
    "SUB2048": (1, 997, 2048, 32),
    "SUB1024A": (1, 997, 1024, 32),
    "SUB1024B": (1025, 997, 1024, 32),
    "SUB512": (1, 997, 512, 32),
    "SUB32": (1, 997, 32, 32),
}

# Fixed slits in the simulated layout: name -> (first DMS row 0-indexed, height in rows).
# The heights follow the apertures (0.2" x 3.3" slits ~33 px, S1600A1 1.6" ~16 px); the row
# positions are invented but all fall in the fixed-slit band.
_FIXED_SLITS = {
    "S200A2": (925, 33),
    "S200A1": (965, 33),
    "S1600A1": (1004, 16),
    "S400A1": (1027, 38),
    "S200B1": (1072, 33),
}

DEFAULT_AMPLITUDES = {
    "white": 5.2,
    "pink_correlated": 3.0,
    "pink_uncorrelated": 1.0,
    "alternating_column": 0.5,
    "picture_frame": 0.2,
    "picture_frame_nrs2_factor": 2.5,
    "reference_ratio": 0.8,
    "effective_time": 1000.0,
}
"""Noise options of :func:`simulate_exposure` and their defaults.

``white``, ``pink_correlated``, ``pink_uncorrelated``, ``alternating_column`` and
``picture_frame`` are rms values in electrons of one effective frame (NIRSpec values of
Rauscher 2015; ``picture_frame`` is the rms over the whole frame of the PCA0-like pattern,
which peaks near the edges at ~3x that). ``picture_frame_nrs2_factor`` multiplies the
picture frame on NRS2, the worse detector. ``reference_ratio`` scales the white noise of the
reference pixels. ``effective_time`` (s) converts the effective frame to a count rate:
``rate [DN/s] = electrons / (gain * effective_time)``.
"""


# ------------------------------------------------------------------------------------------
# Result container
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SimulatedExposure:
    """One synthetic exposure and its truth (all arrays in the DMS frame of the rate file).

    Attributes
    ----------
    rate : ndarray of float32
        What the SCI extension holds (DN/s): ``signal + artifacts + noise_total``, NaN where
        ``dq`` has DO_NOT_USE.
    signal : ndarray of float32
        Noise-free astrophysical scene (DN/s), including faint wings beyond the footprint and
        light from the always-open fixed slits that no cal product covers.
    artifacts : ndarray of float32
        Detector artifacts that are neither scene nor read noise: hot pixels and the excess
        left by cosmic-ray jumps and snowballs (DN/s).
    noise_total : ndarray of float32
        ``noise_white + noise_correlated`` (exactly, in float32).
    noise_correlated : ndarray of float32
        Everything in the noise that is not white: correlated and uncorrelated pink noise,
        alternating column noise and the picture frame.
    noise_white : ndarray of float32
        White read noise plus the photon (shot) noise of ``signal + artifacts``.
    footprint : ndarray of bool
        Science footprint: pixels covered by the cal product (slits, slices).
    illuminated : ndarray of bool
        Pixels receiving more than 1e-4 DN/s of light (2 % of the default white-noise rms);
        a superset of ``footprint`` (slit-edge wings, bright-star halos, light through the
        fixed slits in IFU/MOS exposures).
    dq : ndarray of uint32
        Data-quality flags (``nsclean.algorithm.nirspec`` bit values), every one where
        the pipeline sets it: the written rate leaves out MSA_FAILED_OPEN, which only
        stage 2 (msa_flagging) sets, in the cal product (IFU: its full-frame DQ; MOS:
        the DQ cutout of each slit, so only where a stuck-open shutter's light crosses
        a slit box).
    err : ndarray of float32
        ``sqrt(var_poisson + var_rnoise)``, NaN where DO_NOT_USE.
    var_poisson, var_rnoise : ndarray of float32
        Variance terms ((DN/s)^2).
    wavelength : ndarray of float32
        Wavelength (micron) on the footprint, NaN elsewhere.
    meta : dict
        Exposure description (stem, detector, exp_type, subarray, readpatt, program, ...).
    slits : list of dict
        One entry per slit (MOS, FS, BOTS) or slice (IFU) with ``name``, ``xstart``,
        ``ystart``, ``xsize``, ``ysize`` (1-indexed, rate-array frame, as SLTSTRT1/2 and
        SLTSIZE1/2), ``source_id`` and the bool ``footprint`` of the box.
    """

    rate: np.ndarray
    signal: np.ndarray
    artifacts: np.ndarray
    noise_total: np.ndarray
    noise_correlated: np.ndarray
    noise_white: np.ndarray
    footprint: np.ndarray
    illuminated: np.ndarray
    dq: np.ndarray
    err: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray
    wavelength: np.ndarray
    meta: dict
    slits: list

    @property
    def stem(self) -> str:
        """Exposure stem, e.g. ``jw09999001001_03101_00001_nrs1``."""
        return self.meta["stem"]


# ------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------
def _pink_series(rng, n_series, n_samples, sample_time, low_pass_hz=None, decimate=1,
                 at=None):
    """1/f time series of unit rms over the full band, float32.

    White noise is filtered in the Fourier domain by f^-1/2 (power ~ 1/f) from the lowest
    frequency of the series up to the Nyquist frequency of ``sample_time``; the
    normalisation uses the expected power of the filter, so the amplitude is the same for
    every realisation. ``low_pass_hz`` then applies a smooth 8th-order roll-off (what IRS2
    reference correction leaves).

    A low-passed series needs no fine sampling: with ``decimate`` > 1 the white noise is
    drawn every ``decimate`` samples, with the spectral density the fine series would have,
    and the result is interpolated linearly. Use it only when the low-pass cut is far below
    the coarse Nyquist frequency.

    Returns shape (n_series, n_samples), or (n_series, at.size) sampled at the integer
    sample indices ``at``.
    """
    decimate = int(decimate)
    n_coarse = scipy.fft.next_fast_len(-(-n_samples // decimate) + 2, real=True)
    white = rng.standard_normal((n_series, n_coarse), dtype=np.float32)
    spectrum = scipy.fft.rfft(white, axis=-1)
    freq = scipy.fft.rfftfreq(n_coarse, d=sample_time * decimate)
    gain = np.zeros(freq.size)
    gain[1:] = 1.0 / np.sqrt(freq[1:] / freq[1])
    # variance of irfft(gain * rfft(unit white)) is the two-sided sum of gain^2 over n; the
    # full band is that of the fine series (n_coarse * decimate samples), and a coarse bin
    # must carry the power of a fine one, hence sqrt(n_coarse / fine two-sided sum)
    n_fine = n_coarse * decimate
    harmonic = 1.0 / np.arange(1, n_fine // 2 + 1)
    fine_two_sided = 2.0 * np.sum(harmonic) - (harmonic[-1] if n_fine % 2 == 0 else 0.0)
    gain *= np.sqrt(n_coarse / fine_two_sided)
    if low_pass_hz is not None:
        gain /= np.sqrt(1.0 + (freq / low_pass_hz) ** 8)
    spectrum *= gain.astype(np.float32)
    coarse = scipy.fft.irfft(spectrum, n=n_coarse, axis=-1)
    if at is None:
        at = np.arange(n_samples)
    if decimate == 1:
        return coarse[:, at]
    position = np.asarray(at) / decimate
    left = np.floor(position).astype(np.intp)
    weight = (position - left).astype(np.float32)
    return coarse[:, left] * (1 - weight) + coarse[:, left + 1] * weight


def _output_pixel_ticks(output_width, irs2):
    """Tick of every normal pixel within one line of one output, and ticks per line."""
    pixel = np.arange(output_width)
    if irs2:
        # IRS2 interleaves 4 reference samples after every 16 normal pixels, and starts a
        # line with 8 reference ticks; 712 ticks per line in total.
        return 8 + pixel + 4 * (pixel // 16), IRS2_ROW_TICKS
    return pixel, output_width + ROW_OVERHEAD


def _correlated_noise_detector(rng, n_lines, n_fast, n_outputs, irs2, amp):
    """Pink + ACN noise in the detector frame, shape (n_lines, n_fast), electrons."""
    width = n_fast // n_outputs
    ticks, row_ticks = _output_pixel_ticks(width, irs2)
    # one line of pause per frame
    n_samples = row_ticks * (n_lines + 1)
    # IRS2 plus reference correction removes the 1/f power at frequencies that vary within
    # one line; what is left changes from line to line (DMS column to column) but is smooth
    # along it. Cut at half the line rate.
    low_pass = 0.5 / (row_ticks * PIXEL_TIME) if irs2 else None

    # time of every pixel, in ticks from the start of the frame
    pixel_ticks = (np.arange(n_lines)[:, None] * row_ticks + ticks[None, :]).ravel()
    # the IRS2 residual is band-limited far below 1/(16 ticks): draw it 16x coarser
    sampled = _pink_series(rng, 1 + n_outputs, n_samples, PIXEL_TIME, low_pass,
                           decimate=16 if irs2 else 1, at=pixel_ticks)
    sampled = sampled.reshape(1 + n_outputs, n_lines, width)
    shared = amp["pink_correlated"] * sampled[0]
    uncorrelated = amp["pink_uncorrelated"] * sampled[1:]

    # ACN: even and odd pixels of an output see independent 1/f drifts from line to line
    acn = _pink_series(rng, 2 * n_outputs, n_lines, row_ticks * PIXEL_TIME)
    acn = amp["alternating_column"] * acn.reshape(n_outputs, 2, n_lines)

    detector = np.empty((n_lines, n_fast), dtype=np.float32)
    parity = np.arange(width) % 2
    for output in range(n_outputs):
        block = shared + uncorrelated[output] + acn[output][parity].T
        # outputs alternate their fast-scan direction: the shared series runs backwards
        if output % 2 == 1:
            block = block[:, ::-1]
        detector[:, output * width : (output + 1) * width] = block
    return detector


def _picture_frame_factors(rng, ny, nx, y0, x0, rms):
    """Picture frame of a DMS region as separable factors, electrons.

    Thermal drifts move the whole frame near the edges (Rauscher 2024, section 2): each
    edge gets an exponential fall-off of random depth (60-160 px) modulated by a low-order
    cosine series along the edge, all redrawn for every exposure. The pattern is
    ``row_terms @ col_terms`` with shapes (ny, 4) and (4, nx), so it can be built directly
    in either frame by one matrix product.
    """
    scale = rng.uniform(60.0, 160.0, size=4)
    coeffs = rng.normal(size=(4, 3))
    coeffs[:, 0] += np.sign(rng.normal(size=4))

    def factors(rows, cols):
        # bottom and top edges vary along columns, left and right edges along rows
        row_terms = np.stack([
            np.exp(-rows / scale[0]),
            np.exp(-(FULL_FRAME - 1 - rows) / scale[1]),
            *_smooth_edge(coeffs[2:4], rows),
        ], axis=1)
        col_terms = np.concatenate([
            _smooth_edge(coeffs[0:2], cols),
            np.stack([np.exp(-cols / scale[2]), np.exp(-(FULL_FRAME - 1 - cols) / scale[3])]),
        ])
        return row_terms, col_terms

    # normalise on the full frame, so a subarray keeps the full-frame amplitude
    # (exactly, through the 4 x 4 Gram matrices of the factors)
    full = np.arange(FULL_FRAME, dtype=np.float64)
    full_rows, full_cols = factors(full, full)
    full_rms = np.sqrt(np.sum((full_rows.T @ full_rows) * (full_cols @ full_cols.T))
                       / FULL_FRAME**2)
    row_terms, col_terms = factors(np.arange(y0, y0 + ny, dtype=np.float64),
                                   np.arange(x0, x0 + nx, dtype=np.float64))
    return (row_terms * (rms / full_rms)).astype(np.float32), col_terms.astype(np.float32)


def _smooth_edge(coeffs, position):
    """Low-order cosine series along an edge; coeffs shape (n_edges, 3)."""
    phase = np.pi * position / (FULL_FRAME - 1)
    basis = np.stack([np.ones_like(phase), np.cos(phase), np.cos(2 * phase)])
    return coeffs @ basis


# ------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Trace:
    """A rectangular-ish spectral trace in full-frame DMS coordinates (0-indexed)."""

    name: str
    x0: int
    nx: int
    lower_edge: np.ndarray  # float row of the lower slit edge per column (length nx)
    height: float
    sky: np.ndarray  # DN/s per pixel, along x
    source: np.ndarray  # DN/s at the trace peak, along x
    source_offset: float  # rows from the lower edge
    source_sigma: float
    in_footprint: bool = True
    dq_flag: int = 0  # DQ bits set on the pixels this trace lights (failed-open shutters)
    source_id: int = 0
    # blur of the slit edges (detector PSF): logistic scale in pixels. 0.45 matches a
    # Gaussian of sigma 0.8 px in the core, with exponential wings: 3 % of the slit level
    # 1.5 px beyond the edge, 0.3 % at 2.5 px
    edge_width: float = 0.45


def _continuum(rng, n, level, throughput=True):
    """Smooth positive continuum with a grating-like throughput roll-off at both ends."""
    u = np.linspace(0.0, 1.0, n)
    slope = rng.uniform(-1.0, 1.0)
    wiggle = rng.uniform(-0.15, 0.15, size=3)
    shape = 1.0 + 0.5 * slope * (u - 0.5)
    shape += sum(w * np.sin((k + 1) * np.pi * u + rng.uniform(0, np.pi))
                 for k, w in enumerate(wiggle))
    if throughput:
        shape *= np.clip(np.sin(np.pi * (0.03 + 0.94 * u)), 0.0, None) ** 0.5
    return level * np.clip(shape, 0.05, None)


def _emission_lines(rng, n, n_lines, peak, sigma=1.2, positions=None):
    x = np.arange(n)
    lines = np.zeros(n)
    if positions is None:
        positions = rng.uniform(0.05 * n, 0.95 * n, size=n_lines)
    for pos in positions:
        lines += rng.uniform(0.2, 1.0) * peak * np.exp(-0.5 * ((x - pos) / sigma) ** 2)
    return lines


def _ifu_traces(rng, detector):
    traces = []
    # 30 slices of ~53 rows with ~10-row gaps, every ~63 rows from row ~70 to ~1960
    # (crossing the fixed-slit band, as on the real detectors): after the usual 2-px
    # dilation and the fixed-slit band ~310 background pixels per column remain, as in real
    # IFU masks (field notes, section 1)
    line_positions = rng.uniform(150, 1850, size=4)
    starts = []
    row = 70 + rng.uniform(-8, 8)
    for _ in range(30):
        starts.append(row)
        row += rng.uniform(61.5, 64.5)
    centre_slice = rng.uniform(10, 20)
    for index, start in enumerate(starts):
        x0 = int(rng.integers(20, 260))
        x1 = int(rng.integers(1790, FULL_FRAME - REFERENCE_BORDER))
        nx = x1 - x0
        columns = np.arange(x0, x1)
        curvature = rng.uniform(-3.0, 3.0)
        lower = start + curvature * ((columns - 1024.0) / 1024.0) ** 2
        height = rng.uniform(52.0, 54.0)
        galaxy = np.exp(-0.5 * ((index - centre_slice) / 5.0) ** 2)
        offset = rng.normal(0.0, 1.5)  # slices have slightly different wavelength zero points
        sky = _continuum(rng, nx, 0.02)
        lines = _emission_lines(rng, nx, 4, 1.5, positions=line_positions - x0 + offset)
        source = galaxy * (_continuum(rng, nx, 0.12) + lines)
        traces.append(_Trace(
            name=f"SLICE{index + 1:02d}", x0=x0, nx=nx, lower_edge=lower, height=height,
            sky=sky, source=source, source_offset=height * rng.uniform(0.35, 0.65),
            source_sigma=rng.uniform(8.0, 14.0), source_id=index + 1,
        ))
    traces.extend(_fixed_slit_sky(rng))
    traces.extend(_failed_open_shutters(rng, np.zeros((FULL_FRAME, FULL_FRAME), dtype=bool)))
    return traces


def _failed_open_shutters(rng, occupied):
    """Sky through a few MSA shutters stuck open: light no cal product covers.

    jwst's msaflagopen step flags their traces MSA_FAILED_OPEN in IFU and MOS exposures,
    and NSClean must not take them as background. ``occupied`` (full-frame bool) keeps
    them off other boxes; it is updated.
    """
    traces = []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(200):
            nx = int(rng.integers(800, 1800))
            x0 = int(rng.integers(REFERENCE_BORDER, FULL_FRAME - REFERENCE_BORDER - nx))
            y0 = float(rng.uniform(REFERENCE_BORDER + 8, FULL_FRAME - REFERENCE_BORDER - 14))
            rows = slice(int(y0) - 4, int(y0) + 10)
            if not occupied[rows, x0 - 3 : x0 + nx + 3].any():
                occupied[rows, x0 - 3 : x0 + nx + 3] = True
                traces.append(_Trace(
                    name="FAILED_OPEN", x0=x0, nx=nx, lower_edge=np.full(nx, y0), height=5.0,
                    sky=_continuum(rng, nx, rng.uniform(0.01, 0.04)), source=np.zeros(nx),
                    source_offset=2.5, source_sigma=1.0, in_footprint=False,
                    dq_flag=dqflags.MSA_FAILED_OPEN,
                ))
                break
    return traces


def _fixed_slit_sky(rng):
    """Faint sky through the always-open fixed slits: light that no IFU/MOS cal covers."""
    traces = []
    for name, (row, height) in _FIXED_SLITS.items():
        x0 = int(rng.integers(100, 400))
        nx = int(rng.integers(1400, 1640))
        traces.append(_Trace(
            name=name, x0=x0, nx=nx, lower_edge=np.full(nx, row + rng.uniform(-0.5, 0.5)),
            height=height, sky=_continuum(rng, nx, 0.01), source=np.zeros(nx),
            source_offset=height / 2, source_sigma=1.0, in_footprint=False,
        ))
    return traces


def _mos_traces(rng, detector):
    traces = []
    occupied = np.zeros((FULL_FRAME, FULL_FRAME), dtype=bool)
    occupied[FIXED_SLIT_ROWS[0] - 4 : FIXED_SLIT_ROWS[1] + 5] = True
    n_target = int(rng.integers(30, 61))
    attempts = 0
    slit_id = int(rng.integers(2, 40))
    while len(traces) < n_target and attempts < 2000:
        attempts += 1
        height = float(rng.integers(6, 22))  # 1-3 shutters plus the tilt below: 6-25 rows
        nx = int(rng.integers(200, 1501))
        tilt = rng.uniform(-3.0, 3.0)  # rows of drift along the spectrum
        x0 = int(rng.integers(REFERENCE_BORDER, FULL_FRAME - REFERENCE_BORDER - nx))
        y_low = rng.uniform(REFERENCE_BORDER + 4, FULL_FRAME - REFERENCE_BORDER - 30)
        lower = y_low + tilt * np.linspace(0.0, 1.0, nx)
        box_lo = int(np.floor(lower.min())) - 3
        box_hi = int(np.ceil(lower.max() + height)) + 3
        if box_lo < REFERENCE_BORDER or box_hi >= FULL_FRAME - REFERENCE_BORDER:
            continue
        if occupied[box_lo:box_hi, x0 - 3 : x0 + nx + 3].any():
            continue
        occupied[box_lo:box_hi, x0 - 3 : x0 + nx + 3] = True
        has_source = rng.random() < 0.85
        source = np.zeros(nx)
        if has_source:
            source = _continuum(rng, nx, 10 ** rng.uniform(-2.3, -0.7))
            if rng.random() < 0.5:
                source += _emission_lines(rng, nx, int(rng.integers(1, 4)),
                                          10 ** rng.uniform(-1.5, -0.3), sigma=1.0)
        traces.append(_Trace(
            name=str(slit_id), x0=x0, nx=nx, lower_edge=lower, height=height,
            sky=_continuum(rng, nx, 0.01), source=source,
            source_offset=height * rng.uniform(0.3, 0.7), source_sigma=rng.uniform(0.9, 1.8),
            source_id=int(rng.integers(100, 40000)) if has_source else 0,
        ))
        slit_id += int(rng.integers(1, 8))
    traces.extend(_fixed_slit_sky(rng))
    traces.extend(_failed_open_shutters(rng, occupied))
    return traces


def _fs_traces(rng, detector, primary="S200A1"):
    traces = []
    for index, (name, (row, height)) in enumerate(_FIXED_SLITS.items()):
        x0 = int(rng.integers(REFERENCE_BORDER, 200))
        nx = int(rng.integers(1700, FULL_FRAME - REFERENCE_BORDER - x0))
        is_primary = name == primary
        source = np.zeros(nx)
        if is_primary:
            source = _continuum(rng, nx, 0.5) + _emission_lines(rng, nx, 3, 2.0, sigma=1.1)
        traces.append(_Trace(
            name=name, x0=x0, nx=nx,
            lower_edge=row + 0.5 + rng.uniform(-1.0, 1.0) * np.linspace(0.0, 1.0, nx),
            height=height - 1.0, sky=_continuum(rng, nx, 0.02), source=source,
            source_offset=(height - 1.0) / 2, source_sigma=1.1, source_id=index + 1,
        ))
    return traces


def _bots_traces(rng, detector):
    row, height = _FIXED_SLITS["S1600A1"]
    x0 = REFERENCE_BORDER
    nx = FULL_FRAME - 2 * REFERENCE_BORDER
    star = _continuum(rng, nx, 150.0)
    # a bright star: the 1.6" aperture is wide, so the PSF wings (here a flat 1 % halo
    # across the aperture) fill the slit
    return [_Trace(
        name="S1600A1", x0=x0, nx=nx, lower_edge=np.full(nx, row - 2.0), height=height + 4.0,
        sky=0.005 + 0.01 * star, source=star,
        source_offset=(height + 4.0) / 2 + rng.uniform(-0.5, 0.5), source_sigma=1.0,
        source_id=1,
    )]


_SCENES = {"ifu": _ifu_traces, "mos": _mos_traces, "fs": _fs_traces, "bots": _bots_traces,
           "dark": lambda rng, detector: []}


def _render(traces, region):
    """Signal, footprint, illumination, DQ flags and per-trace boxes inside a DMS region."""
    x_start, y_start, nx_region, ny_region = region
    flags = np.zeros((ny_region, nx_region), dtype=np.uint32)
    signal = np.zeros((ny_region, nx_region), dtype=np.float32)
    footprint = np.zeros((ny_region, nx_region), dtype=bool)
    illuminated = np.zeros((ny_region, nx_region), dtype=bool)
    boxes = []
    for trace in traces:
        c_lo = max(trace.x0, x_start)
        c_hi = min(trace.x0 + trace.nx, x_start + nx_region)
        if c_hi <= c_lo:
            continue
        in_trace = slice(c_lo - trace.x0, c_hi - trace.x0)
        lower = trace.lower_edge[in_trace].astype(np.float32)
        # pixel centres at integer rows; slit edges half a pixel outside the centres
        edge_a = lower - 0.5
        edge_b = lower + trace.height - 0.5
        margin = int(np.ceil(8 * trace.edge_width)) + 3
        r_lo = max(int(np.floor(edge_a.min())) - margin, y_start)
        r_hi = min(int(np.ceil(edge_b.max())) + margin, y_start + ny_region)
        if r_hi <= r_lo:
            continue
        rows = np.arange(r_lo, r_hi, dtype=np.float32)[:, None]
        # difference of two logistic edges, written with tanh (5x cheaper than erf)
        inverse_width = np.float32(0.5 / trace.edge_width)
        slit = 0.5 * (np.tanh((rows - edge_a) * inverse_width)
                      - np.tanh((rows - edge_b) * inverse_width))
        centre = lower + trace.source_offset
        profile = np.exp(np.float32(-0.5 / trace.source_sigma**2) * (rows - centre) ** 2)
        profile *= slit
        values = slit * trace.sky[in_trace].astype(np.float32)
        values += profile * trace.source[in_trace].astype(np.float32)
        ys = slice(r_lo - y_start, r_hi - y_start)
        xs = slice(c_lo - x_start, c_hi - x_start)
        signal[ys, xs] += values
        illuminated[ys, xs] |= values > _ILLUMINATION_THRESHOLD
        if trace.dq_flag:
            # flagged where the slit profile is above 1 %: ~1.5 px beyond the edges
            flags[ys, xs] |= np.where(slit > 0.01, np.uint32(trace.dq_flag), np.uint32(0))
        if not trace.in_footprint:
            continue
        inside = (rows >= edge_a) & (rows < edge_b)
        footprint[ys, xs] |= inside
        hit_rows = np.flatnonzero(inside.any(axis=1))
        hit_cols = np.flatnonzero(inside.any(axis=0))
        if hit_rows.size == 0:
            continue
        # the slit box is the bounding box of its on-trace pixels (a trace cut by the
        # subarray edge keeps only the part inside)
        box_rows = slice(hit_rows[0], hit_rows[-1] + 1)
        box_cols = slice(hit_cols[0], hit_cols[-1] + 1)
        boxes.append({
            "name": trace.name,
            "xstart": int(c_lo - x_start + hit_cols[0] + 1),
            "ystart": int(r_lo - y_start + hit_rows[0] + 1),
            "xsize": int(box_cols.stop - box_cols.start),
            "ysize": int(box_rows.stop - box_rows.start),
            "source_id": trace.source_id,
            "footprint": inside[box_rows, box_cols].copy(),
        })
    return signal, footprint, illuminated, flags, boxes


# ------------------------------------------------------------------------------------------
# Artifacts: hot pixels, jumps, snowballs, dead pixels
# ------------------------------------------------------------------------------------------
def _artifacts(rng, shape, dq):
    ny, nx = shape
    area = ny * nx / FULL_FRAME**2
    artifacts = np.zeros(shape, dtype=np.float32)

    n_hot = rng.poisson(300 * area)
    hot_y, hot_x = rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot)
    hot_rate = 10 ** rng.uniform(-0.5, 1.5, n_hot)
    artifacts[hot_y, hot_x] += hot_rate.astype(np.float32)
    dq[hot_y, hot_x] |= dqflags.HOT
    # the hottest ones are unusable (the bad-pixel mask flags them DO_NOT_USE)
    bad = hot_rate > 10.0
    dq[hot_y[bad], hot_x[bad]] |= dqflags.DO_NOT_USE

    n_dead = rng.poisson(100 * area)
    dq[rng.integers(0, ny, n_dead), rng.integers(0, nx, n_dead)] |= dqflags.DO_NOT_USE

    # isolated cosmic-ray jumps: the ramp fit leaves a small excess on flagged pixels
    n_jump = rng.poisson(2000 * area)
    jump_y, jump_x = rng.integers(0, ny, n_jump), rng.integers(0, nx, n_jump)
    artifacts[jump_y, jump_x] += rng.exponential(0.004, n_jump).astype(np.float32)
    dq[jump_y, jump_x] |= dqflags.JUMP_DET

    # snowballs: round, flagged out to a halo, with a positive residual in the halo
    n_snow = rng.poisson(6 * area) if area < 1 else int(rng.integers(3, 9))
    for _ in range(n_snow):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        radius = rng.uniform(3.0, 10.0)
        y_lo, y_hi = max(int(cy - 2 * radius), 0), min(int(cy + 2 * radius) + 1, ny)
        x_lo, x_hi = max(int(cx - 2 * radius), 0), min(int(cx + 2 * radius) + 1, nx)
        yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        r = np.hypot(yy - cy, xx - cx)
        flagged = r <= 1.5 * radius
        residual = 0.03 * np.exp(-0.5 * (r / radius) ** 2) * flagged
        artifacts[y_lo:y_hi, x_lo:x_hi] += residual.astype(np.float32)
        dq[y_lo:y_hi, x_lo:x_hi][flagged] |= dqflags.JUMP_DET
    return artifacts


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def _resolve_readout(readout, full_frame):
    name = str(readout).strip().upper()
    if name in ("IRS2", "NRSIRS2", "NRSIRS2RAPID"):
        irs2 = True
    elif name in ("NRS", "NRSRAPID", "TRADITIONAL"):
        irs2 = False
    else:
        raise ValueError(
            f"readout must be 'IRS2' (or NRSIRS2, NRSIRS2RAPID) or 'NRS' (or NRSRAPID); "
            f"got {readout!r}"
        )
    if not full_frame:
        # IRS2 exists for full frames only; subarrays are read the traditional way
        return False, "NRSRAPID"
    if irs2:
        return True, "NRSIRS2RAPID" if name == "NRSIRS2RAPID" else "NRSIRS2"
    return False, "NRSRAPID" if name == "NRSRAPID" else "NRS"


def make_stem(program, observation, visit, exposure, detector, visit_group=3, sequence=1,
              activity=1):
    """Build a JWST exposure stem, e.g. ``jw09999001001_03101_00001_nrs1``.

    Parameters
    ----------
    program : str or int
        Program (proposal) number, 1-5 digits.
    observation, visit, exposure : int
        Observation, visit and exposure numbers.
    detector : str
        "NRS1" or "NRS2".
    visit_group, sequence, activity : int, optional
        Visit group (2 digits), parallel sequence (1 digit), activity (2 digits).

    Returns
    -------
    str
        ``jw<program5><obs3><visit3>_<group2><seq1><act2>_<exp5>_<det>``.
    """
    return (f"jw{int(program):05d}{int(observation):03d}{int(visit):03d}_"
            f"{int(visit_group):02d}{int(sequence):01d}{int(activity):02d}_"
            f"{int(exposure):05d}_{str(detector).lower()}")


def simulate_exposure(kind, detector="NRS1", *, readout="IRS2", seed=0, subarray=None,
                      program="09999", observation=1, visit=1, exposure=1, **amplitudes):
    """Simulate one NIRSpec count-rate exposure with known noise and scene.

    Parameters
    ----------
    kind : {"ifu", "mos", "fs", "bots", "dark"}
        Scene: 30 IFU slices; 30-60 MOS slitlets; the 5 fixed slits (source in S200A1);
        one bright star in S1600A1 (BOTS, subarray SUB2048 by default); or no light at all.
        IFU and MOS exposures also get faint sky through the always-open fixed slits, outside
        the footprint, as real ones do.
    detector : {"NRS1", "NRS2"}
        Detector; sets the readout orientation (and so the direction of the 1/f stripes'
        time axis), the gain, and the picture-frame strength.
    readout : str, optional
        "IRS2" (NRSIRS2, NRSIRS2RAPID) or "NRS" (NRS, NRSRAPID) for traditional readout.
        Subarrays can only be read traditionally and always get READPATT NRSRAPID.
    seed : int, optional
        Seed of the numpy Generator. The same seed and options give bit-identical arrays;
        kind and detector are mixed into the seed so NRS1 and NRS2 differ.
    subarray : str, optional
        One of :data:`SUBARRAYS`. Default FULL, SUB2048 for "bots". IFU and MOS are
        full-frame modes.
    program : str or int, optional
        Program number (written as a 5-digit string).
    observation, visit, exposure : int, optional
        Identifiers used in the header and the stem.
    **amplitudes
        Noise options, see :data:`DEFAULT_AMPLITUDES` (e.g. ``white=0`` removes the white
        read noise, photon noise stays; ``pink_correlated=6.0`` doubles the shared 1/f).
        Every component is drawn from its own stream, so changing one amplitude leaves the
        scene and the other components' realisations unchanged.

    Returns
    -------
    SimulatedExposure

    Notes
    -----
    A real rate image is a slope fitted to many frames; here its noise is modelled as one
    *effective frame* of the Rauscher (2015) components, in electrons, divided by
    ``gain * effective_time`` to give DN/s. This keeps the spatial structure that matters to
    the cleaner (stripes along DMS columns, picture frame, reference border) and the ratios
    of the components, but not the exact slope-fit weighting of frequencies. With IRS2 the
    1/f power that changes within one fast-scan line is suppressed (cut at half the line
    rate), as the interleaved reference pixels remove it; traditional readout keeps the
    whole 1/f spectrum. Photon noise of the scene is Gaussian and counted in ``noise_white``.

    Examples
    --------
    >>> sim = simulate_exposure("mos", "NRS2", seed=3)
    >>> sim.rate.shape, sim.meta["stem"]
    ((2048, 2048), 'jw09999001001_03101_00001_nrs2')
    """
    kind, detector, subarray, amp = _checked_arguments(kind, detector, subarray, amplitudes)
    sub_x, sub_y, sub_nx, sub_ny = SUBARRAYS[subarray]
    region = (sub_x - 1, sub_y - 1, sub_nx, sub_ny)
    full_frame = subarray == "FULL"
    irs2, readpatt = _resolve_readout(readout, full_frame)
    gain = GAIN[detector]
    to_rate = 1.0 / (gain * amp["effective_time"])

    # independent streams, so that changing a noise amplitude keeps the scene and every
    # other component's realisation
    streams = np.random.SeedSequence([int(seed), KINDS.index(kind), int(detector[-1])])
    scene_rng, noise_rng, white_rng, artifact_rng, frame_rng = (
        np.random.default_rng(s) for s in streams.spawn(5)
    )

    traces = _SCENES[kind](scene_rng, detector)
    signal, footprint, illuminated, scene_flags, boxes = _render(traces, region)

    n_outputs = N_CHANNELS if full_frame else 1
    noise_correlated = _correlated_noise(noise_rng, frame_rng, detector, region, n_outputs,
                                         irs2, amp, to_rate)

    # reference pixels: the 4-pixel full-frame border that falls inside the region
    rows = np.arange(region[1], region[1] + sub_ny)
    cols = np.arange(region[0], region[0] + sub_nx)
    ref_rows = np.flatnonzero((rows < REFERENCE_BORDER) | (rows >= FULL_FRAME - REFERENCE_BORDER))
    ref_cols = np.flatnonzero((cols < REFERENCE_BORDER) | (cols >= FULL_FRAME - REFERENCE_BORDER))

    def on_reference(array, value):
        array[ref_rows, :] = value
        array[:, ref_cols] = value

    on_reference(signal, 0.0)
    on_reference(footprint, False)
    on_reference(illuminated, False)

    dq = np.zeros((sub_ny, sub_nx), dtype=np.uint32)
    dq |= scene_flags
    artifacts = _artifacts(artifact_rng, (sub_ny, sub_nx), dq)
    on_reference(artifacts, 0.0)
    on_reference(dq, dqflags.REFERENCE_PIXEL | dqflags.DO_NOT_USE)

    noise_white, var_poisson, var_rnoise = _white_noise(white_rng, signal + artifacts, amp,
                                                        to_rate, on_reference)
    noise_total = noise_white + noise_correlated

    do_not_use = (dq & dqflags.DO_NOT_USE) != 0
    rate = signal + artifacts + noise_total
    rate[do_not_use] = np.nan
    err = np.sqrt(var_poisson + var_rnoise)
    err[do_not_use] = np.nan

    wavelength = _wavelength(kind, detector, footprint, cols)
    meta = _meta(kind, detector, subarray, readpatt, irs2, n_outputs, amp,
                 dict(program=program, observation=observation, visit=visit,
                      exposure=exposure, seed=seed))
    return SimulatedExposure(
        rate=rate, signal=signal, artifacts=artifacts, noise_total=noise_total,
        noise_correlated=noise_correlated, noise_white=noise_white, footprint=footprint,
        illuminated=illuminated | footprint, dq=dq, err=err,
        var_poisson=var_poisson, var_rnoise=var_rnoise, wavelength=wavelength,
        meta=meta, slits=boxes,
    )


def _meta(kind, detector, subarray, readpatt, irs2, n_outputs, amp, ids):
    """The header values of a simulated exposure (``SimulatedExposure.meta``)."""
    program, observation, visit, exposure, seed = (ids[k] for k in (
        "program", "observation", "visit", "exposure", "seed"))
    sub_x, sub_y, sub_nx, sub_ny = SUBARRAYS[subarray]
    full_frame = subarray == "FULL"
    gain = GAIN[detector]
    grating, filt, _, template = _OPTICS[kind]
    tframe = (IRS2_ROW_TICKS if irs2 else sub_ny // n_outputs + ROW_OVERHEAD) \
        * (sub_nx + 1) * PIXEL_TIME
    return {
        "stem": make_stem(program, observation, visit, exposure, detector),
        "kind": kind,
        "detector": detector,
        "exp_type": _EXP_TYPE[kind],
        "subarray": subarray,
        "substrt1": sub_x,
        "substrt2": sub_y,
        "subsize1": sub_nx,
        "subsize2": sub_ny,
        "fastaxis": 2 if detector == "NRS1" else -2,
        "slowaxis": 1 if detector == "NRS1" else -1,
        "readpatt": readpatt,
        "noutputs": N_CHANNELS + 1 if full_frame else 1,
        "tframe": round(tframe, 5),
        "effexptm": amp["effective_time"],
        "gain": gain,
        "program": f"{int(program):05d}",
        "observation": int(observation),
        "visit": int(visit),
        "exposure": int(exposure),
        "grating": grating,
        "filter": filt,
        "fxd_slit": {"fs": "S200A1", "bots": "S1600A1"}.get(kind, "NONE"),
        "template": template,
        "cal_model": _CAL_MODEL.get(kind),
        "seed": int(seed),
        "noise_options": amp,
    }


def _white_noise(white_rng, light, amp, to_rate, on_reference):
    """White read noise (weaker on reference pixels) plus the photon noise of ``light``,
    in DN/s, and the two variances."""
    read_sigma = np.full(light.shape, amp["white"] * to_rate, dtype=np.float32)
    on_reference(read_sigma, np.float32(amp["white"] * to_rate * amp["reference_ratio"]))
    var_rnoise = read_sigma**2
    # photon noise: electrons = rate * gain * t, so var(rate in DN/s) = rate / (gain * t)
    var_poisson = light
    np.clip(var_poisson, 0.0, None, out=var_poisson)
    var_poisson *= np.float32(to_rate)
    noise_white = white_rng.standard_normal(light.shape, dtype=np.float32)
    noise_white *= read_sigma
    lit = var_poisson > 0
    noise_white[lit] += np.sqrt(var_poisson[lit]) * white_rng.standard_normal(
        np.count_nonzero(lit), dtype=np.float32)
    return noise_white, var_poisson, var_rnoise


def _checked_arguments(kind, detector, subarray, amplitudes):
    """The arguments of :func:`simulate_exposure`, normalised, or a ValueError."""
    kind = str(kind).strip().lower()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    detector = str(detector).strip().upper()
    if detector not in GAIN:
        raise ValueError(f"detector must be 'NRS1' or 'NRS2'; got {detector!r}")
    if subarray is None:
        subarray = "SUB2048" if kind == "bots" else "FULL"
    subarray = str(subarray).strip().upper()
    if subarray not in SUBARRAYS:
        raise ValueError(f"subarray must be one of {', '.join(SUBARRAYS)}; got {subarray!r}")
    if kind in ("ifu", "mos") and subarray != "FULL":
        raise ValueError(f"{kind!r} exposures are full frame; got subarray {subarray!r}")
    unknown = set(amplitudes) - set(DEFAULT_AMPLITUDES)
    if unknown:
        raise ValueError(
            f"unknown noise option(s) {sorted(unknown)}; expected some of "
            f"{sorted(DEFAULT_AMPLITUDES)}"
        )
    amp = {**DEFAULT_AMPLITUDES, **{k: float(v) for k, v in amplitudes.items()}}
    if amp["effective_time"] <= 0:
        raise ValueError(f"effective_time must be > 0 s; got {amp['effective_time']}")
    return kind, detector, subarray, amp


def _correlated_noise(noise_rng, frame_rng, detector, region, n_outputs, irs2, amp,
                      to_rate):
    """1/f, alternating-column and picture-frame noise of one effective frame, in DN/s,
    assembled in the detector frame and returned in the DMS frame."""
    sub_nx, sub_ny = region[2], region[3]
    detector_noise = _correlated_noise_detector(
        noise_rng, n_lines=sub_nx, n_fast=sub_ny, n_outputs=n_outputs, irs2=irs2, amp=amp)
    frame_rms = amp["picture_frame"] * (amp["picture_frame_nrs2_factor"]
                                        if detector == "NRS2" else 1.0)
    row_terms, col_terms = _picture_frame_factors(frame_rng, sub_ny, sub_nx, region[1],
                                                  region[0], frame_rms)
    # (row_terms @ col_terms).T seen from the detector: lines = DMS columns
    lines_factor, pixels_factor = col_terms.T, row_terms.T
    if detector == "NRS2":
        lines_factor, pixels_factor = lines_factor[::-1], pixels_factor[:, ::-1]
    detector_noise += lines_factor @ pixels_factor
    detector_noise *= np.float32(to_rate)
    return np.ascontiguousarray(detector_to_dms(detector_noise, detector))


def _wavelength(kind, detector, footprint, cols):
    """WAVELENGTH of the footprint's pixels (NaN elsewhere): a nearly linear dispersion
    across the full detector width."""
    _, _, (lam0, lam1), _ = _OPTICS[kind]
    if not footprint.any():
        return np.full(footprint.shape, np.nan, dtype=np.float32)
    u = cols / (FULL_FRAME - 1)
    lam = lam0 + (lam1 - lam0) * (u + 0.05 * u * (1 - u))
    if detector == "NRS2":
        lam = lam + (lam1 - lam0) * 0.02
    return np.where(footprint, lam.astype(np.float32)[None, :], np.float32(np.nan))


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------
def _primary_header(meta, filename, datamodel):
    header = fits.Header()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    cards = [
        ("DATE", now, "UTC date file created"),
        ("ORIGIN", "NSCLEAN", "synthetic exposure (nsclean.testing.simulate)"),
        # (segment names are long: a shorter comment keeps the card in 80 characters)
        ("FILENAME", filename, "Name of the file" if len(filename) < 48 else "file name"),
        ("DATAMODL", datamodel, "Type of data model"),
        ("TELESCOP", "JWST", "Telescope used to acquire the data"),
        ("CAL_VER", "1.14.0", "Calibration Software Version (emulated)"),
        ("PROGRAM", meta["program"], "Program number"),
        ("OBSERVTN", f"{meta['observation']:03d}", "Observation number"),
        ("VISIT", f"{meta['visit']:03d}", "Visit number"),
        ("VISITGRP", "03", "Visit group identifier"),
        ("SEQ_ID", "1", "Parallel sequence identifier"),
        ("ACT_ID", "01", "Activity identifier"),
        ("EXPOSURE", str(meta["exposure"]), "Exposure request number"),
        ("OBS_ID", f"V{meta['program']}{meta['observation']:03d}{meta['visit']:03d}"
                   f"P0000000003101", "Programmatic observation identifier"),
        ("VISIT_ID", f"{meta['program']}{meta['observation']:03d}{meta['visit']:03d}",
         "Visit identifier"),
        ("TEMPLATE", meta["template"], "Observation template used"),
        ("INSTRUME", "NIRSPEC", "Instrument used to acquire the data"),
        ("DETECTOR", meta["detector"], "Name of detector used to acquire the data"),
        ("FILTER", meta["filter"], "Name of the filter element used"),
        ("GRATING", meta["grating"], "Name of the grating element used"),
        ("FXD_SLIT", meta["fxd_slit"], "Name of fixed slit aperture used"),
        ("EXP_TYPE", meta["exp_type"], "Type of data in the exposure"),
        ("READPATT", meta["readpatt"], "Readout pattern"),
        ("NOUTPUTS", meta["noutputs"], "Number of detector outputs used"),
        ("NINTS", 1, "Number of integrations in exposure"),
        ("NGROUPS", 20, "Number of groups in integration"),
        ("NFRAMES", 1, "Number of frames per group"),
        ("TSAMPLE", 10.0, "[us] Time between samples"),
        ("TFRAME", meta["tframe"], "[s] Time between frames"),
        ("EFFEXPTM", meta["effexptm"], "[s] Effective exposure time"),
        ("SUBARRAY", meta["subarray"], "Subarray used"),
        ("SUBSTRT1", meta["substrt1"], "Starting pixel in axis 1 direction"),
        ("SUBSTRT2", meta["substrt2"], "Starting pixel in axis 2 direction"),
        ("SUBSIZE1", meta["subsize1"], "Number of pixels in axis 1 direction"),
        ("SUBSIZE2", meta["subsize2"], "Number of pixels in axis 2 direction"),
        ("FASTAXIS", meta["fastaxis"], "Fast readout axis direction"),
        ("SLOWAXIS", meta["slowaxis"], "Slow readout axis direction"),
        ("NSCSIMUL", True, "synthetic data (nsclean.testing.simulate)"),
        ("NSCSEED", meta["seed"], "nsclean.testing.simulate seed"),
        ("NSCVERS", __version__, "nsclean version that wrote the file"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    return header


def _image(data, name, ver=None, bunit=None, extra=None):
    hdu = fits.ImageHDU(data, name=name, ver=ver)
    if bunit is not None:
        hdu.header["BUNIT"] = (bunit, "physical units of the array values")
    for key, value in (extra or {}).items():
        hdu.header[key] = value
    return hdu


# Flags set by stage 2 (msa_flagging), so present in cal products only, never in a rate.
_STAGE2_FLAGS = np.uint32(dqflags.MSA_FAILED_OPEN)


def _rate_hdus(sim, filename):
    primary = fits.PrimaryHDU(header=_primary_header(sim.meta, filename, "ImageModel"))
    return fits.HDUList([
        primary,
        _image(sim.rate, "SCI", bunit="DN/s"),
        _image(sim.err, "ERR", bunit="DN/s"),
        _image(sim.dq & ~_STAGE2_FLAGS, "DQ"),
        _image(sim.var_poisson, "VAR_POISSON", bunit="(DN/s)^2"),
        _image(sim.var_rnoise, "VAR_RNOISE", bunit="(DN/s)^2"),
    ])


def _cal_hdus(sim, filename, n_integrations=None, rates=None):
    """Cal product HDUs; with ``n_integrations`` a calints (3-D SCI/ERR/DQ per slit)."""
    kind = sim.meta["kind"]
    datamodel = sim.meta["cal_model"]
    primary = fits.PrimaryHDU(header=_primary_header(sim.meta, filename, datamodel))
    if n_integrations is not None:
        primary.header["NINTS"] = n_integrations
    primary.header["S_NSCSIM"] = ("COMPLETE", "nsclean synthetic calibration")
    hdus = [primary]
    usable = sim.footprint & ((sim.dq & dqflags.DO_NOT_USE) == 0)
    if kind == "ifu":
        # values stay in DN/s: only the footprint (finite pixels) matters to the cleaner
        sci = np.where(usable, sim.rate, np.nan).astype(np.float32)
        err = np.where(usable, sim.err, np.nan).astype(np.float32)
        dq = sim.dq | np.where(sim.footprint, 0, dqflags.DO_NOT_USE | dqflags.NON_SCIENCE)
        hdus += [
            _image(sci, "SCI", bunit="DN/s"),
            _image(err, "ERR", bunit="DN/s"),
            _image(dq.astype(np.uint32), "DQ"),
            _image(np.where(usable, sim.var_poisson, np.nan).astype(np.float32),
                   "VAR_POISSON", bunit="(DN/s)^2"),
            _image(np.where(usable, sim.var_rnoise, np.nan).astype(np.float32),
                   "VAR_RNOISE", bunit="(DN/s)^2"),
        ]
        return fits.HDUList(hdus)

    for number, slit in enumerate(sim.slits, start=1):
        ys = slice(slit["ystart"] - 1, slit["ystart"] - 1 + slit["ysize"])
        xs = slice(slit["xstart"] - 1, slit["xstart"] - 1 + slit["xsize"])
        on_trace = slit["footprint"] & ((sim.dq[ys, xs] & dqflags.DO_NOT_USE) == 0)
        keys = {
            "SLTNAME": (slit["name"], "Name of the slit"),
            "SLTSTRT1": (slit["xstart"], "Starting pixel in x direction"),
            "SLTSIZE1": (slit["xsize"], "Number of pixels in x direction"),
            "SLTSTRT2": (slit["ystart"], "Starting pixel in y direction"),
            "SLTSIZE2": (slit["ysize"], "Number of pixels in y direction"),
            "SOURCEID": (slit["source_id"], "Source ID"),
        }
        if kind == "mos":
            keys["SLITID"] = (int(slit["name"]), "Slitlet ID")
        ver = None if datamodel == "SlitModel" else number

        def cut(array, on_trace=on_trace, ys=ys, xs=xs):
            if array.ndim == 3:
                return np.where(on_trace, array[:, ys, xs], np.nan).astype(np.float32)
            plane = np.where(on_trace, array[ys, xs], np.nan).astype(np.float32)
            if n_integrations is None:
                return plane
            return np.broadcast_to(plane, (n_integrations, *plane.shape))

        dq = sim.dq[ys, xs] | np.where(slit["footprint"], 0,
                                       dqflags.DO_NOT_USE | dqflags.NON_SCIENCE)
        if n_integrations is not None:
            dq = np.broadcast_to(dq, (n_integrations, *dq.shape))
        hdus += [
            _image(cut(sim.rate if rates is None else rates), "SCI", ver, "DN/s", keys),
            _image(cut(sim.err), "ERR", ver, "DN/s"),
            _image(dq.astype(np.uint32), "DQ", ver),
            _image(np.where(slit["footprint"], sim.wavelength[ys, xs], np.nan)
                   .astype(np.float32), "WAVELENGTH", ver, "um"),
            _image(cut(sim.var_poisson), "VAR_POISSON", ver, "(DN/s)^2"),
            _image(cut(sim.var_rnoise), "VAR_RNOISE", ver, "(DN/s)^2"),
        ]
    return fits.HDUList(hdus)


def _write_atomic(hdulist, path):
    with atomic_file(path, overwrite=True) as handle:
        hdulist.writeto(handle)
    return Path(path)


def write_exposure(sim, directory):
    """Write a simulated exposure as ``<stem>_rate.fits`` and ``<stem>_cal.fits``.

    Parameters
    ----------
    sim : SimulatedExposure
        Result of :func:`simulate_exposure`.
    directory : str or os.PathLike
        Output directory (created if missing).

    Returns
    -------
    rate_path : pathlib.Path
        The ``_rate.fits`` file (ImageModel layout: SCI, ERR, DQ, VAR_POISSON, VAR_RNOISE).
    cal_path : pathlib.Path or None
        The ``_cal.fits`` file: IFUImageModel (full frame, NaN off the slices) for IFU,
        MultiSlitModel (one SCI/ERR/DQ/WAVELENGTH/VAR_* set per slit, EXTVER 1..N, SLTNAME
        and SLTSTRT/SLTSIZE in each SCI header) for MOS and FS; for BOTS the
        ``_calints.fits`` (SlitModel, SCI of one plane), since stage 2 of a time series
        writes no ``_cal`` and MAST serves none (:func:`write_timeseries` writes the
        per-integration products); ``None`` for darks.

    Notes
    -----
    Files are written with astropy only (no ASDF extension); ``stdatamodels`` opens them
    as the right model from DATAMODL. Each file is written to a temporary name in the same
    directory and moved into place, so a reader never sees a half-written file. The cal
    SCI values stay in DN/s (no flux calibration): only which pixels are finite is meant
    to be used.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = sim.meta["stem"]
    rate_name = f"{stem}_rate.fits"
    rate_path = _write_atomic(_rate_hdus(sim, rate_name), directory / rate_name)
    if sim.meta["cal_model"] is None:
        return rate_path, None
    if sim.meta["kind"] == "bots":
        # MAST serves no _cal for a time series: stage 2 writes _calints (one plane)
        cal_name = f"{stem}_calints.fits"
        hdus = _cal_hdus(sim, cal_name, n_integrations=1)
    else:
        cal_name = f"{stem}_cal.fits"
        hdus = _cal_hdus(sim, cal_name)
    cal_path = _write_atomic(hdus, directory / cal_name)
    return rate_path, cal_path


@dataclasses.dataclass
class SimulatedTimeSeries:
    """A simulated BOTS time series: one rate plane per integration.

    Attributes
    ----------
    base : SimulatedExposure
        The scene, footprint, slit and DQ flags (shared by all integrations) and the
        header metadata; ``base.rate`` is the first integration.
    rates : ndarray of float32, shape (n_integrations, ny, nx)
        One count-rate plane per integration (NaN where DO_NOT_USE).
    noise_correlated : ndarray of float32
        The correlated-noise part of every plane (the cleaner's target).
    dq : ndarray of uint32, shape (n_integrations, ny, nx)
        Base flags plus the jumps of each integration.
    """

    base: SimulatedExposure
    rates: np.ndarray
    noise_correlated: np.ndarray
    dq: np.ndarray

    @property
    def stem(self) -> str:
        return self.base.stem

    @property
    def n_integrations(self) -> int:
        return self.rates.shape[0]


def simulate_timeseries(detector="NRS1", n_integrations=10, *, seed=0, subarray="SUB2048",
                        program="09999", observation=1, visit=1, exposure=1, **amplitudes):
    """Simulate a BOTS time series: the same scene, new read noise every integration.

    Parameters
    ----------
    detector : {"NRS1", "NRS2"}
    n_integrations : int
        Number of integrations (planes).
    seed : int
        Seed; the same seed and options give the same planes.
    subarray : str
        One of :data:`SUBARRAYS` (BOTS uses SUB2048, SUB1024A/B, SUB512 or SUB32).
    program, observation, visit, exposure, **amplitudes
        As :func:`simulate_exposure`; ``effective_time`` is the time of one integration.

    Returns
    -------
    SimulatedTimeSeries
    """
    n_integrations = int(n_integrations)
    if n_integrations < 1:
        raise ValueError(f"n_integrations must be >= 1; got {n_integrations}")
    base = simulate_exposure("bots", detector, readout="NRS", seed=seed, subarray=subarray,
                             program=program, observation=observation, visit=visit,
                             exposure=exposure, **amplitudes)
    meta = base.meta
    amp = meta["noise_options"]
    ny, nx = base.rate.shape
    gain = GAIN[meta["detector"]]
    to_rate = np.float32(1.0 / (gain * amp["effective_time"]))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7, n_integrations]))
    rates = np.empty((n_integrations, ny, nx), dtype=np.float32)
    correlated = np.empty_like(rates)
    dq = np.broadcast_to(base.dq, rates.shape).copy()
    white_sigma = np.sqrt(base.var_rnoise + base.var_poisson)
    do_not_use = (base.dq & dqflags.DO_NOT_USE) != 0
    for index in range(n_integrations):
        # subarrays are read through one output (detector frame: lines = DMS columns)
        noise = _correlated_noise_detector(rng, n_lines=nx, n_fast=ny, n_outputs=1,
                                           irs2=False, amp=amp)
        noise *= to_rate
        correlated[index] = detector_to_dms(noise, meta["detector"])
        plane = base.signal + base.artifacts + correlated[index]
        plane += white_sigma * rng.standard_normal((ny, nx), dtype=np.float32)
        # a few cosmic-ray jumps in this integration only
        n_jump = rng.poisson(2000 * ny * nx / FULL_FRAME**2)
        jy, jx = rng.integers(0, ny, n_jump), rng.integers(0, nx, n_jump)
        plane[jy, jx] += rng.exponential(0.004, n_jump).astype(np.float32)
        dq[index, jy, jx] |= dqflags.JUMP_DET
        plane[do_not_use] = np.nan
        rates[index] = plane
    return SimulatedTimeSeries(base=base, rates=rates, noise_correlated=correlated, dq=dq)


def _segment_bounds(n_integrations, segments):
    edges = np.linspace(0, n_integrations, int(segments) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def write_timeseries(ts, directory, *, segments=1, calints=True):
    """Write a time series as MAST serves it: ``_rateints`` and ``_calints`` files.

    Parameters
    ----------
    ts : SimulatedTimeSeries
    directory : str or os.PathLike
        Output directory (created if missing).
    segments : int
        Number of segments; with more than one the files are named
        ``<base>-segNNN_<det>_rateints.fits`` and carry INTSTART/INTEND (1-indexed) of
        NINTS, as the pipeline splits large exposures.
    calints : bool
        Also write the calints file of every segment (SlitModel, 3-D SCI/ERR/DQ).

    Returns
    -------
    rateints : list of pathlib.Path
    calints : list of pathlib.Path
        Empty with ``calints=False``. No ``_rate``/``_cal`` pair is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base, detector = ts.stem.rsplit("_", 1)
    bounds = _segment_bounds(ts.n_integrations, segments)
    rate_paths, cal_paths = [], []
    for number, (start, stop) in enumerate(bounds, start=1):
        seg = f"-seg{number:03d}" if len(bounds) > 1 else ""
        name = f"{base}{seg}_{detector}"
        counts = {"NINTS": ts.n_integrations, "INTSTART": start + 1, "INTEND": stop}
        rates = ts.rates[start:stop]
        sigma = np.sqrt(ts.base.var_poisson + ts.base.var_rnoise)
        err = np.where(np.isnan(rates), np.float32(np.nan), sigma).astype(np.float32)
        cube = np.broadcast_to
        primary = fits.PrimaryHDU(header=_primary_header(ts.base.meta, f"{name}_rateints.fits",
                                                         "CubeModel"))
        for key, value in counts.items():
            primary.header[key] = value
        hdus = fits.HDUList([
            primary,
            _image(rates, "SCI", bunit="DN/s"),
            _image(err, "ERR", bunit="DN/s"),
            _image(ts.dq[start:stop] & ~_STAGE2_FLAGS, "DQ"),
            _image(cube(ts.base.var_poisson, rates.shape), "VAR_POISSON", bunit="(DN/s)^2"),
            _image(cube(ts.base.var_rnoise, rates.shape), "VAR_RNOISE", bunit="(DN/s)^2"),
        ])
        rate_paths.append(_write_atomic(hdus, directory / f"{name}_rateints.fits"))
        if calints:
            cal_name = f"{name}_calints.fits"
            cal_hdus = _cal_hdus(ts.base, cal_name, n_integrations=stop - start, rates=rates)
            for key, value in counts.items():
                cal_hdus[0].header[key] = value
            cal_paths.append(_write_atomic(cal_hdus, directory / cal_name))
    return rate_paths, cal_paths


_DEMO_PLAN = (
    # kind, detector, observation, exposure, readout
    ("ifu", "NRS1", 1, 1, "IRS2"),
    ("ifu", "NRS2", 1, 1, "IRS2"),
    ("ifu", "NRS1", 1, 2, "IRS2"),
    ("ifu", "NRS2", 1, 2, "IRS2"),
    ("mos", "NRS1", 2, 1, "IRS2"),
    ("mos", "NRS2", 2, 1, "IRS2"),
    ("fs", "NRS1", 3, 1, "NRS"),
    ("fs", "NRS2", 3, 1, "NRS"),
    ("bots", "NRS1", 4, 1, "NRS"),
)


def make_demo_program(directory, *, program="09999", seed=2024, n_exposures=None):
    """Write a small synthetic NIRSpec program: rate and cal files for every mode.

    Parameters
    ----------
    directory : str or os.PathLike
        Output directory (created if missing).
    program : str or int, optional
        Program number used in the headers and stems.
    seed : int, optional
        Master seed; each exposure gets its own derived seed.
    n_exposures : int, optional
        Number of exposures to write, taken in order from the plan (IFU NRS1/NRS2 x 2
        dithers in observation 1, MOS NRS1/NRS2 in observation 2, FS NRS1/NRS2 in
        observation 3 with traditional readout, BOTS SUB2048 in observation 4). Default:
        all 9.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        ``(rate_path, cal_path)`` per exposure, in plan order.
    """
    if n_exposures is not None and not 1 <= int(n_exposures) <= len(_DEMO_PLAN):
        raise ValueError(f"n_exposures must be between 1 and {len(_DEMO_PLAN)}; "
                         f"got {n_exposures}")
    plan = _DEMO_PLAN if n_exposures is None else _DEMO_PLAN[: int(n_exposures)]
    paths = []
    for kind, detector, observation, exposure, readout in plan:
        # same exposure seen by both detectors shares a seed; the detector is mixed in later
        exposure_seed = int(np.random.SeedSequence([int(seed), observation, exposure])
                            .generate_state(1)[0])
        sim = simulate_exposure(kind, detector, readout=readout, seed=exposure_seed,
                                program=program, observation=observation, exposure=exposure)
        paths.append(write_exposure(sim, directory))
    return paths
