"""Speed and memory benchmark of ``nsclean.clean`` (and jwst's NSClean port when installed).

Times are medians of repeated calls, measured side by side in one run (the machines are
shared and noisy: compare the ratio, not the absolute numbers across runs).  ``nsclean s``
uses the default threads (``NSCLEAN_THREADS``, else the CPUs available); ``nsclean 1
thread s`` is the same call with ``NSCLEAN_THREADS=1``.  Memory is
the peak of numpy allocations during one call above what was allocated before it
(``tracemalloc``; numpy reports its buffers to it).

Cases: a full 2048 x 2048 IFU frame with its automatic mask (~15-25 % background), a
MOS frame, an IFU frame with traditional readout (the data choose more modes), and a
SUB2048 (32 x 2048) BOTS subarray.  ``nsclean s`` is the default method (readout on full
frames and on the 32-row subarray), ``fft s`` the paper's method in the same run, ``fit+var s``
the default ``nsclean.fit`` that also returns the posterior variance (what the
workflow's clean step calls).

Run: ``python benchmarks/speed_benchmark.py [--repeat 7]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import tracemalloc
from datetime import datetime, timezone

import numpy as np

import nsclean
from nsclean.algorithm import masks
from nsclean.testing import simulate


def _case(kind, detector="NRS1", **options):
    sim = simulate.simulate_exposure(kind, detector, seed=5, **options)
    mask, _ = masks.build_background_mask(
        sim.rate, sim.dq, sim.footprint, exp_type=sim.meta["exp_type"]
    )
    return sim.rate, mask, sim.meta["detector"]


def _jwst_cleaner(shape):
    try:
        from jwst.clean_flicker_noise.clean_flicker_noise import (
            fft_clean_full_frame,
            fft_clean_subarray,
        )
    except ImportError:
        return None
    func = fft_clean_full_frame if shape == (2048, 2048) else fft_clean_subarray

    def run(image, mask, detector):
        # jwst's clean() modifies its inputs and cannot take NaN: give it copies.
        work = np.where(np.isfinite(image), image, 0.0).astype(np.float32)
        return func(work, mask & np.isfinite(image), detector)

    return run


def _median_time(func, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_extra_mb(func):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="calls per timing (nsclean)")
    parser.add_argument("--jwst-repeat", type=int, default=3, help="calls per timing (jwst)")
    args = parser.parse_args(argv)

    print(
        f"# nsclean {nsclean.__version__} speed benchmark, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print("| case | shape | bkg fraction | nsclean s | nsclean 1 thread s | fft s | fit+var s "
          "| jwst s | speed-up | nsclean extra MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, kind, options in (("ifu full frame", "ifu", {}), ("mos full frame", "mos", {}),
                                ("ifu traditional", "ifu", {"readout": "NRS"}),
                                ("bots SUB2048", "bots", {})):
        image, mask, detector = _case(kind, **options)

        def ours(image=image, mask=mask, detector=detector):
            return nsclean.clean(image, mask, detector)

        ours()  # warm-up: imports, FFT plans
        jwst = _jwst_cleaner(image.shape)
        t_ours = _median_time(ours, args.repeat)
        t_jwst = None
        if jwst is not None:
            def theirs(image=image, mask=mask, detector=detector, jwst=jwst):
                return jwst(image, mask, detector)

            theirs()
            # Interleave so both see the same machine load.
            t_jwst = _median_time(theirs, args.jwst_repeat)
            t_ours = min(t_ours, _median_time(ours, args.repeat))
        def fft(image=image, mask=mask, detector=detector):
            return nsclean.clean(image, mask, detector, method="fft")

        def with_variance(image=image, mask=mask, detector=detector):
            return nsclean.fit(image, mask, detector)

        fft()
        t_fft = _median_time(fft, args.repeat)
        t_variance = _median_time(with_variance, max(1, args.repeat // 2))
        memory = _peak_extra_mb(ours)
        # The same call on one thread (what a workflow job with threads: 1 gets).
        saved = os.environ.get("NSCLEAN_THREADS")
        os.environ["NSCLEAN_THREADS"] = "1"
        try:
            t_single = _median_time(ours, args.repeat)
        finally:
            if saved is None:
                del os.environ["NSCLEAN_THREADS"]
            else:
                os.environ["NSCLEAN_THREADS"] = saved
        jwst_text = f"{t_jwst:.3f}" if t_jwst else "n/a"
        ratio = f"{t_jwst / t_ours:.1f}x" if t_jwst else "n/a"
        print(
            f"| {name} | {image.shape[0]}x{image.shape[1]} | {mask.mean():.3f} | "
            f"{t_ours:.3f} | {t_single:.3f} | {t_fft:.3f} | {t_variance:.3f} | {jwst_text} | "
            f"{ratio} | {memory:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
