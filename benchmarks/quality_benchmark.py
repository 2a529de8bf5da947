"""Quality benchmark: how much correlated noise each cleaner removes, measured against truth.

Every case is a simulated exposure (``nsclean.testing.simulate``) whose injected noise is known
exactly.  Each cleaner gets the same image and the same automatic background mask
(``nsclean.algorithm.masks.build_background_mask`` with its defaults, from the simulated DQ and
science footprint) and the table reports, per case and method:

- ``trace_excess``: mean squared residual correlated noise on the science footprint,
  ``mean((noise_correlated - model)^2)``, relative to the white-noise variance there
  (``before`` row: the same with no cleaning).  This is the noise a cleaner leaves in,
  or adds to, the extracted spectra.
- ``bkg_excess``: the same on the background pixels.
- ``removed``: fraction of the correlated variance removed over all usable pixels.
- ``banding``: rms over columns of the column means of the residual correlated noise,
  relative to the white-noise sigma of one pixel.
- ``flux_bias``: ``sum(clean(S+N) - clean(N) - S) / sum(S)`` over the footprint, in per cent:
  signal the cleaner takes away (light leaking past the mask into the model).
- ``time``: wall time of one call (includes jwst's own per-line loop for the jwst row).

Run: ``python benchmarks/quality_benchmark.py`` (add ``--quick`` for three cases).  The
jwst rows appear when the ``jwst`` package is importable (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
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
    """The cleaners compared: name -> function(image, mask) -> model."""
    table = {
        "nsclean fft": lambda im, m: nsclean.fit_background(im, m, detector),
        "nsclean median": lambda im, m: nsclean.fit_background(im, m, detector, method="median"),
        "median/channel": lambda im, m: nsclean.fit_background(
            im, m, detector, method="median", per_channel=True
        ),
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
    "bots_sub2048": dict(kind="bots", detector="NRS1"),
}
QUICK = ("ifu_nrs2", "gap_nrs1", "bots_sub2048")


def run_case(name, spec, seed):
    spec = dict(spec)
    gap = spec.pop("gap", None)
    sim = simulate.simulate_exposure(seed=seed, **spec)
    detector = sim.meta["detector"]
    mask, _ = masks.build_background_mask(
        sim.rate,
        sim.dq,
        sim.footprint,
        exp_type=sim.meta["exp_type"],
        full_frame=sim.rate.shape == (2048, 2048),
    )
    if gap is not None:
        # A user mask that blanks a wide band (scattered light, a bright neighbour):
        # every column has a 600-row gap.
        mask[gap[0] : gap[1]] = False
    usable = np.isfinite(sim.rate) & (sim.artifacts == 0)
    if sim.rate.shape == (2048, 2048):
        usable[:4] = usable[-4:] = False
        usable[:, :4] = usable[:, -4:] = False
    trace = sim.footprint & usable
    background = mask & usable
    noise_only = (sim.noise_total + sim.artifacts).astype(np.float32)
    noise_only[~np.isfinite(sim.rate)] = np.nan
    white_var = float(np.mean(sim.noise_white[usable].astype(float) ** 2))
    signal_sum = float(sim.signal[trace].sum())

    def excess(residual, where):
        return float(np.mean(residual[where] ** 2) / white_var)

    correlated = sim.noise_correlated.astype(float)
    rows = [
        dict(
            case=name,
            method="(before)",
            trace_excess=excess(correlated, trace),
            bkg_excess=excess(correlated, background),
            removed=0.0,
            banding=_banding(correlated, usable, white_var),
            flux_bias=0.0,
            time=0.0,
            bkg_fraction=float(background.mean()),
        )
    ]
    before_all = float(np.mean(correlated[usable] ** 2))
    for method, func in methods(detector).items():
        start = time.perf_counter()
        model = func(sim.rate, mask)
        elapsed = time.perf_counter() - start
        if model is None:
            continue
        model = np.asarray(model, dtype=float)
        residual = correlated - model
        noise_model = np.asarray(func(noise_only, mask), dtype=float)
        # clean(S+N) - clean(N) - S = model(N) - model(S+N) on the footprint.
        bias = float((noise_model - model)[trace].sum()) / signal_sum * 100.0
        rows.append(
            dict(
                case=name,
                method=method,
                trace_excess=excess(residual, trace),
                bkg_excess=excess(residual, background),
                removed=1.0 - float(np.mean(residual[usable] ** 2)) / before_all,
                banding=_banding(residual, usable, white_var),
                flux_bias=bias,
                time=elapsed,
                bkg_fraction=float(background.mean()),
            )
        )
    return rows


def _banding(residual, usable, white_var):
    column_means = np.nanmean(np.where(usable, residual, np.nan), axis=0)
    return float(np.nanstd(column_means) / np.sqrt(white_var))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only " + ", ".join(QUICK))
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    names = QUICK if args.quick else tuple(CASES)
    print(f"# nsclean {nsclean.__version__} quality benchmark, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}")
    header = ("case", "method", "trace_excess", "bkg_excess", "removed", "banding",
              "flux_bias_%", "time_s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for index, name in enumerate(names):
        for row in run_case(name, CASES[name], args.seed + index):
            print(
                f"| {row['case']} | {row['method']} | {row['trace_excess']:.4f} | "
                f"{row['bkg_excess']:.4f} | {row['removed']:.3f} | {row['banding']:.4f} | "
                f"{row['flux_bias']:+.4f} | {row['time']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
