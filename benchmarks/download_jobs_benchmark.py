"""Two versions of the workflow side by side: the demo's wall and CPU, the dry run's size.

Written to choose between one download job per file and one per exposure (issue #13),
it compares any two (or more) commits of this repository.  Each is exported with
``git archive`` into the work directory and run with its own package first on
``PYTHONPATH``, alternating in the order A B B A A B ..., so that a change in the load
of a shared machine falls on both alike.  Per run:

- the scaled demo (default 24 exposures, simulated once, not timed) fetched from the
  loopback MAST server: wall time, the machine's CPU time over the run (everything on the
  machine), that of Snakemake with its jobs, and the number of jobs;
- the dry run (``snakemake -n``: the whole DAG built, nothing run) of a program of
  placeholder files (default 1000 exposures, ``local`` archive; the manifest is written
  once per version, not timed): wall time and the number of jobs planned.

Prints one Markdown row per run and the medians per version.

Usage::

    .venv/bin/python benchmarks/download_jobs_benchmark.py \\
        --version per-file=02be067 --version per-exposure=e04bf79 [--repeats 2] \\
        [--exposures 24] [--dryrun-exposures 1000] [--cores 2] [--workdir DIR] [--no-demo]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from math import nan
from pathlib import Path

from dryrun_benchmark import PROGRAM as DRYRUN_PROGRAM
from dryrun_benchmark import write_placeholders
from workflow_benchmark import machine_cpu_seconds, process_cpu_seconds

from nsclean.testing.demo import simulate_program, write_config
from nsclean.testing.mastserver import MastServer

ROOT = Path(__file__).resolve().parents[1]


def export(revision: str, directory: Path) -> Path:
    """The repository at ``revision``, written into ``directory`` (replaced)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def snakemake(tree: Path, rundir: Path, config: Path, *args: str, cores: int = 2):
    """Run the Snakefile of ``tree`` with its package; returns (wall s, output)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(tree / "Snakefile"),
               "--configfile", str(config), "--cores", str(cores), *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=rundir, env=env, capture_output=True, text=True,
                          timeout=3600, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: snakemake {' '.join(args)} failed:\n"
                         f"{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def demo_run(tree: Path, rundir: Path, url: str, cores: int) -> dict:
    """One demo run from empty results: wall, machine CPU, Snakemake's CPU, jobs."""
    for stale in (rundir / "results", rundir / ".snakemake"):
        shutil.rmtree(stale, ignore_errors=True)
    config = write_config(rundir / "demo.yaml", url=url, results=rundir / "results")
    load = os.getloadavg()[0]
    cpu_before = machine_cpu_seconds()
    children_before = process_cpu_seconds(resource.RUSAGE_CHILDREN)
    wall, output = snakemake(tree, rundir, config, cores=cores)
    steps = re.findall(r"(\d+) of (\d+) steps", output)
    return {"load": load, "wall": wall, "machine_cpu": machine_cpu_seconds() - cpu_before,
            "snakemake_cpu": process_cpu_seconds(resource.RUSAGE_CHILDREN) - children_before,
            "jobs": int(steps[-1][1]) if steps else 0}


def dry_run(tree: Path, rundir: Path) -> dict:
    """The dry run of the placeholder program: wall and jobs planned."""
    wall, output = snakemake(tree, rundir, rundir / "config.yaml", "-n")
    total = re.search(r"^total\s+(\d+)", output, re.MULTILINE)
    return {"dry_wall": wall, "dry_jobs": int(total.group(1)) if total else 0}


def prepare_dry_run(tree: Path, rundir: Path, archive: Path) -> float:
    """The placeholder program's config and manifest (the checkpoint run) for ``tree``."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    (rundir / "config.yaml").write_text(
        f'programs: ["{DRYRUN_PROGRAM}"]\narchive:\n  source: local\n'
        f'  local_dir: "{archive}"\nresults: results\n', encoding="utf-8")
    return snakemake(tree, rundir, rundir / "config.yaml", "--until", "fetch_manifest")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="append", required=True, metavar="LABEL=REV",
                        help="a commit (or branch) to measure, with its label; twice or more")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exposures", type=int, default=24)
    parser.add_argument("--dryrun-exposures", type=int, default=1000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-demo: repeat only the dry runs")
    parser.add_argument("--workdir", default="download-jobs-work",
                        help="simulated data are kept here between runs")
    args = parser.parse_args(argv)
    versions = dict(item.split("=", 1) for item in args.version)
    if len(versions) < 2:
        parser.error("give at least two --version LABEL=REV")

    workdir = Path(args.workdir).resolve()
    started = time.perf_counter()
    if args.demo:
        simulate_program(workdir / "archive", args.exposures)
    placeholders = workdir / "placeholders"
    shutil.rmtree(placeholders, ignore_errors=True)
    write_placeholders(placeholders, args.dryrun_exposures)
    trees = {label: export(rev, workdir / "trees" / label) for label, rev in versions.items()}
    manifests = {label: prepare_dry_run(tree, workdir / "dryrun" / label, placeholders)
                 for label, tree in trees.items()}
    print(f"data and manifests ready in {time.perf_counter() - started:.1f} s (not counted)")

    runs = []
    with MastServer(workdir / "archive") as server:
        for repeat in range(args.repeats):
            # A B, then B A: a drift of the machine's load falls on both alike.
            order = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
            for label in order:
                rundir = workdir / "runs" / label
                rundir.mkdir(parents=True, exist_ok=True)
                run = {"label": label, "started": time.strftime("%H:%M:%S", time.gmtime()),
                       "load": os.getloadavg()[0], "wall": nan, "machine_cpu": nan,
                       "snakemake_cpu": nan, "jobs": 0}
                if args.demo:
                    run.update(demo_run(trees[label], rundir, server.url, args.cores))
                run.update(dry_run(trees[label], workdir / "dryrun" / label))
                runs.append(run)
                print(f"{run['started']} {label}: demo {run['wall']:.1f} s, dry run "
                      f"{run['dry_wall']:.1f} s", flush=True)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {now}; demo {args.exposures} exposures, "
          f"--cores {args.cores}; dry run {args.dryrun_exposures} exposures (manifest: "
          + ", ".join(f"{label} {s:.1f} s" for label, s in manifests.items()) + ")\n")
    n = args.exposures
    print("| start (UTC) | version | load before | demo wall (s) | machine CPU / exposure "
          "(s) | Snakemake + jobs CPU / exposure (s) | demo jobs | dry run (s) "
          "| dry-run jobs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run['started']} | {run['label']} | {run['load']:.1f} | {run['wall']:.1f} "
              f"| {run['machine_cpu'] / n:.2f} | {run['snakemake_cpu'] / n:.2f} "
              f"| {run['jobs']} | {run['dry_wall']:.1f} | {run['dry_jobs']} |")
    print("\nmedians per version:\n")
    print("| version | demo wall (s) | machine CPU / exposure (s) | Snakemake + jobs CPU / "
          "exposure (s) | dry run (s) |")
    print("|---|---:|---:|---:|---:|")
    for label in trees:
        mine = [run for run in runs if run["label"] == label]

        def median(key, mine=mine):
            return statistics.median(run[key] for run in mine)

        print(f"| {label} | {median('wall'):.1f} | {median('machine_cpu') / n:.2f} "
              f"| {median('snakemake_cpu') / n:.2f} | {median('dry_wall'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
