"""End-to-end benchmark of the workflow on the scaled demo program.

Simulates the demo program (default 24 exposures; not timed), serves it from the
loopback MAST, runs the whole workflow from an empty results directory and prints
the wall time and a table of per-rule times read from the rules' ``benchmark:``
files (Markdown, ready for docs/benchmarks.md).

Usage::

    .venv/bin/python benchmarks/workflow_benchmark.py [--exposures 24] [--cores 2]
        [--workdir DIR] [--fsync true|false] [--clean-method fft]

Every job runs in its own process (Snakemake's ``script:``), so the ``benchmark:`` files
measure the whole job, start-up included.  The summary line adds the machine's CPU time
over the run (everything on the machine: Snakemake, its jobs, the loopback MAST) and
that divided by the number of exposures: the CPU cost of one exposure, all in.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from nsclean.testing.demo import simulate_program, workflow_snakefile, write_config
from nsclean.testing.mastserver import MastServer

ROOT = Path(__file__).resolve().parents[1]

# Rules in pipeline order (the table follows it).
RULES = ("fetch_manifest", "fetch_file", "mask", "clean", "program_report", "run_report",
         "verify_run")


def rule_times(results: Path) -> dict[str, list[dict[str, float]]]:
    """Per-rule benchmark rows: wall seconds, CPU seconds and peak RSS (MB) per job."""
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = path.relative_to(results / "benchmarks").parts[0]
        with open(path, newline="") as handle:
            for record in csv.DictReader(handle, delimiter="\t"):
                rows[rule].append({
                    "s": float(record["s"]),
                    "cpu": float(record.get("cpu_time") or "nan"),
                    "rss": float(record.get("max_rss") or "nan"),
                })
    return rows


def process_cpu_seconds(who: int) -> float:
    """User + system CPU time of this process (``RUSAGE_SELF``) or of its waited-for
    children (``RUSAGE_CHILDREN``)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> float:
    """CPU seconds (user + system, all cores) the machine has spent since boot."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system = (int(value) for value in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def table(rows: dict[str, list[dict[str, float]]], n_exposures: int) -> str:
    """Markdown table per rule: jobs, mean/max/total wall, CPU and peak RSS of the jobs."""
    lines = ["| rule | jobs | mean wall (s) | max wall (s) | sum wall (s) | sum CPU (s) "
             "| wall per exposure (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rule in [*RULES, *sorted(set(rows) - set(RULES))]:
        jobs = rows.get(rule)
        if not jobs:
            continue
        walls = [j["s"] for j in jobs]
        lines.append(
            f"| {rule} | {len(jobs)} | {statistics.mean(walls):.2f} | {max(walls):.2f} "
            f"| {sum(walls):.1f} | {sum(j['cpu'] for j in jobs):.1f} "
            f"| {sum(walls) / n_exposures:.2f} "
            f"| {max(j['rss'] for j in jobs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns Snakemake's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=24)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", default="benchmark-work",
                        help="simulated data are kept here between runs")
    parser.add_argument("--fsync", choices=("true", "false"), default="false",
                        help="the workflow's fsync setting")
    parser.add_argument("--clean-method", choices=("auto", "readout", "fft", "median"),
                        help="the cleaner's method (config clean.method; default: the "
                             "config's default)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    archive, results = workdir / "archive", workdir / "results"
    started = time.perf_counter()
    simulate_program(archive, args.exposures)
    print(f"simulated data ready in {time.perf_counter() - started:.1f} s (not counted)")
    # A fresh start: no results, no Snakemake metadata.
    for stale in (results, workdir / ".snakemake"):
        shutil.rmtree(stale, ignore_errors=True)

    with MastServer(archive) as server:
        config = write_config(workdir / "benchmark.yaml", url=server.url, results=results)
        with open(config, "a", encoding="utf-8") as handle:
            handle.write(f"fsync: {args.fsync}\n")
        snakefile = workflow_snakefile(ROOT / "Snakefile")
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile),
                   "--configfile", str(config), "--cores", str(args.cores)]
        if args.clean_method:
            command += ["--config", f"clean={{method: {args.clean_method}}}"]
        started, cpu_before = time.perf_counter(), machine_cpu_seconds()
        self_before = process_cpu_seconds(resource.RUSAGE_SELF)
        status = subprocess.run(command, cwd=workdir, timeout=3600,
                                check=False).returncode
        wall = time.perf_counter() - started
        machine_cpu = machine_cpu_seconds() - cpu_before
        # This process is the loopback MAST (threads); its waited-for child is
        # Snakemake with its job processes.
        mast_cpu = process_cpu_seconds(resource.RUSAGE_SELF) - self_before
        snakemake_cpu = process_cpu_seconds(resource.RUSAGE_CHILDREN)

    rows = rule_times(results)
    n_jobs = sum(len(jobs) for jobs in rows.values())
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"load average before/after {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    print(f"{args.exposures} exposures, --cores {args.cores}: wall {wall:.1f} s end to end "
          f"(fetch included), {wall / args.exposures:.2f} s per exposure, {n_jobs} jobs, "
          f"exit status {status}; fsync: {args.fsync}; "
          f"clean method: {args.clean_method or 'default'}; "
          f"machine CPU over the run {machine_cpu:.0f} s (everything on the machine; "
          f"{machine_cpu / args.exposures:.2f} CPU-s per exposure), of "
          f"which Snakemake with its job processes {snakemake_cpu:.0f} s and the loopback "
          f"MAST {mast_cpu:.0f} s\n")
    print(table(rows, args.exposures))
    return status


if __name__ == "__main__":
    sys.exit(main())
