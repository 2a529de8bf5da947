"""Measure the mask defaults on simulated exposures with known truth.

Run:  python benchmarks/mask_defaults.py [--quick] > mask_defaults.txt

1. Dilation radius. For each radius r the mask is built from the rate and cal
   products (all other options default) and used twice: to clean the exposure
   (S + N) and to clean its noise alone (N = rate - signal). Their difference
   minus the true signal S is the flux bias that light leaking past the
   footprint edge puts into the noise model; it is summed over the footprint
   and given in percent of the footprint's flux. The price of dilation is
   background pixels lost, and the correlated noise left after cleaning N
   (residual rms of ``noise_correlated - model`` on the footprint, in units
   of the white-noise sigma), which grows when the fit has fewer pixels.

2. JUMP_DET. The simulator flags few jumps (isolated hits and a few snowballs);
   long real exposures flag many more. Extra JUMP_DET flags are added at
   several fractions of the pixels, in three models (see ``add_jumps``:
   isolated hits with the simulator's small positive residual, the same
   flags with no residual at all, and snowballs with a halo residual), and
   the exposure is cleaned with jump masking on (with its per-column
   fallback) and off: background left, weak columns, columns where the
   fallback kept the jumps, lines the fit had to guard or leave uncleaned,
   and the residual correlated noise on the footprint.

Machine, date and package versions are printed first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

from nsclean import __version__
from nsclean.algorithm import core, masks
from nsclean.algorithm import nirspec as dqflags
from nsclean.io import exposure as ex
from nsclean.io.errors import NSCleanInputError
from nsclean.testing import simulate


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
        f"nsclean {__version__}"
    )


def load(kind, detector, seed, subarray=None, readout="IRS2", workdir="."):
    sim = simulate.simulate_exposure(
        kind, detector, seed=seed, subarray=subarray, readout=readout, observation=seed
    )
    rate_path, cal_path = simulate.write_exposure(sim, workdir)
    return sim, ex.read_rate(rate_path), ex.read_cal(cal_path)


def residual_rms(sim, model, where):
    """Correlated noise left after subtracting ``model``, in white-noise sigma."""
    left = (sim.noise_correlated - model)[where]
    white = np.std(sim.noise_white[~sim.illuminated & np.isfinite(sim.rate)])
    return float(np.sqrt(np.nanmean(left.astype(np.float64) ** 2)) / white)


def dilation_table(cases, radii, workdir):
    print("\n## Flux bias vs dilation radius\n")
    print(
        "| exposure | r | background px | lost vs r=0 | flux bias % | residual rms / sigma_white |"
    )
    print("|---|---|---|---|---|---|")
    for label, kind, detector, seed, subarray, readout in cases:
        sim, rate, cal = load(kind, detector, seed, subarray, readout, workdir)
        noise_only = sim.rate - sim.signal  # NaN stays NaN
        footprint = sim.footprint & np.isfinite(sim.rate)
        flux = float(sim.signal[footprint].astype(np.float64).sum())
        first = None
        for radius in radii:
            try:
                mask, info = ex.build_exposure_mask(rate, cal, dilation_radius=radius)
            except NSCleanInputError as exc:
                print(f"| {label} | {radius} | 0 | 100 % | - | - ({exc.problem}) |", flush=True)
                break
            with_signal = core.fit(sim.rate, mask, detector).model
            noise_model = core.fit(noise_only, mask, detector).model
            # clean(S+N) - clean(N) - S = model(N) - model(S+N)
            bias = (noise_model - with_signal)[footprint].astype(np.float64).sum()
            first = first or info["n_background"]
            print(
                f"| {label} | {radius} | {info['n_background']} | "
                f"{100 * (1 - info['n_background'] / first):.1f} % | "
                f"{100 * bias / flux:+.3f} | {residual_rms(sim, noise_model, footprint):.3f} |",
                flush=True,
            )


def add_jumps(rate, fraction, seed, model):
    """Flag extra JUMP_DET pixels covering ``fraction`` of the image.

    ``model``: "isolated" -- single pixels with the simulator's residual per jump
    (exponential, mean 0.004 DN/s, about one white-noise sigma); "flag-only" -- the
    same pixels without residual (an unbiased ramp fit); "snowballs" -- flagged disks
    of radius 8-25 px with the simulator's Gaussian halo residual (peak 0.03 DN/s).
    """
    rng = np.random.default_rng(seed)
    shape = rate.sci.shape
    excess = np.zeros(shape, np.float32)
    if model == "snowballs":
        flagged = np.zeros(shape, bool)
        yy, xx = np.indices(shape)
        while flagged.mean() < fraction:
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            radius = rng.uniform(8, 25)
            y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 1, shape[0])
            x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 1, shape[1])
            r = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx)
            disk = r <= radius
            flagged[y0:y1, x0:x1] |= disk
            halo = 0.03 * np.exp(-0.5 * (r / (radius / 1.5)) ** 2)
            excess[y0:y1, x0:x1] += np.where(disk, halo, 0).astype(np.float32)
    else:
        flagged = rng.random(shape) < fraction
        if model == "isolated":
            excess = rng.exponential(0.004, size=shape).astype(np.float32)
    flagged &= np.isfinite(rate.sci)
    sci = np.where(flagged, rate.sci + excess, rate.sci)
    dq = np.where(flagged, rate.dq | dqflags.JUMP_DET, rate.dq)
    return sci, dq


def jump_step(info):
    return next(step for step in info["steps"] if step["step"] == "jump")


def jump_table(cases, fractions, workdir, models=("isolated", "flag-only", "snowballs")):
    print("\n## JUMP_DET masking\n")
    print(
        "| exposure | jump model | extra fraction | mask_jump | background px | weak columns | "
        "fallback columns | guarded lines | uncleaned lines | residual rms / sigma_white |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, kind, detector, seed, subarray, readout in cases:
        sim, rate, cal = load(kind, detector, seed, subarray, readout, workdir)
        footprint = cal.footprint(rate.sci.shape)
        footprint_finite = sim.footprint & np.isfinite(sim.rate)
        for model in models:
            for fraction in fractions:
                if fraction == 0 and model != models[0]:
                    continue
                sci, dq = add_jumps(rate, fraction, seed + 100, model)
                for mask_jump in (False, True):
                    mask, info = masks.build_background_mask(
                        sci,
                        dq,
                        footprint,
                        exp_type=rate.exp_type,
                        origin=rate.origin,
                        mask_jump=mask_jump,
                    )
                    result = core.fit(sci, mask, detector)
                    print(
                        f"| {label} | {model} | {fraction:.3f} | {mask_jump} | "
                        f"{info['n_background']} | {info['guard']['n_weak_columns']} | "
                        f"{len(jump_step(info)['restored_columns'])} | "
                        f"{result.info['n_guarded']} | {result.info['n_uncleaned']} | "
                        f"{residual_rms(sim, result.model, footprint_finite):.3f} |",
                        flush=True,
                    )


def timing(workdir):
    sim, rate, _ = load("ifu", "NRS1", 1, workdir=workdir)
    cal_path = os.path.join(workdir, f"{sim.stem}_cal.fits")
    wall, cpu = [], []
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        cal = ex.read_cal(cal_path)
        ex.build_exposure_mask(rate, cal)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(
        f"\nFull-frame IFU mask from the cal file (read cal + build), 5 runs: wall best "
        f"{min(wall):.3f} s, median {np.median(wall):.3f} s; CPU best {min(cpu):.3f} s, "
        f"median {np.median(cpu):.3f} s; load average {os.getloadavg()[0]:.1f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per table")
    parser.add_argument("--skip", choices=("dilation", "jump"), action="append", default=[])
    args = parser.parse_args(argv)
    print(machine_line())
    dilation_cases = [
        ("IFU NRS1 full", "ifu", "NRS1", 11, None, "IRS2"),
        ("IFU NRS2 full", "ifu", "NRS2", 12, None, "IRS2"),
        ("MOS NRS1 full", "mos", "NRS1", 13, None, "IRS2"),
        ("MOS NRS2 full", "mos", "NRS2", 14, None, "IRS2"),
        ("FS NRS1 ALLSLITS", "fs", "NRS1", 15, "ALLSLITS", "NRS"),
        ("BOTS NRS2 SUB2048", "bots", "NRS2", 16, "SUB2048", "NRS"),
    ]
    jump_cases = [
        ("IFU NRS1 full", "ifu", "NRS1", 21, None, "IRS2"),
        ("MOS NRS2 full", "mos", "NRS2", 22, None, "IRS2"),
    ]
    if args.quick:
        dilation_cases, jump_cases = dilation_cases[:1], jump_cases[:1]
    with tempfile.TemporaryDirectory() as workdir:
        timing(workdir)
        if "dilation" not in args.skip:
            dilation_table(dilation_cases, [0, 1, 2, 3, 4, 6, 8], workdir)
        if "jump" not in args.skip:
            jump_table(jump_cases, [0.0, 0.01, 0.05, 0.2], workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
