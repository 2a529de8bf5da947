"""How long Snakemake takes to plan a large program: the dry run of N exposures.

Writes a ``local`` archive of N exposures as small placeholder files (a FITS primary
header with the keywords the manifest reads, no data: 2880 bytes each instead of ~85 MB),
lets the workflow write the manifest (the checkpoint; timed separately), then times
``snakemake -n`` (the whole DAG built, nothing executed) with the repository's
Snakefile and default profile.  Prints a Markdown table for docs/benchmarks.md.

Usage::

    .venv/bin/python benchmarks/dryrun_benchmark.py [--exposures 1000] [--repeats 3]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from astropy.io import fits

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "04444"


def write_placeholders(directory: Path, n_exposures: int) -> None:
    """``n_exposures`` rate/cal pairs of empty FITS files with NIRSpec headers."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(n_exposures):
        observation, exposure = divmod(index, 100)
        detector = ("NRS1", "NRS2")[index % 2]
        stem = (f"jw{PROGRAM}{observation + 1:03d}001_03101_{exposure // 2 + 1:05d}_"
                f"{detector.lower()}")
        for kind in ("rate", "cal"):
            header = fits.Header([
                ("TELESCOP", "JWST"), ("INSTRUME", "NIRSPEC"), ("DETECTOR", detector),
                ("EXP_TYPE", "NRS_IFU"), ("PROGRAM", PROGRAM),
                ("OBSERVTN", f"{observation + 1:03d}"), ("VISIT", "001"),
                ("EXPOSURE", f"{exposure // 2 + 1:05d}"), ("SUBARRAY", "FULL"),
                ("GRATING", "G395H"), ("FILTER", "F290LP")])
            fits.PrimaryHDU(header=header).writeto(directory / f"{stem}_{kind}.fits",
                                                  overwrite=True)


def snakemake(workdir: Path, *args: str) -> float:
    """Run Snakemake on the workflow in ``workdir``; returns the wall time."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                          timeout=1800, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="dryrun-work")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.perf_counter()
    write_placeholders(workdir / "archive", args.exposures)
    print(f"{2 * args.exposures} placeholder files in {time.perf_counter() - started:.1f} s "
          "(not counted)")
    (workdir / "config.yaml").write_text(
        f'programs: ["{PROGRAM}"]\narchive:\n  source: local\n  local_dir: archive\n'
        "results: results\n", encoding="utf-8")
    manifest = snakemake(workdir, "--until", "fetch_manifest")
    plans = [snakemake(workdir, "-n") for _ in range(args.repeats)]
    jobs = 4 * args.exposures + 4  # 2 downloads, mask, clean each; reports (manifest done)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, {now}\n")
    print("| exposures | jobs planned | manifest (checkpoint run) | dry run: min | median "
          "| max |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.exposures} | {jobs} | {manifest:.1f} s | {min(plans):.1f} s "
          f"| {statistics.median(plans):.1f} s | {max(plans):.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
