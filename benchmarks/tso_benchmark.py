"""Time-series benchmark: clean a 2000-integration SUB2048 BOTS exposure in segments.

Simulates a NIRSpec BOTS time series (SUB2048, 32 x 2048 pixels per integration), writes
it as MAST serves it (``_rateints`` and ``_calints`` in 4 segments of 500 integrations,
~0.65 GB of rateints per segment), then times :func:`nsclean.io.tso.clean_rateints` on it:
reading and checking every segment, the one mask of the exposure from the calints
footprint, the fit of every integration with :func:`nsclean.fit`, and writing the
cleaned segments.  The target is under 60 s on 2 cores.

Prints one table row per thread count (wall and CPU seconds, peak RSS of the process)
and the residual correlated noise against the simulated truth.

Run: ``python benchmarks/tso_benchmark.py [--integrations 2000] [--segments 4]
[--workers 1 2] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from astropy.io import fits

from nsclean.io import tso
from nsclean.testing import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--integrations", type=int, default=2000)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--methods", nargs="+", default=["auto"],
                        help="fit methods to time (auto, readout, fft)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nsclean-tso-"))
    started = time.perf_counter()
    series = simulate.simulate_timeseries("NRS1", args.integrations, seed=2000)
    rateints, calints = simulate.write_timeseries(series, workdir / "in",
                                                  segments=args.segments)
    truth = series.noise_correlated
    del series
    print(f"simulated and wrote {args.integrations} integrations in {len(rateints)} "
          f"segments ({sum(p.stat().st_size for p in rateints) / 1e9:.2f} GB of rateints) "
          f"in {time.perf_counter() - started:.1f} s")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| method | workers | wall (s) | CPU (s) | s per integration | peak RSS (GB) | "
          "correlated rms before / after (DN/s) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for method, workers in [(m, w) for w in args.workers for m in args.methods]:
        out = workdir / f"out-{workers}"
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        summary = tso.clean_rateints(rateints, out, calints_paths=calints, workers=workers,
                                     overwrite=True, fit_options={"method": method})
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        before, after = _residuals(rateints, summary["outputs"], truth)
        print(f"| {method} | {workers} | {wall:.1f} | {cpu:.1f} | {wall / args.integrations:.4f} | "
              f"{peak:.2f} | {before:.4f} / {after:.4f} |")
        shutil.rmtree(out)
    if args.workdir is None:
        shutil.rmtree(workdir)


def _residuals(rateints, outputs, truth):
    """rms of the correlated noise before and of what the cleaning left of it."""
    before, after, offset = [], [], 0
    for raw_path, clean_path in zip(rateints, outputs, strict=True):
        raw = fits.getdata(raw_path, "SCI")
        cleaned = fits.getdata(clean_path, "SCI")
        n = raw.shape[0]
        removed = raw.astype(np.float64) - cleaned
        true = truth[offset:offset + n]
        finite = np.isfinite(removed)
        # the model's mean level per integration is not observable apart from the source
        before.append(np.nanstd(true[finite]))
        after.append(np.nanstd((true - removed)[finite]))
        offset += n
    return float(np.mean(before)), float(np.mean(after))


if __name__ == "__main__":
    main()
