"""End-to-end benchmark of the workflow on the scaled demo program.

Simulates the demo program (default 24 exposures; not timed), serves it from the
loopback MAST, runs the whole workflow from an empty results directory and prints
the wall time and a table of per-rule times read from the rules' ``benchmark:``
files (Markdown, ready for docs/benchmarks.md).

Usage::

    .venv/bin/python benchmarks/workflow_benchmark.py [--exposures 24] [--cores 2]
        [--workdir DIR] [--warm-workers auto|true|false] [--fsync true|false]

Every run starts without a warm-worker server (a fresh socket directory), so the
server's start-up is counted.  Steps run by a warm worker appear in the ``benchmark:``
files with the small client's CPU only; the table adds the workers' CPU time, read from
the rule logs (``nsclean.workflow.warm``), and the machine's CPU time over the run.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from nsclean.testing.demo import simulate_program, workflow_snakefile, write_config
from nsclean.testing.mastserver import MastServer

# Rules in pipeline order (the table follows it).
RULES = ("fetch_manifest", "fetch_file", "mask", "clean", "qa", "program_report",
         "run_report")


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


WORKER_LINE = re.compile(r"nsclean\.warm: step \w+ ran in warm worker \d+: ([0-9.]+) CPU-s")


def worker_cpu(results: Path) -> dict[str, float]:
    """CPU seconds spent in warm workers per rule, from the rule logs."""
    cpu: dict[str, float] = defaultdict(float)
    for path in (results / "logs").rglob("*.log"):
        rule = path.relative_to(results / "logs").parts[0]
        for match in WORKER_LINE.finditer(path.read_text(errors="replace")):
            cpu[rule] += float(match.group(1))
    return cpu


def machine_cpu_seconds() -> float:
    """CPU seconds (user + system, all cores) the machine has spent since boot."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system = (int(value) for value in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def table(rows: dict[str, list[dict[str, float]]], n_exposures: int,
          workers: dict[str, float] | None = None) -> str:
    """Markdown table per rule: jobs, mean/max/total wall, CPU (job processes and warm
    workers) and peak RSS of the job processes."""
    workers = workers or {}
    lines = ["| rule | jobs | mean wall (s) | max wall (s) | sum wall (s) | sum CPU (s) "
             "| worker CPU (s) | per exposure (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rule in [*RULES, *sorted(set(rows) - set(RULES))]:
        jobs = rows.get(rule)
        if not jobs:
            continue
        walls = [j["s"] for j in jobs]
        lines.append(
            f"| {rule} | {len(jobs)} | {statistics.mean(walls):.2f} | {max(walls):.2f} "
            f"| {sum(walls):.1f} | {sum(j['cpu'] for j in jobs):.1f} "
            f"| {workers.get(rule, 0.0):.1f} | {sum(walls) / n_exposures:.2f} "
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
    parser.add_argument("--warm-workers", choices=("auto", "true", "false"), default="auto",
                        help="the workflow's warm_workers setting")
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
            handle.write(f"warm_workers: {args.warm_workers}\nfsync: {args.fsync}\n")
        # A socket directory of its own: no server from an earlier run is reused.
        sockets = tempfile.mkdtemp(prefix="nsc-bench-")
        environment = {**os.environ, "XDG_RUNTIME_DIR": sockets}
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(workflow_snakefile()),
                   "--configfile", str(config), "--cores", str(args.cores), "--quiet",
                   "rules"]
        started, cpu_before = time.perf_counter(), machine_cpu_seconds()
        self_before = process_cpu_seconds(resource.RUSAGE_SELF)
        status = subprocess.run(command, cwd=workdir, env=environment, timeout=3600,
                                check=False).returncode
        wall = time.perf_counter() - started
        machine_cpu = machine_cpu_seconds() - cpu_before
        # This process is the loopback MAST (threads); its waited-for child is
        # Snakemake with its job processes.  The warm-worker server is started detached
        # by a job, so its CPU is in neither.
        mast_cpu = process_cpu_seconds(resource.RUSAGE_SELF) - self_before
        snakemake_cpu = process_cpu_seconds(resource.RUSAGE_CHILDREN)
    # The server, if still idling, exits on its own; its socket directory goes now.
    shutil.rmtree(sockets, ignore_errors=True)

    rows = rule_times(results)
    n_jobs = sum(len(jobs) for jobs in rows.values())
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"load average before/after {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    print(f"{args.exposures} exposures, --cores {args.cores}: wall {wall:.1f} s end to end "
          f"(fetch included), {wall / args.exposures:.2f} s per exposure, {n_jobs} jobs, "
          f"exit status {status}; warm_workers: {args.warm_workers}; fsync: {args.fsync}; "
          f"machine CPU over the run {machine_cpu:.0f} s (everything on the machine), of "
          f"which Snakemake with its job processes {snakemake_cpu:.0f} s and the loopback "
          f"MAST {mast_cpu:.0f} s\n")
    print(table(rows, args.exposures, worker_cpu(results)))
    return status


if __name__ == "__main__":
    sys.exit(main())
