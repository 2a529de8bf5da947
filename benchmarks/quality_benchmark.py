"""Quality benchmark: how much correlated noise each cleaner leaves, measured against truth.

Every case is a simulated exposure (``nsclean.testing.simulate``) whose injected noise is known
exactly.  Each cleaner gets the same image and the same background mask, and the table
reports, per case, method and **region**:

- ``science``: the science footprint (slits, slices, the extended source, or the zeros
  of a real hand-made mask);
- ``gap``: usable pixels that are neither science nor background (the mask's dilation
  rings, the fixed-slit band, a user-blanked band): where a model must interpolate;
- ``background``: the pixels the cleaner may use.

Columns:

- ``excess``: mean squared residual correlated noise ``mean((noise_correlated -
  model)^2)`` in the region, in units of the white read-noise variance of the background
  pixels (``(before)``: no cleaning).  This is what a cleaner leaves in, or adds to, the
  extracted spectra.  Lower is better; 0 is perfect.
- ``banding``: rms over columns of the region's column means of the residual, in
  white-noise sigmas.
- ``flux_bias_%`` (science only): ``sum(clean(S+N) - clean(N) - S) / sum(S)``: signal
  the cleaner takes away (light leaking past the mask into the model).
- ``var_ratio`` (readout only): predicted posterior variance over measured residual
  variance in the region (should be 0.8-1.25).
- ``time_s``: wall time of one call.

Cases: IFU NRS1/NRS2 and MOS NRS1 (IRS2), fixed slit NRS2, IFU with traditional readout,
IFU NRS2 with a picture frame 3x the default, MOS with a 600-row user-blanked band, an
extended source filling a 460-row block of every column (``extended_nrs1``), a BOTS
SUB2048 exposure with NRSRAPID-like 1/f stronger than the white noise, the same with the
background on one side of the trace only (``bots_onesided``), and, with
``--real-mask PATH``, the real hand-made NRS2 IFU mask of the NSClean release (about 15 %
background) on a simulated NRS2 frame, the mask's zeros being the science.

At the end, the rows where a method leaves **more** correlated noise than no cleaning
("worse than no cleaning"); the default method must never appear there.

Run: ``python benchmarks/quality_benchmark.py [--seeds 11 12] [--real-mask M.fits.gz]``.
The jwst rows appear when the ``jwst`` package is importable (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone

import numpy as np

import nsclean
from nsclean.algorithm import masks
from nsclean.testing import simulate


def rolling_median_model(image, mask, half_window=32):
    """Baseline: running median of the nearest background samples along each column.

    For every column the background samples are taken in row order and each is replaced
    by the median of the ``2 * half_window + 1`` samples around it; the model between
    samples is linearly interpolated.  (The paper's Figure 3b baseline.)
    """
    from numpy.lib.stride_tricks import sliding_window_view

    n_rows, n_cols = image.shape
    model = np.zeros(image.shape)
    rows = np.arange(n_rows)
    width = 2 * half_window + 1
    for j in range(n_cols):
        good = mask[:, j] & np.isfinite(image[:, j])
        values = image[good, j].astype(float)
        if values.size == 0:
            continue
        if values.size < width:
            model[:, j] = np.median(values)
            continue
        padded = np.pad(values, half_window, mode="reflect")
        running = np.median(sliding_window_view(padded, width), axis=1)
        model[:, j] = np.interp(rows, np.flatnonzero(good), running)
    return model


def jwst_model(image, mask, detector):
    """Model of jwst's clean_flicker_noise NSClean port (fft method), or None."""
    try:
        from jwst.clean_flicker_noise.clean_flicker_noise import (
            fft_clean_full_frame,
            fft_clean_subarray,
        )
    except ImportError:
        return None
    work = np.where(np.isfinite(image), image, 0.0).astype(np.float32)
    fit_mask = mask & np.isfinite(image)
    if image.shape == (2048, 2048):
        cleaned = fft_clean_full_frame(work.copy(), fit_mask.copy(), detector)
    else:
        cleaned = fft_clean_subarray(work.copy(), fit_mask.copy(), detector)
    if cleaned is None:
        return np.full(image.shape, np.nan)
    return work - cleaned


def methods(detector):
    """The cleaners compared: name -> function(image, mask) -> model (or (model, var))."""

    def readout(im, m):
        result = nsclean.fit(im, m, detector, method="readout")
        return result.model, result.variance

    table = {
        "nsclean readout": readout,
        "nsclean fft": lambda im, m: nsclean.fit_background(im, m, detector, method="fft"),
        "nsclean median": lambda im, m: nsclean.fit_background(im, m, detector, method="median"),
        "rolling median": rolling_median_model,
    }
    try:
        import jwst  # noqa: F401

        table["jwst fft"] = lambda im, m: jwst_model(im, m, detector)
    except ImportError:
        pass
    return table


CASES = {
    "ifu_nrs1": dict(kind="ifu", detector="NRS1"),
    "ifu_nrs2": dict(kind="ifu", detector="NRS2"),
    "mos_nrs1": dict(kind="mos", detector="NRS1"),
    "fs_nrs2": dict(kind="fs", detector="NRS2"),
    "ifu_nrs1_trad": dict(kind="ifu", detector="NRS1", readout="NRS"),
    "frame_nrs2": dict(kind="ifu", detector="NRS2", picture_frame=0.6),
    "gap_nrs1": dict(kind="mos", detector="NRS1", gap=(700, 1300)),
    "extended_nrs1": dict(kind="mos", detector="NRS1", extended=(790, 1250)),
    # NRSRAPID subarray frames are short: their 1/f is as strong as the white noise.
    "bots_sub2048": dict(kind="bots", detector="NRS1", pink_correlated=15.0,
                         pink_uncorrelated=3.0),
    # The same with the background on one side of the trace only (a user mask blanks
    # the rows below it: a neighbour's spectrum, scattered light).
    "bots_onesided": dict(kind="bots", detector="NRS1", pink_correlated=15.0,
                          pink_uncorrelated=3.0, gap=(0, 8)),
    "realmask_nrs2": dict(kind="dark", detector="NRS2", real_mask=True),
}
QUICK = ("ifu_nrs2", "extended_nrs1", "bots_sub2048")


def _extended_source(sim, rows):
    """Add a smooth extended source filling ``rows`` of every column (signal and footprint)."""
    r0, r1 = rows
    n_rows = r1 - r0
    profile = 0.5 + 0.5 * np.sin(np.linspace(0.0, np.pi, n_rows))[:, None]
    columns = np.linspace(0.6, 1.4, sim.rate.shape[1])[None, :]
    level = 0.02  # DN/s: a few times the white noise of one pixel
    extra = (level * profile * columns).astype(np.float32)
    sim.signal[r0:r1] += extra
    sim.rate[r0:r1] += extra
    sim.footprint[r0:r1] = True


def prepare(spec, seed, real_mask_path):
    """Simulated exposure, background mask and science footprint of one case."""
    spec = dict(spec)
    gap = spec.pop("gap", None)
    extended = spec.pop("extended", None)
    real = spec.pop("real_mask", False)
    sim = simulate.simulate_exposure(seed=seed, **spec)
    if extended is not None:
        _extended_source(sim, extended)
    full = sim.rate.shape == (2048, 2048)
    footprint = sim.footprint.copy()
    if real:
        from astropy.io import fits

        with fits.open(real_mask_path) as hdul:
            mask = np.asarray(hdul[0].data) == 1
        # The real mask's zeros are where the science would be (minus the border).
        footprint = ~mask
        footprint[:4] = footprint[-4:] = False
        footprint[:, :4] = footprint[:, -4:] = False
        mask &= np.isfinite(sim.rate)
    else:
        # The subarray's place on the detector, as the workflow reads it from SUBSTRT1/2:
        # only the detector's own border rows and columns are reference pixels.
        origin = (sim.meta["substrt2"] - 1, sim.meta["substrt1"] - 1)
        mask, _ = masks.build_background_mask(
            sim.rate, sim.dq, sim.footprint, exp_type=sim.meta["exp_type"], full_frame=full,
            origin=origin,
        )
    if gap is not None:
        # A user mask that blanks a wide band (scattered light, a bright neighbour).
        mask[gap[0] : gap[1]] = False
    return sim, mask, footprint


def run_case(name, spec, seed, real_mask_path=None):
    sim, mask, footprint = prepare(spec, seed, real_mask_path)
    detector = sim.meta["detector"]
    usable = np.isfinite(sim.rate) & (sim.artifacts == 0)
    if sim.rate.shape == (2048, 2048):
        usable[:4] = usable[-4:] = False
        usable[:, :4] = usable[:, -4:] = False
    regions = {
        "science": footprint & usable,
        "gap": usable & ~footprint & ~mask,
        "background": usable & mask,
    }
    white_var = float(np.mean(sim.noise_white[regions["background"]].astype(float) ** 2))
    noise_only = (sim.noise_total + sim.artifacts).astype(np.float32)
    noise_only[~np.isfinite(sim.rate)] = np.nan
    science = regions["science"]
    signal_sum = float(sim.signal[science].sum())
    correlated = sim.noise_correlated.astype(float)

    def region_rows(method, residual, elapsed, bias=None, variance=None):
        rows = []
        for region, where in regions.items():
            if not where.any():
                continue
            excess = float(np.mean(residual[where] ** 2) / white_var)
            column_means = np.nanmean(np.where(where, residual, np.nan), axis=0)
            ratio = None
            if variance is not None:
                ratio = float(np.mean(variance[where]) / np.mean(residual[where] ** 2))
            rows.append(dict(
                case=name, seed=seed, method=method, region=region, excess=excess,
                banding=float(np.nanstd(column_means) / np.sqrt(white_var)),
                flux_bias=bias if region == "science" else None, var_ratio=ratio,
                time=elapsed, fraction=float(where.mean()),
            ))
        return rows

    rows = region_rows("(before)", correlated, 0.0)
    for method, func in methods(detector).items():
        start = time.perf_counter()
        out = func(sim.rate, mask)
        elapsed = time.perf_counter() - start
        variance = None
        if isinstance(out, tuple):
            out, variance = out
        if out is None:
            continue
        model = np.asarray(out, dtype=float)
        noise_out = func(noise_only, mask)
        noise_model = np.asarray(noise_out[0] if isinstance(noise_out, tuple) else noise_out,
                                 dtype=float)
        # clean(S+N) - clean(N) - S = model(N) - model(S+N) on the footprint.
        bias = None
        if signal_sum > 0:
            bias = float((noise_model - model)[science].sum()) / signal_sum * 100.0
        rows += region_rows(method, correlated - model, elapsed, bias, variance)
    return rows


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only " + ", ".join(QUICK))
    parser.add_argument("--seeds", type=int, nargs="+", default=[11])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="cases to run")
    parser.add_argument("--real-mask", help="the NSClean release's NRS2 IFU mask "
                        "(20230306_nrs2_ifu_mask.fits.gz); the real-mask case is skipped "
                        "without it")
    args = parser.parse_args(argv)
    names = args.cases or (QUICK if args.quick else tuple(CASES))
    if not (args.real_mask and os.path.exists(args.real_mask)):
        if "realmask_nrs2" in names:
            print("# realmask_nrs2 skipped: pass --real-mask PATH to run it")
        names = [n for n in names if n != "realmask_nrs2"]
    print(f"# nsclean {nsclean.__version__} quality benchmark, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, seeds {args.seeds}")
    header = ("case", "seed", "method", "region", "excess", "banding", "flux_bias_%",
              "var_ratio", "time_s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    everything = []
    for index, name in enumerate(names):
        for seed in args.seeds:
            rows = run_case(name, CASES[name], seed + index, args.real_mask)
            everything += rows
            for row in rows:
                print(
                    f"| {row['case']} | {row['seed']} | {row['method']} | {row['region']} | "
                    f"{row['excess']:.4f} | {row['banding']:.4f} | "
                    f"{_fmt(row['flux_bias'], '+.4f')} | {_fmt(row['var_ratio'], '.3f')} | "
                    f"{row['time']:.3f} |",
                    flush=True,
                )
    before = {(r["case"], r["seed"], r["region"]): r["excess"] for r in everything
              if r["method"] == "(before)"}
    worse = [r for r in everything if r["method"] != "(before)"
             and r["excess"] > before[(r["case"], r["seed"], r["region"])]]
    print("\nworse than no cleaning (case, seed, method, region: after / before):")
    for r in worse:
        key = (r["case"], r["seed"], r["region"])
        print(f"- {key[0]}, {key[1]}, {r['method']}, {key[2]}: "
              f"{r['excess']:.4f} / {before[key]:.4f}")
    if not worse:
        print("- (none)")


if __name__ == "__main__":
    main()
