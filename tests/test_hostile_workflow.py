"""The workflow under hostile conditions: a hostile archive with a token in the
environment, a local directory with damaged files, a results directory another run holds
or that is a file, and a full disk.

Each run is the real workflow (Snakemake in a subprocess, bounded by ``timeout -s KILL``)
on small simulated BOTS subarray exposures.  The promise checked everywhere: one bad
exposure never stops the others, the reports are written, and the token is never
written anywhere nor sent to any host but the archive.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hostile_server import HostileMast
from workflow_helpers import read_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
PROGRAM = "04245"
TOKEN = "tok-51c0ffee-SECRET-workflow"
RUN_TIMEOUT = 600
# The exposures are BOTS: their cal product is a _calints (stage 2 of a time series
# writes no _cal, and MAST serves none).
CAL = "_calints.fits"


def snakemake_command(config, *args):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--cores", "2",
            "--configfile", str(config), *args]


def run_workflow(workdir, config, *args, env=None, timeout=RUN_TIMEOUT):
    command = ["timeout", "-s", "KILL", str(timeout), *snakemake_command(config, *args)]
    result = subprocess.run(command, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout + 30,
                            check=False, env=env)
    assert result.returncode not in (-9, 137), f"killed after {timeout} s:\n{result.stdout}"
    return result


def write_config(workdir, **config):
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"programs": [PROGRAM], "results": "results", **config}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def files_containing(directory, secret):
    """Every file under ``directory`` (hidden ones, .snakemake/ included) whose bytes
    contain ``secret``."""
    found = []
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Five small BOTS exposures, as the archive serves them."""
    from nsclean.testing import simulate

    directory = tmp_path_factory.mktemp("served")
    stems = []
    for exposure in range(1, 6):
        sim = simulate.simulate_exposure("bots", "NRS1", readout="NRS", seed=60 + exposure,
                                         program=PROGRAM, observation=1, exposure=exposure)
        rate, cal = simulate.write_exposure(sim, directory)
        assert cal.name == rate.name.replace("_rate.fits", CAL)
        stems.append(rate.name.removesuffix("_rate.fits"))
    return directory, stems


# ------------------------------------------------------------------------------------
# a hostile archive, with a token in the environment
# ------------------------------------------------------------------------------------
def test_hostile_archive_fails_its_exposures_alone_and_never_leaks_the_token(served,
                                                                              tmp_path):
    """exclusive: needs the token; redirected: the archive sends the file to another
    host (127.0.0.2), which must not get the token; escaping: listed as ``../../``;
    dripping: one byte every 0.3 s; odd: a Content-Length that is not a number.  The
    exclusive file is also listed twice."""
    directory, stems = served
    exclusive, redirected, escaping, dripping, odd = stems
    workdir = tmp_path / "run"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with HostileMast(directory, host="127.0.0.2", tokens={TOKEN: "other"}) as other, \
            HostileMast(directory, tokens={TOKEN: "Ada"},
                        exclusive=[f"{exclusive}_rate.fits"],
                        duplicate={f"{exclusive}_rate.fits": None},
                        redirect={f"{redirected}_rate.fits": other.url},
                        rename={f"{escaping}_rate.fits": f"../../{escaping}_rate.fits"},
                        drip={f"{dripping}{CAL}": 0.3},
                        bad_length={f"{odd}{CAL}": "12abc"}) as mast:
        config = write_config(workdir, archive={"url": mast.url, "retries": 1,
                                                "deadline": 2})
        env = {**os.environ, "MAST_API_TOKEN": TOKEN, "TMPDIR": str(temporary)}
        result = run_workflow(workdir, config, env=env)

    output = result.stdout
    assert result.returncode != 0, "a run with failed exposures must not exit 0"
    results = workdir / "results"
    assert (results / "report.csv").is_file(), output[-5000:]
    rows = {row["stem"]: row for row in read_report(results)}
    assert set(rows) == set(stems), output[-5000:]
    assert rows[exclusive]["status"] == "cleaned"
    assert rows[redirected]["status"] == "cleaned"
    assert rows[escaping]["status"] == "failed" and "is a path" in rows[escaping]["reason"]
    assert rows[dripping]["status"] == "failed" and "too slow" in rows[dripping]["reason"]
    assert rows[odd]["status"] == "failed" and "Content-Length" in rows[odd]["reason"]
    assert (results / "report.html").is_file()
    assert "3 of 5 exposures failed" in output

    # nothing outside the results (the ../../ name stayed a failed row)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]
    assert not (results / PROGRAM / "archive" / f"{escaping}_rate.fits").exists()
    # the token: the archive got it; the other host received both requests, never it
    assert any(TOKEN in cookie for cookie in mast.cookies_seen())
    assert other.headers_seen and not any(TOKEN in str(h) for _, h in other.headers_seen)
    assert not any(r.authenticated for r in other.requests)
    # ... and it is written nowhere: results, logs, .snakemake/, the temporary directory
    assert (workdir / ".snakemake").is_dir()
    assert files_containing(workdir, TOKEN) == []
    assert files_containing(temporary, TOKEN) == []
    assert TOKEN not in output


# ------------------------------------------------------------------------------------
# a local directory with damaged files; a results directory another run held
# ------------------------------------------------------------------------------------
def test_local_source_with_damaged_files_reports_every_file(served, tmp_path):
    directory, stems = served
    local = tmp_path / "local"
    local.mkdir()
    for stem in stems[:2]:
        for suffix in ("_rate.fits", CAL):
            shutil.copy(directory / f"{stem}{suffix}", local)
    shutil.copy(local / f"{stems[0]}_rate.fits", local / f"{stems[0]} (1)_rate.fits")
    (local / f"{stems[2]}_rate.fits").write_bytes(b"")  # an interrupted copy
    shutil.copy(directory / f"{stems[2]}{CAL}", local)
    (local / f"{stems[3]}_rate.fits").write_text("<html><body>Forbidden</body></html>")
    shutil.copy(directory / f"{stems[3]}{CAL}", local)
    before = {p.name: p.read_bytes() for p in local.iterdir()}

    workdir = tmp_path / "run"
    config = write_config(workdir, archive={"source": "local", "local_dir": str(local)})
    # a lock left by a run that was killed: its PID is gone, so this run takes over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    results = workdir / "results"
    results.mkdir(parents=True)
    (results / ".nsclean-run.lock").write_text(
        f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}", '
        '"workdir": "/gone", "started": "earlier"}')
    result = run_workflow(workdir, config)

    assert result.returncode != 0
    rows = {row["stem"]: row for row in read_report(results)}
    assert rows[stems[0]]["status"] == rows[stems[1]]["status"] == "cleaned", \
        result.stdout[-5000:]
    assert rows[stems[2]]["status"] == "failed" and "empty" in rows[stems[2]]["reason"]
    assert rows[stems[3]]["status"] == "failed" and "HTML" in rows[stems[3]]["reason"]
    assert rows[f"{stems[0]} (1)"]["status"] == "skipped"
    assert (results / "report.html").is_file()
    assert {p.name: p.read_bytes() for p in local.iterdir()} == before
    assert not (results / ".nsclean-run.lock").exists()  # released at the end


def test_a_results_directory_held_by_another_run_is_refused(tmp_path):
    workdir = tmp_path / "second"
    config = write_config(workdir, results=str(tmp_path / "shared"),
                          archive={"source": "local", "local_dir": str(tmp_path)})
    shared = tmp_path / "shared"
    shared.mkdir()
    # held by a live process (this test) of this host, started elsewhere
    lock = shared / ".nsclean-run.lock"
    lock.write_text(f'{{"pid": {os.getpid()}, "host": "{socket.gethostname()}", '
                    '"workdir": "/somewhere/first", "started": "2026-12-04T21:00:00"}')
    result = run_workflow(workdir, config, timeout=120)
    assert result.returncode != 0
    assert f"in use by another nsclean run (PID {os.getpid()}" in result.stdout
    assert "/somewhere/first" in result.stdout and str(lock) in result.stdout
    assert "Traceback" not in result.stdout
    assert sorted(p.name for p in shared.iterdir()) == [".nsclean-run.lock"]  # untouched
    assert str(os.getpid()) in lock.read_text()


@pytest.mark.parametrize("results", ["file", "file/sub"])
def test_results_that_cannot_be_a_directory_stops_in_one_line(tmp_path, results):
    (tmp_path / "file").write_text("not a directory")
    config = write_config(tmp_path / "run", results=str(tmp_path / results))
    result = run_workflow(tmp_path / "run", config, "--dry-run", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout
    assert f"results: {tmp_path / results}" in result.stdout
    assert "a file, not a directory" in result.stdout
    assert (tmp_path / "file").read_text() == "not a directory"


# ------------------------------------------------------------------------------------
# a full disk
# ------------------------------------------------------------------------------------
def _can_mount_tmpfs():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs "
                            "/mnt && umount /mnt"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(),
                    reason="needs a private tmpfs (unshare -m and mount: root or "
                           "user namespaces)")
def test_a_full_disk_is_the_recorded_reason_even_when_the_log_cannot_be_written(served,
                                                                                tmp_path):
    """The mask and download steps on a nearly full file system (a private tmpfs): the
    mask file and the downloaded file do not fit, the log cannot be written (it is
    /dev/full); the status records still say the disk was full, and so does stderr."""
    directory, stems = served
    stem = stems[0]
    mount = tmp_path / "disk"
    mount.mkdir()
    code = textwrap.dedent(f"""
        import os, sys
        disk = {str(mount)!r}
        served = {str(directory)!r}
        os.makedirs(disk + "/{stem}")
        os.symlink("/dev/full", disk + "/mask.log")
        # fill the disk but for 12 kB: the status record fits, the mask does not
        filler = os.open(disk + "/filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, bytes(4096))
        except OSError:
            os.close(filler)
        filler_size = os.path.getsize(disk + "/filler")
        os.truncate(disk + "/filler", filler_size - 12288)
        from nsclean.workflow import steps
        steps.mask({{"rate": served + "/{stem}_rate.fits", "cal": served + "/{stem}{CAL}"}},
                   {{"mask": disk + "/{stem}/m.fits", "status": disk + "/{stem}/m.json"}},
                   {{"options": {{}}}}, disk + "/mask.log", {{}})
        print("STATUS=" + open(disk + "/{stem}/m.json").read().replace("\\n", " "),
              file=sys.__stdout__)
        # the download step: a local copy that does not fit (a rate file is ~1 MB)
        from nsclean.archive import archive
        manifest = archive.write_manifest(archive.fetch_manifest(source="local",
                                          local_dir=served), disk + "/manifest.csv")
        steps.fetch_file({{"manifest": disk + "/manifest.csv"}},
                         {{"file": disk + "/archive/{stem}_rate.fits",
                           "status": disk + "/{stem}/download.json"}},
                         {{"archive": {{}}}}, disk + "/mask.log", {{}})
        print("DOWNLOAD=" + open(disk + "/{stem}/download.json").read().replace("\\n", " "),
              file=sys.__stdout__)
    """)
    script = (f"mount -t tmpfs -o size=256k tmpfs {mount} && "
              f"{sys.executable} -c {shlex_quote(code)}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    status, download = (yaml.safe_load(done.stdout.split(key, 1)[1].splitlines()[0])
                        for key in ("STATUS=", "DOWNLOAD="))
    for record in (status, download):
        assert record["status"] == "failed", record
        assert "disk is full" in record["reason"] and "No space left" in record["reason"]
    assert "disk is full" in done.stderr  # the log could not be written; stderr could


def shlex_quote(text):
    import shlex

    return shlex.quote(text)


# ------------------------------------------------------------------------------------
# the demo with a token in the environment
# ------------------------------------------------------------------------------------
def test_the_demo_runs_with_a_token_set_and_passes_it_nowhere(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "MAST_API_TOKEN": TOKEN, "TMPDIR": str(temporary)}
    command = ["timeout", "-s", "KILL", str(RUN_TIMEOUT), sys.executable, "-m",
               "nsclean.testing.demo", "--workdir", str(tmp_path / "demo"), "--exposures",
               "1", "--cores", "2"]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, timeout=RUN_TIMEOUT + 30, check=False)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "MAST_API_TOKEN is set; the demo's loopback archive needs no token" \
        in result.stdout
    rows = read_report(tmp_path / "demo" / "results")
    assert [row["status"] for row in rows] == ["cleaned"]
    assert files_containing(tmp_path, TOKEN) == []
    assert TOKEN not in result.stdout
