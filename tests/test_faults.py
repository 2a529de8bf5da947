"""The workflow under faults: a failing archive, interruptions, reruns, untouched inputs.

Every test runs the real workflow (Snakemake in a subprocess, the real astroquery
client and downloader) against the loopback MAST server, on a small program of three
BOTS subarray exposures simulated once for the module.  Faults are injected at the
server (``nsclean.testing.mastserver`` fault injection) or by signalling the real processes.

The reference is one uninterrupted run (``reference`` fixture); its downloads went
through injected faults, which must not change a single byte of the products: the
interrupted runs below are compared with it bit for bit.

Every subprocess is bounded (``timeout -s KILL`` or a process-group kill), so that no
test can hang.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from workflow_helpers import assert_same_fits, read_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
PROGRAM = "04244"
N_EXPOSURES = 3
RUN_TIMEOUT = 600  # one workflow run (a 2-core machine shared with other jobs)
WAIT_TIMEOUT = 300  # waiting for a run to reach the point where it is interrupted
# The per-exposure rule scripts, as Snakemake's script: runs them (a copy named
# .snakemake/scripts/tmp<random>.<script>: the Python process running one has that path
# as an argument of its own; its shell parent has the whole command line in one).
RULE_SCRIPTS = tuple(f".{name}" for name in ("make_mask.py", "clean_exposure.py"))


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------
def snakemake_command(config, *args):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--cores", "2",
            "--configfile", str(config), *args]


def run_workflow(workdir, config, *args, timeout=RUN_TIMEOUT):
    """Run the workflow to its end under ``timeout -s KILL``; stdout and stderr merged."""
    command = ["timeout", "-s", "KILL", str(timeout), *snakemake_command(config, *args)]
    result = subprocess.run(command, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout + 30,
                            check=False)
    assert result.returncode not in (-9, 137), f"killed after {timeout} s:\n{result.stdout}"
    return result


def write_config(workdir, url, **archive):
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"programs": [PROGRAM], "archive": {"url": url, **archive},
              "results": "results"}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_checksums(directory):
    """sha256 and mtime of every file under a directory (hidden files included)."""
    return {str(p.relative_to(directory)): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def leftover_temporaries(results):
    return [p for p in results.rglob("*") if p.name.endswith((".part", ".tmp"))]


def get_requests(server, name):
    return [r for r in server.requests if r.method == "GET" and r.target == name]


def job_counts(output):
    """Job counts from the "Job stats" table Snakemake prints before running."""
    if "Job stats:" not in output:
        return {}
    table = output.split("Job stats:", 1)[1].split("\n\n", 2)
    table = "\n".join(table[:2])
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table,
                                                           re.MULTILINE)
            if name != "total"}


def assert_same_products(results, reference):
    """The products of a run equal those of the reference run, bit for bit."""
    expected_stems = sorted(p.name for p in (reference / PROGRAM).glob("jw*") if p.is_dir())
    stems = sorted(p.name for p in (results / PROGRAM).glob("jw*") if p.is_dir())
    assert stems == expected_stems and len(stems) == N_EXPOSURES
    for stem in stems:
        folder, expected = results / PROGRAM / stem, reference / PROGRAM / stem
        assert_same_fits(folder / f"{stem}_nsclean_rate.fits",
                         expected / f"{stem}_nsclean_rate.fits")
        for name in (f"{stem}_mask.fits", f"{stem}_mask.json", f"{stem}_clean.json",
                     f"{stem}_qa.json"):
            assert (folder / name).read_bytes() == (expected / name).read_bytes(), name
    for table in ("report.csv", f"{PROGRAM}/report.csv"):
        rows, expected_rows = read_report(results, table=table), \
            read_report(reference, table=table)
        assert rows == expected_rows, table
    assert (results / "run_status.json").read_bytes() == \
        (reference / "run_status.json").read_bytes()


# ------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three BOTS exposures (small subarrays: fast), as the archive serves them: a rate
    file with its calints (a time series has no _cal)."""
    from nsclean.testing import simulate

    directory = tmp_path_factory.mktemp("served")
    stems = []
    for exposure in range(1, N_EXPOSURES + 1):
        sim = simulate.simulate_exposure("bots", "NRS1", readout="NRS", seed=40 + exposure,
                                         program=PROGRAM, observation=1, exposure=exposure)
        rate, _ = simulate.write_exposure(sim, directory)
        stems.append(rate.name.removesuffix("_rate.fits"))
    return directory, stems


@pytest.fixture(scope="module")
def server(served):
    """A fault-free loopback MAST for the runs that are interrupted or repeated."""
    from nsclean.testing.mastserver import MastServer

    with MastServer(served[0]) as mast:
        yield mast


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory):
    """One uninterrupted run whose downloads meet a server error, a cut connection, a
    short body and a 503, each once; yields the run, the server and the paths."""
    from nsclean.testing.mastserver import MastServer

    directory, stems = served
    faults = {f"{stems[0]}_rate.fits": ["500", "cut", "wrong_size"],
              f"{stems[1]}_calints.fits": ["503"]}
    workdir = tmp_path_factory.mktemp("reference")
    with MastServer(directory, faults=faults) as mast:
        config = write_config(workdir, mast.url, retries=3)
        started = time.monotonic()
        result = run_workflow(workdir, config)
        print(f"reference run: {time.monotonic() - started:.1f} s")
        yield {"result": result, "server": mast, "workdir": workdir, "config": config,
               "results": workdir / "results", "stems": stems, "served": directory}


# ------------------------------------------------------------------------------------
# the archive failing mid-download
# ------------------------------------------------------------------------------------
def test_downloads_failing_midway_are_retried_and_complete(reference):
    result, results, stems = reference["result"], reference["results"], reference["stems"]
    assert result.returncode == 0, result.stdout[-5000:]
    assert {row["status"] for row in read_report(results)} == {"cleaned"}

    # The server really failed those requests, and the client came back for more.
    rate = get_requests(reference["server"], f"{stems[0]}_rate.fits")
    assert [r.fault for r in rate] == ["500", "cut", "wrong_size", ""], rate
    assert rate[-1].status == 200
    cal = get_requests(reference["server"], f"{stems[1]}_calints.fits")
    assert [(r.status, r.fault) for r in cal] == [(503, "503"), (200, "")], cal
    log = (results / "logs" / "fetch_file" / PROGRAM / f"{stems[0]}_rate.fits.log").read_text()
    assert "attempt 1 failed: HTTP 500" in log
    assert "attempt 2 failed: connection broken" in log or "attempt 2 failed: received" in log
    assert "attempt 3 failed: the archive sends" in log  # the short body is not accepted
    assert "4 attempts" in log

    # What is on disk is exactly what the archive serves, and nothing half-written.
    archive = results / PROGRAM / "archive"
    fits_files = sorted(p.name for p in archive.iterdir() if p.name.endswith(".fits"))
    assert fits_files == sorted(f"{s}_{k}.fits" for s in stems for k in ("rate", "calints"))
    for name in fits_files:
        assert (archive / name).read_bytes() == (reference["served"] / name).read_bytes(), name
    assert leftover_temporaries(results) == []


def test_refused_and_persistently_failing_downloads_fail_their_exposure_only(served,
                                                                               tmp_path):
    """An exclusive-access file (401 without a token) and a file the server never
    delivers (500 on every attempt): those two exposures are failed with the archive's
    reason, the third is cleaned, the reports are written, and the exit status says the
    run was not clean.  No partial file is left behind."""
    from nsclean.testing.mastserver import MastServer

    directory, stems = served
    good, refused, broken = stems
    with MastServer(directory, exclusive=[f"{refused}_rate.fits"],
                    faults={f"{broken}_calints.fits": "500"}) as mast:
        config = write_config(tmp_path, mast.url, retries=1)
        env_token = os.environ.pop("MAST_API_TOKEN", None)
        try:
            result = run_workflow(tmp_path, config)
        finally:
            if env_token is not None:
                os.environ["MAST_API_TOKEN"] = env_token
        broken_gets = get_requests(mast, f"{broken}_calints.fits")
    output = result.stdout
    assert result.returncode != 0, "a run with failed exposures must not exit 0"
    assert [r.status for r in broken_gets] == [500, 500]  # retried once, as configured

    results = tmp_path / "results"
    rows = {row["stem"]: row for row in read_report(results)}
    assert set(rows) == set(stems)
    assert rows[good]["status"] == "cleaned"
    assert rows[refused]["status"] == "failed"
    assert "HTTP 401" in rows[refused]["reason"]
    assert "MAST_API_TOKEN" in rows[refused]["reason"]
    assert f"{refused}_rate.fits" in rows[refused]["reason"]
    assert rows[broken]["status"] == "failed"
    assert f"{broken}_calints.fits" in rows[broken]["reason"]
    assert "HTTP 500" in rows[broken]["reason"]
    assert rows[refused]["cleaned_file"] == rows[broken]["cleaned_file"] == ""
    assert (results / "report.html").is_file()
    assert not (results / "run_status.json").exists()
    assert "2 of 3 exposures failed" in output

    # Nothing half-written: every file of the archive folder is either exactly the
    # served file or, for the two that never came, not a FITS file at all (empty).
    archive = results / PROGRAM / "archive"
    assert leftover_temporaries(results) == []
    for path in archive.iterdir():
        if path.name in (f"{refused}_rate.fits", f"{broken}_calints.fits"):
            assert path.stat().st_size == 0, path
        else:
            assert path.read_bytes() == (directory / path.name).read_bytes(), path


# ------------------------------------------------------------------------------------
# interruptions
# ------------------------------------------------------------------------------------
def _default_sigint():
    # A shell without job control starts background commands with SIGINT ignored, and
    # an ignored signal stays ignored across exec (Python then installs no Ctrl-C
    # handler): the workflow gets the default, as a terminal's foreground job does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_workflow(workdir, config):
    """Start the workflow in its own process group (as a shell runs a command)."""
    log = open(workdir / "interrupted.log", "w", encoding="utf-8")  # noqa: SIM115
    process = subprocess.Popen(snakemake_command(config), cwd=workdir, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_default_sigint)
    process.log = log
    return process


def stop_group(process):
    """Kill whatever is left of the process group and close its log."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    finally:
        process.log.close()


def wait_until(predicate, process, what):
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the workflow ended (exit {process.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"no {what} after {WAIT_TIMEOUT} s")


def running_rule_script(workdir):
    """A process of this run executing a rule script (mask, clean, QA): (pid, script)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if Path(cwd) != workdir:
            continue
        for arg in args:
            name = arg.decode(errors="replace")
            if name.endswith(RULE_SCRIPTS) and " " not in name:
                return int(entry.name), name
    return None


def test_sigint_then_rerun_gives_the_uninterrupted_products(reference, served, tmp_path):
    from nsclean.testing.mastserver import MastServer

    assert reference["result"].returncode == 0
    directory, stems = served
    # The last exposure's download stalls once for 10 s, so the run is still going when
    # the first mask appears and Ctrl-C comes (the rest of the run takes a second or two).
    with MastServer(directory, slow_seconds=10.0,
                    faults={f"{stems[-1]}_calints.fits": ["slow"]}) as server:
        config = write_config(tmp_path, server.url)
        results = tmp_path / "results"
        process = start_workflow(tmp_path, config)
        try:
            wait_until(lambda: list(results.glob(f"{PROGRAM}/*/*_mask.json")), process,
                       "first mask")
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole process group
            process.wait(timeout=120)
        finally:
            stop_group(process)
        log = (tmp_path / "interrupted.log").read_text()
        assert process.returncode != 0, log[-3000:]
        assert not (results / "run_status.json").exists(), "interrupted too late"

        again = run_workflow(tmp_path, config)
    assert again.returncode == 0, again.stdout[-5000:]
    assert_same_products(results, reference["results"])
    assert leftover_temporaries(results) == []


def test_sigkill_of_a_job_then_rerun_gives_the_uninterrupted_products(reference, server,
                                                                     tmp_path):
    assert reference["result"].returncode == 0
    config = write_config(tmp_path, server.url)
    results = tmp_path / "results"
    process = start_workflow(tmp_path, config)
    try:
        pid, script = wait_until(lambda: running_rule_script(tmp_path), process,
                                 "running rule script")
        os.kill(pid, signal.SIGKILL)
        process.wait(timeout=RUN_TIMEOUT)
    finally:
        stop_group(process)
    log = (tmp_path / "interrupted.log").read_text()
    assert process.returncode != 0, f"killed {script}, yet the run succeeded:\n{log[-3000:]}"
    assert "Exiting because a job execution failed" in log
    assert not (results / "run_status.json").exists()

    again = run_workflow(tmp_path, config)
    assert again.returncode == 0, again.stdout[-5000:]
    assert_same_products(results, reference["results"])
    assert leftover_temporaries(results) == []


# ------------------------------------------------------------------------------------
# inputs are never modified; reruns
# ------------------------------------------------------------------------------------
def test_inputs_unchanged_by_reruns_and_an_option_change(reference, server, tmp_path):
    """A second full run and a run with another cleaner option leave every downloaded
    file as it was (content and modification time), and the option change rebuilds
    the cleaned files, QA and reports only."""
    assert reference["result"].returncode == 0
    # A copy of the finished reference run (Snakemake's records included), so that the
    # reference itself stays as it was for the other tests.
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir, symlinks=True)
    config = write_config(workdir, server.url, retries=3)
    archive = workdir / "results" / PROGRAM / "archive"
    before = tree_checksums(archive)
    assert len(before) == 2 * N_EXPOSURES
    for name, (digest, _) in before.items():
        assert digest == sha256(reference["served"] / name), name

    again = run_workflow(workdir, config)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]
    assert tree_checksums(archive) == before

    masks = tree_checksums(workdir / "results" / PROGRAM / reference["stems"][0])
    changed = yaml.safe_load(config.read_text())
    changed["clean"] = {"cutoff": 1 / 200}
    config.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
    rerun = run_workflow(workdir, config)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert job_counts(rerun.stdout) == {"clean": N_EXPOSURES, "program_report": 1,
                                        "run_report": 1, "verify_run": 1, "all": 1}
    assert tree_checksums(archive) == before
    stem = reference["stems"][0]
    after = tree_checksums(workdir / "results" / PROGRAM / stem)
    for name in (f"{stem}_mask.fits", f"{stem}_mask.json"):
        assert after[name] == masks[name], name  # not rebuilt
    assert after[f"{stem}_nsclean_rate.fits"][0] != masks[f"{stem}_nsclean_rate.fits"][0]


# ------------------------------------------------------------------------------------
# malformed configuration: the cases test_workflow.py does not have
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"clean": {"outlier_iterations": "two"}}, ["clean.outlier_iterations", "'two'"]),
        ({"programs": "1345"}, ["programs", "'1345'"]),
        ({"programs": ["jw01345"]}, ["programs.0", "'jw01345'"]),
    ],
)
def test_malformed_config_stops_naming_the_key(tmp_path, section, expected):
    config = {"programs": ["1345"], **section}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(["timeout", "-s", "KILL", "120",
                             *snakemake_command(path, "--dry-run")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=150, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid configuration at" in output, output[-3000:]
    for text in expected:
        assert text in output, output[-3000:]
    assert not (tmp_path / "results").exists()
