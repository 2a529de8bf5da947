"""The built-in demo: a synthetic program, served by a loopback MAST, reduced by the workflow.

``python -m nsclean.testing.demo`` runs the whole workflow the way an astronomer runs it on a
real program, but offline:

1. simulate a small NIRSpec program with :mod:`nsclean.testing.simulate` (IFU on both detectors,
   MOS, fixed slit and a BOTS subarray) into ``<workdir>/archive`` -- once; a second run
   reuses the files;
2. serve that directory with :class:`nsclean.testing.mastserver.MastServer` on 127.0.0.1 (an
   ephemeral port), so that the fetch rules query and download it through astroquery
   exactly as they would from MAST;
3. run Snakemake on the repository's workflow with a config whose ``archive.url`` points
   at that server and whose ``results`` is ``<workdir>/results``;
4. stop the server and print where the report is.

``MAST_API_TOKEN`` is not passed to the workflow (the loopback archive needs none).

The exit status is Snakemake's: 0 when every exposure was cleaned.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DEMO_PROGRAM", "main", "simulate_program", "workflow_snakefile", "write_config"]

#: Program number of the synthetic demo program.
DEMO_PROGRAM = "09999"
#: Exposures of the default demo (the full plan of ``nsclean.testing.simulate.make_demo_program``).
DEFAULT_EXPOSURES = 9

# Exposures beyond make_demo_program's plan repeat its modes in further visits, so
# that a scaled demo (the 24-exposure benchmark) keeps the same mix of modes.
_EXTRA_PLAN = (
    # kind, detector, observation, readout
    ("ifu", "NRS1", 1, "IRS2"),
    ("ifu", "NRS2", 1, "IRS2"),
    ("mos", "NRS1", 2, "IRS2"),
    ("mos", "NRS2", 2, "IRS2"),
    ("fs", "NRS1", 3, "NRS"),
    ("fs", "NRS2", 3, "NRS"),
    ("bots", "NRS1", 4, "NRS"),
)


def workflow_snakefile(path: str | os.PathLike = "Snakefile") -> Path:
    """The workflow's top-level ``Snakefile``, checked (default: in the working directory,
    the clone the README's demo command runs in; the package does not look for it).

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    """
    snakefile = Path(path).resolve()
    if not snakefile.is_file():
        raise FileNotFoundError(
            f"{snakefile} not found: run the demo from the workflow's clone, or give its "
            "Snakefile with --snakefile"
        )
    return snakefile


def simulate_program(directory, n_exposures=DEFAULT_EXPOSURES, *, program=DEMO_PROGRAM,
                     seed=2024) -> list[Path]:
    """Write the synthetic demo program (rate and cal files) into ``directory``.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the files go (the loopback MAST serves this directory).
    n_exposures : int
        Number of exposures, at least 1.  Up to the plan of
        :func:`nsclean.testing.simulate.make_demo_program` it is that plan's first exposures;
        beyond, its modes are repeated in further visits.
    program : str
        Program number.
    seed : int
        Master seed.

    Returns
    -------
    list of pathlib.Path
        The rate files, in plan order.  Exposures already on disk are not simulated
        again.
    """
    from nsclean.testing import simulate

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_exposures = int(n_exposures)
    if n_exposures < 1:
        raise ValueError(f"n_exposures must be >= 1; got {n_exposures}")
    n_base = min(n_exposures, DEFAULT_EXPOSURES)
    marker = directory / f".demo-{program}-{seed}-{n_base}"
    if marker.exists():
        rates = sorted(directory.glob(f"jw{program}*_rate.fits"))[:n_base]
    else:
        pairs = simulate.make_demo_program(directory, program=program, seed=seed,
                                           n_exposures=n_base)
        rates = [rate for rate, _ in pairs]
        marker.touch()
    for index in range(n_exposures - n_base):
        kind, detector, observation, readout = _EXTRA_PLAN[index % len(_EXTRA_PLAN)]
        visit = 2 + index // len(_EXTRA_PLAN)
        stem = simulate.make_stem(program, observation, visit, 1, detector)
        rate = directory / f"{stem}_rate.fits"
        if not (rate.exists() and (directory / f"{stem}_cal.fits").exists()):
            sim = simulate.simulate_exposure(kind, detector, readout=readout,
                                             seed=seed * 1000 + index, program=program,
                                             observation=observation, visit=visit)
            rate, _ = simulate.write_exposure(sim, directory)
        rates.append(Path(rate))
    return rates


def write_config(path, *, url, results, program=DEMO_PROGRAM) -> Path:
    """Write the demo's workflow config: only the keys of the stable interface.

    Parameters
    ----------
    path : str or os.PathLike
        Config file to write.
    url : str
        Base URL of the (loopback) MAST server.
    results : str or os.PathLike
        Results directory.
    program : str
        Program number.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.write_text(
        "# Written by python -m nsclean.testing.demo\n"
        f'programs: ["{program}"]\n'
        "archive:\n"
        "  source: mast\n"
        f'  url: "{url}"\n'
        f'results: "{Path(results).as_posix()}"\n',
        encoding="utf-8",
    )
    return path


def _demo_environment() -> dict[str, str]:
    """The environment for the demo's Snakemake: without ``MAST_API_TOKEN``.

    The demo's loopback archive is public and knows no token; a real token set for
    other work would be refused by it ("MAST did not accept the token"), and it has no
    business leaving this process anyway.
    """
    environment = dict(os.environ)
    if environment.pop("MAST_API_TOKEN", None) is not None:
        print("nsclean demo: MAST_API_TOKEN is set; the demo's loopback archive needs no "
              "token, so it is not passed on", flush=True)
    return environment


def main(argv: list[str] | None = None) -> int:
    """Run the demo; see the module documentation.

    Parameters
    ----------
    argv : list of str, optional
        ``[--workdir DIR] [--exposures N] [--cores N] [--timeout S] [-- SNAKEMAKE ARGS]``.

    Returns
    -------
    int
        Snakemake's exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m nsclean.testing.demo",
        description="Simulate a small NIRSpec program, serve it from a loopback MAST and "
                    "reduce it with the nsclean workflow.")
    parser.add_argument("--workdir", default="demo",
                        help="working directory: archive/ (simulated data), results/, "
                             "Snakemake's .snakemake/ (default: ./demo)")
    parser.add_argument("--exposures", type=int, default=DEFAULT_EXPOSURES,
                        help=f"number of exposures (default {DEFAULT_EXPOSURES})")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores for Snakemake (default: all)")
    parser.add_argument("--snakefile", default="Snakefile",
                        help="the workflow's Snakefile (default: ./Snakefile, the clone's)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="give up after this many seconds (default 3600)")
    parser.add_argument("snakemake_args", nargs="*",
                        help="further Snakemake arguments, after `--`")
    args = parser.parse_args(argv)

    from nsclean.testing.mastserver import MastServer

    workdir = Path(args.workdir).resolve()
    archive = workdir / "archive"
    results = workdir / "results"
    try:
        snakefile = workflow_snakefile(args.snakefile)
    except FileNotFoundError as error:
        parser.error(str(error))

    start = time.perf_counter()
    print(f"nsclean demo: simulating {args.exposures} exposures of program {DEMO_PROGRAM} "
          f"in {archive}", flush=True)
    simulate_program(archive, args.exposures)
    print(f"nsclean demo: data ready after {time.perf_counter() - start:.1f} s", flush=True)

    # Any free port: archive.url is not among the rules' params, so a new port does not
    # make Snakemake fetch again.
    server = MastServer(archive).start()
    try:
        config = write_config(workdir / "config.yaml", url=server.url, results=results)
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile),
                   "--directory", str(workdir), "--configfile", str(config),
                   "--cores", str(args.cores), *args.snakemake_args]
        print(f"nsclean demo: loopback MAST at {server.url}; running Snakemake", flush=True)
        started = time.perf_counter()
        try:
            status = subprocess.run(command, timeout=args.timeout, check=False,
                                    env=_demo_environment()).returncode
        except subprocess.TimeoutExpired:
            print(f"nsclean demo: Snakemake did not finish in {args.timeout:.0f} s",
                  file=sys.stderr)
            return 124
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    report = results / "report.html"
    print(f"nsclean demo: workflow finished in {elapsed:.1f} s with exit status {status}")
    if report.exists():
        print(f"nsclean demo: report: {report}")
        print(f"nsclean demo: table:  {results / 'report.csv'}")
    else:
        print("nsclean demo: no report was written; see the Snakemake log above",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
